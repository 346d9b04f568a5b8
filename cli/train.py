"""`molden pretrain`, `molden finetune`, `molden evaluate`: options (and an optional YAML/TOML
config file) into the library's configs, then `molden.train.train` / `evaluate_checkpoint`.

Every option left out keeps the config file's value, or the config's default; every option
given overrides it. The resolved config is printed at start and saved as OUT/config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from molden.cli.console import console, err_console, note_line, user_errors

# Config fields as the command line names them, for one-line messages about bad values
# (tests/test_training_cli.py checks that every option a command fills is here).
OPTION_NAMES = {
    "data": "--data", "run": "--out",  # a whole section missing: its one required option was not given
    "data.path": "--data", "data.val_split": "--val-split", "data.train_size": "--train-size",
    "data.frames": "--frames", "data.val_frames": "--val-frames", "data.workers": "--workers",
    "data.max_graphs": "--max-graphs", "data.max_atoms": "--max-atoms", "data.max_edges": "--max-edges",
    "optim.lr": "--lr", "optim.warmup_steps": "--warmup-steps", "optim.ema_decay": "--ema-decay",
    "optim.accumulate": "--accumulate",
    "run.out": "--out", "run.steps": "--steps", "run.seed": "--seed", "run.device": "--device", "run.dtype": "--dtype",
    "run.bf16": "--bf16", "run.log_every": "--log-every", "run.eval_every": "--eval-every",
    "run.checkpoint_every": "--checkpoint-every", "run.early_stopping": "--early-stopping", "run.threads": "--threads",
    "run.time_limit_minutes": "--time-limit", "run.deterministic": "--deterministic",
    "run.max_bad_steps": "--max-bad-steps",
    "model.preset": "--model", "model.changes": "--change", "model.conservative_forces": "--conservative-forces",
    "model.vector_decoder": "--vector-decoder", "model.graph_decoder": "--graph-decoder",
    "denoising.sigma_angstrom": "--sigma", "denoising.mask_probability": "--mask-prob",
    "denoising.atom_type_loss_weight": "--atom-type-weight",
    "task": "--task", "targets": "--target", "is2re_target": "--is2re-target", "init": "--init",
    "freeze_backbone": "--freeze-backbone", "decode_every_block": "--decode-every-block",
    "noisy_nodes.sigma_angstrom": "--noisy-nodes-sigma", "noisy_nodes.node_loss_weight": "--noisy-nodes-weight",
    "noisy_nodes.node_target": "--noisy-nodes-target",
    "dens.probability": "--dens-probability", "dens.sigma_angstrom": "--dens-sigma",
    "dens.corruption_ratio": "--dens-ratio", "dens.coefficient": "--dens-coefficient",
    "dens.coefficient_schedule": "--dens-schedule",
    "s2ef.energy_coefficient": "--energy-coefficient", "s2ef.force_coefficient": "--force-coefficient",
    "dens.s2ef.energy_coefficient": "--energy-coefficient", "dens.s2ef.force_coefficient": "--force-coefficient",
    "s2ef.energy_scale": "--energy-scale", "dens.s2ef.energy_scale": "--energy-scale",
    "s2ef.energy_reference": "--energy-reference", "dens.s2ef.energy_reference": "--energy-reference",
}


def _changes(items: Optional[List[str]]) -> dict[str, Any] | None:
    """--change block_iterations=3 → {"block_iterations": 3} (values parsed as YAML scalars)."""
    if not items:
        return None
    import yaml

    from molden.errors import MoldenConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoldenConfigError(f"invalid --change {item!r}: write FIELD=VALUE, e.g. block_iterations=3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _common(data, out, config_file, model, change, steps, lr, max_graphs, max_atoms, max_edges, workers, seed,
            device, dtype, bf16, log_every, eval_every, checkpoint_every, early_stopping, warmup_steps, ema_decay,
            accumulate, threads, val_split, time_limit, deterministic, max_bad_steps) -> dict[str, Any]:
    return {
        "data.path": data, "data.max_graphs": max_graphs, "data.max_atoms": max_atoms, "data.max_edges": max_edges,
        "data.workers": workers, "data.val_split": val_split,
        "run.out": out, "run.steps": steps, "run.seed": seed, "run.device": device, "run.dtype": dtype,
        "run.bf16": bf16, "run.log_every": log_every, "run.eval_every": eval_every,
        "run.checkpoint_every": checkpoint_every, "run.early_stopping": early_stopping, "run.threads": threads,
        "run.time_limit_minutes": time_limit, "run.deterministic": deterministic or None,
        "run.max_bad_steps": max_bad_steps,
        "optim.lr": lr, "optim.warmup_steps": warmup_steps, "optim.ema_decay": ema_decay, "optim.accumulate": accumulate,
        "model.preset": model, "model.changes": change or None,  # parsed in _run, where errors become one line
    }


def _run(kind: str, config_file: Optional[Path], overrides: dict[str, Any], resume: bool, overwrite: bool,
         sections: tuple[str, ...] = ()) -> None:
    from molden.cli.train_display import LiveReporter, print_summary
    from molden.train.config import FinetuneConfig, PretrainConfig, dotted, load_config, merge, read_config_file
    from molden.train.loop import CONFIG_FILE, train
    from molden.train.tasks import fill_cutoffs

    cls = PretrainConfig if kind == "pretrain" else FinetuneConfig
    with user_errors(OPTION_NAMES, same_on_every_process=True):
        overrides = {**overrides, "model.changes": _changes(overrides.get("model.changes"))}
        base: dict[str, Any] = {}
        out = overrides.get("run.out")
        if config_file is not None:
            base = read_config_file(config_file)
        elif resume and out is not None and (Path(out) / CONFIG_FILE).is_file():
            base = read_config_file(Path(out) / CONFIG_FILE)  # the run's own options; the command line may change some
            # A run saved before `val_frames` existed validated on its training frames: keep it so,
            # or best.pt would compare validations of two different frame sets.
            base.get("data", {}).setdefault("val_frames", base.get("data", {}).get("frames", "all"))
        s2ef_options = {k: overrides.pop(f"s2ef.{k}", None) for k in S2EF_OPTIONS}
        data = _cleared(merge(base, dotted(overrides)), overrides)
        for section in sections:
            data.setdefault(section, {})
        data = _route_s2ef(data, s2ef_options)
        data = fill_cutoffs(data, ("denoising",) if kind == "pretrain" else ("noisy_nodes", "dens"))
        config = load_config(cls, None, data)
    with user_errors(OPTION_NAMES):
        with LiveReporter(console, err_console) as reporter:
            summary = train(config, resume=resume, overwrite=overwrite, reporter=reporter)
    print_summary(console, summary)


S2EF_OPTIONS = ("energy_coefficient", "force_coefficient", "energy_scale", "energy_reference")


def _route_s2ef(data: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The `S2EF_OPTIONS` (--energy-coefficient, --force-coefficient, --energy-scale,
    --energy-reference) into DeNS's own S2EF terms when DeNS is on, however it was switched on
    (--dens, a config file, a resumed run's config), else into the plain S2EF terms."""
    from molden.train.config import dotted, merge

    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return data
    section = ("dens", "s2ef") if data.get("dens") is not None else ("s2ef",)
    return merge(data, dotted({".".join((*section, k)): v for k, v in given.items()}))


CLEARABLE = ("init", "data.val_split")
"""Options whose value `none` on the command line clears what a config file set."""


def _cleared(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` with each `CLEARABLE` option given as `none` set to None (no checkpoint to start
    from, no validation split), whatever the config file said."""
    for key in CLEARABLE:
        if overrides.get(key) is not None and str(overrides[key]).lower() == "none":
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = None
    return data


# Options shared by pretrain and finetune (typer needs them spelled out in each signature).
_DATA = typer.Option(None, "--data", help="the .h5 cache from `molden preprocess`")
_OUT = typer.Option(None, "--out", "-o", help="run folder (checkpoints, metrics, plots)")
_CONFIG = typer.Option(None, "--config", help="YAML/TOML/JSON file with any options; the command line overrides it")
_MODEL = typer.Option(None, "--model", help="backbone preset (`molden models`)")
_CHANGE = typer.Option(None, "--change", help="backbone field changed from the preset, FIELD=VALUE (repeatable)")
_VECTOR_DECODER = typer.Option(None, help="auto | edges | nodes: per-atom vectors decoded from GNS's edges or by an MLP of each atom's latents (Noisy Nodes §3.2)  [default: auto]")
_GRAPH_DECODER = typer.Option(None, help="auto | one_mlp | two_mlps | readout_mlp: per-structure values decoded by one MLP of each atom's latents; by Noisy Nodes §3.2's MLP of the processor's latents plus one of the encoder's (GNS only); or by Pre-training via Denoising's MLP, readout, MLP  [default: auto]")
_STEPS = typer.Option(None, help="optimiser steps  [default: 1000]")
_LR = typer.Option(None, help="peak learning rate  [default: 0.001]")
_MAX_GRAPHS = typer.Option(None, help="structures per batch at most  [default: 32]")
_MAX_ATOMS = typer.Option(None, help="atoms per batch at most")
_MAX_EDGES = typer.Option(None, help="edges per batch at most")
_WORKERS = typer.Option(None, help="DataLoader worker processes  [default: 0]")
_SEED = typer.Option(None, help="seed of initialisation, data order and noise  [default: 0]")
_DEVICE = typer.Option(None, help="cpu | cuda | auto  [default: auto]")
_DTYPE = typer.Option(None, help="float32 | float64  [default: float32]")
_BF16 = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast (CUDA; --no-bf16 resumes a bf16 run without it)")
_LOG_EVERY = typer.Option(None, help="steps between training metrics  [default: 20]")
_EVAL_EVERY = typer.Option(None, help="steps between validations  [default: 200]")
_CKPT_EVERY = typer.Option(None, help="steps between checkpoints  [default: 200]")
_EARLY = typer.Option(None, help="stop after this many validations without improvement")
_WARMUP = typer.Option(None, help="linear warm-up steps  [default: 100]")
_EMA = typer.Option(None, help="EMA decay  [default: 0.9999]")
_ACCUMULATE = typer.Option(None, help="batches accumulated per optimiser step  [default: 1]")
_THREADS = typer.Option(None, help="torch CPU threads")
_VAL_SPLIT = typer.Option(None, help="split validated on (none: no validation)  [default: val]")
_TIME_LIMIT = typer.Option(None, "--time-limit", help="minutes this invocation may run: last.pt is written and the run stops cleanly before (--resume continues; 0: no limit)")
_MAX_BAD = typer.Option(None, help="stop after this many consecutive steps with a non-finite loss (each is skipped)  [default: 10]")
_DETERMINISTIC = typer.Option(False, "--deterministic", help="torch deterministic algorithms (bit-reproducible on CUDA, slower)")
_RESUME = typer.Option(False, "--resume", help="continue the run in OUT from its last.pt")
_OVERWRITE = typer.Option(False, "--overwrite", help="replace a run already in OUT")


def pretrain(
    data: Optional[Path] = _DATA, out: Optional[Path] = _OUT, config_file: Optional[Path] = _CONFIG,
    model: Optional[str] = _MODEL, change: Optional[List[str]] = _CHANGE, vector_decoder: Optional[str] = _VECTOR_DECODER,
    sigma: Optional[float] = typer.Option(None, help="position noise σ, Å  [default: 0.02]"),
    frames: Optional[str] = typer.Option(None, help="all | initial | relaxed (each trajectory's first or last frame)  [default: all]"),
    mask_prob: Optional[float] = typer.Option(None, help="probability an atom's type is masked  [default: 0.75]"),
    atom_type_weight: Optional[float] = typer.Option(None, help="weight of the masked-type loss  [default: 4]"),
    steps: Optional[int] = _STEPS, lr: Optional[float] = _LR, max_graphs: Optional[int] = _MAX_GRAPHS,
    max_atoms: Optional[int] = _MAX_ATOMS, max_edges: Optional[int] = _MAX_EDGES, workers: Optional[int] = _WORKERS,
    seed: Optional[int] = _SEED, device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, bf16: Optional[bool] = _BF16,
    log_every: Optional[int] = _LOG_EVERY, eval_every: Optional[int] = _EVAL_EVERY,
    checkpoint_every: Optional[int] = _CKPT_EVERY, early_stopping: Optional[int] = _EARLY,
    warmup_steps: Optional[int] = _WARMUP, ema_decay: Optional[float] = _EMA, accumulate: Optional[int] = _ACCUMULATE,
    threads: Optional[int] = _THREADS, val_split: Optional[str] = _VAL_SPLIT,
    time_limit: Optional[float] = _TIME_LIMIT, deterministic: bool = _DETERMINISTIC,
    max_bad_steps: Optional[int] = _MAX_BAD, resume: bool = _RESUME, overwrite: bool = _OVERWRITE,
) -> None:
    """Denoising pre-training on (equilibrium) structures: predict the noise added to positions
    (and masked atom types)."""
    overrides = _common(data, out, config_file, model, change, steps, lr, max_graphs, max_atoms, max_edges, workers,
                        seed, device, dtype, bf16, log_every, eval_every, checkpoint_every, early_stopping,
                        warmup_steps, ema_decay, accumulate, threads, val_split, time_limit, deterministic,
                        max_bad_steps)
    overrides.update({"model.vector_decoder": vector_decoder, "data.frames": frames, "denoising.sigma_angstrom": sigma,
                      "denoising.mask_probability": mask_prob, "denoising.atom_type_loss_weight": atom_type_weight})
    _run("pretrain", config_file, overrides, resume, overwrite)


def finetune(
    data: Optional[Path] = _DATA, out: Optional[Path] = _OUT, config_file: Optional[Path] = _CONFIG,
    task: Optional[str] = typer.Option(None, help="qm9 | is2re | is2rs | s2ef  [default: qm9]"),
    target: Optional[List[str]] = typer.Option(None, help="qm9 target (repeatable)  [default: homo]"),
    is2re_target: Optional[str] = typer.Option(None, help="is2re: a target column of the cache instead of relaxed_energy (emt: adsorption_energy, OC20's IS2RE target)"),
    model: Optional[str] = _MODEL, change: Optional[List[str]] = _CHANGE, vector_decoder: Optional[str] = _VECTOR_DECODER,
    graph_decoder: Optional[str] = _GRAPH_DECODER,
    init: Optional[Path] = typer.Option(None, help="start the backbone from this (pre-training) checkpoint (none: from scratch, whatever --config says)"),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="train the heads only (with --init)"),
    frames: Optional[str] = typer.Option(None, help="all | initial | relaxed: the frames trained on (each trajectory's first or last)  [default: all]"),
    val_frames: Optional[str] = typer.Option(None, help="all | initial | relaxed: the frames validated on  [default: as --frames; is2re, is2rs: initial]"),
    train_size: Optional[int] = typer.Option(None, help="train on a seeded subset of this many train structures"),
    noisy_nodes_sigma: Optional[float] = typer.Option(None, help="Noisy Nodes on, with this σ in Å"),
    noisy_nodes_weight: Optional[float] = typer.Option(None, help="weight of the Noisy Nodes node loss  [default: 0.1; is2re: 1]"),
    noisy_nodes_target: Optional[str] = typer.Option(None, help="noise | relaxed_positions  [default: noise; is2re: relaxed_positions]"),
    decode_every_block: bool = typer.Option(False, "--decode-every-block", help="train on every block iteration's decoding, averaged (what Noisy Nodes does; its clean control)"),
    dens: bool = typer.Option(False, "--dens", help="s2ef: DeNS on (DeNS §3.2 settings unless changed)"),
    dens_probability: Optional[float] = typer.Option(None, help="p_DeNS  [default: 0.5]"),
    dens_sigma: Optional[float] = typer.Option(None, help="DeNS σ, Å  [default: 0.1]"),
    dens_ratio: Optional[float] = typer.Option(None, help="r_DeNS, fraction of free atoms corrupted  [default: 0.5]"),
    dens_coefficient: Optional[float] = typer.Option(None, help="λ_DeNS  [default: 10]"),
    dens_schedule: Optional[str] = typer.Option(None, help="constant | linear_decay: λ_DeNS falling to 0 over the run  [default: constant]"),
    conservative_forces: bool = typer.Option(False, "--conservative-forces", help="s2ef: forces as −∂E/∂x"),
    energy_coefficient: Optional[float] = typer.Option(None, help="s2ef: λ_E  [default: 1]"),
    force_coefficient: Optional[float] = typer.Option(None, help="s2ef: λ_F  [default: 100]"),
    energy_scale: Optional[str] = typer.Option(None, help="s2ef: σ_E, force_rms (one scale with the forces) | energy_std (DeNS Eq. 1: the spread of the energies less their per-element references)  [default: force_rms]"),
    energy_reference: Optional[str] = typer.Option(None, help="s2ef: a target column subtracted from each energy before training (OC20 S2EF: reference_energy, so the model learns OC20's energy − reference_energy; none: the total energy)  [default: none]"),
    steps: Optional[int] = _STEPS, lr: Optional[float] = _LR, max_graphs: Optional[int] = _MAX_GRAPHS,
    max_atoms: Optional[int] = _MAX_ATOMS, max_edges: Optional[int] = _MAX_EDGES, workers: Optional[int] = _WORKERS,
    seed: Optional[int] = _SEED, device: Optional[str] = _DEVICE, dtype: Optional[str] = _DTYPE, bf16: Optional[bool] = _BF16,
    log_every: Optional[int] = _LOG_EVERY, eval_every: Optional[int] = _EVAL_EVERY,
    checkpoint_every: Optional[int] = _CKPT_EVERY, early_stopping: Optional[int] = _EARLY,
    warmup_steps: Optional[int] = _WARMUP, ema_decay: Optional[float] = _EMA, accumulate: Optional[int] = _ACCUMULATE,
    threads: Optional[int] = _THREADS, val_split: Optional[str] = _VAL_SPLIT,
    time_limit: Optional[float] = _TIME_LIMIT, deterministic: bool = _DETERMINISTIC,
    max_bad_steps: Optional[int] = _MAX_BAD, resume: bool = _RESUME, overwrite: bool = _OVERWRITE,
) -> None:
    """Supervised training (QM9 targets, IS2RE, IS2RS, S2EF) with Noisy Nodes or DeNS, from
    scratch or from a pre-trained backbone."""
    overrides = _common(data, out, config_file, model, change, steps, lr, max_graphs, max_atoms, max_edges, workers,
                        seed, device, dtype, bf16, log_every, eval_every, checkpoint_every, early_stopping,
                        warmup_steps, ema_decay, accumulate, threads, val_split, time_limit, deterministic,
                        max_bad_steps)
    overrides.update({
        "task": task, "targets": list(target) if target else None, "is2re_target": is2re_target, "init": init,
        "freeze_backbone": freeze_backbone or None, "data.train_size": train_size,
        "data.frames": frames, "data.val_frames": val_frames,
        "decode_every_block": decode_every_block or None,
        "model.conservative_forces": conservative_forces or None, "model.vector_decoder": vector_decoder,
        "model.graph_decoder": graph_decoder,
    })
    if noisy_nodes_sigma is not None or noisy_nodes_weight is not None or noisy_nodes_target is not None:
        # no node target given: FinetuneConfig picks the task's (is2re: relaxed_positions)
        overrides.update({"noisy_nodes.sigma_angstrom": noisy_nodes_sigma, "noisy_nodes.node_loss_weight": noisy_nodes_weight,
                          "noisy_nodes.node_target": noisy_nodes_target})
    if dens or any(v is not None for v in (dens_probability, dens_sigma, dens_ratio, dens_coefficient, dens_schedule)):
        overrides.update({"dens.probability": dens_probability, "dens.sigma_angstrom": dens_sigma,
                          "dens.corruption_ratio": dens_ratio, "dens.coefficient": dens_coefficient,
                          "dens.coefficient_schedule": dens_schedule})
    overrides.update({"s2ef.energy_coefficient": energy_coefficient, "s2ef.force_coefficient": force_coefficient,
                      "s2ef.energy_scale": energy_scale, "s2ef.energy_reference": energy_reference})
    _run("finetune", config_file, overrides, resume, overwrite, sections=("dens",) if dens else ())


def evaluate(
    checkpoint: Path = typer.Argument(..., help="a checkpoint (best.pt or last.pt of a run)"),
    data: Path = typer.Option(..., "--data", help="the .h5 cache to evaluate on"),
    split: str = typer.Option("test", help="the split evaluated"),
    frames: Optional[str] = typer.Option(None, help="all | initial | relaxed: every frame, or each trajectory's first or last  [default: the frames the run validated on; is2re, is2rs: initial]"),
    max_graphs: int = typer.Option(64, help="structures per batch"),
    device: str = typer.Option("auto", help="cpu | cuda | auto"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="write the metrics as JSON here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out file"),
) -> None:
    """The metrics of a trained model on a split of a cache, in the task's units."""
    from rich.table import Table

    from molden.train.evaluate import evaluate_checkpoint

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    with user_errors(OPTION_NAMES):
        result = evaluate_checkpoint(checkpoint, data, split=split, max_graphs=max_graphs, device=device, out=out,
                                     frames=frames, overwrite=overwrite)
    which = "" if result["frames"] == "all" else f" ({result['frames']} frames)"
    table = Table(title=f"{checkpoint} on {data} [{split}], {result['structures']:,} structures{which}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)
    if out is not None:
        note_line(f"wrote {out}")
