"""`molden demo`: the whole pipeline on the embedded EMT data: preprocess, inspect, pre-train,
fine-tune (S2EF with DeNS, IS2RE with Noisy Nodes), evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molden.cli.console import console, err_console, note_line, print_cache_summary, user_errors
from molden.cli.preprocess import EMT_SYSTEMS_DEFAULT, OPTION_NAMES, print_preprocess_summary, run_with_progress


def demo(
    out_dir: Path = typer.Option(Path("molden-demo"), help="where the demo writes its files"),
    emt_systems: Optional[int] = typer.Option(
        None, "--emt-systems", help="EMT adsorbate+slab systems to relax", show_default=str(EMT_SYSTEMS_DEFAULT)
    ),
    systems: Optional[int] = typer.Option(None, "--systems", hidden=True, help="old name of --emt-systems"),
    workers: int = typer.Option(1, help="processes for the EMT relaxations"),
    overwrite: bool = typer.Option(False, help="redo the work even when the demo cache is already complete"),
    train_steps: int = typer.Option(600, "--train-steps", min=0, help="optimiser steps of each training stage (0: data only)"),
) -> None:
    """Run the whole pipeline on the embedded EMT catalysis data: preprocess, inspect,
    denoising pre-training, S2EF with DeNS, IS2RE with Noisy Nodes, evaluation.

    A rerun with the same options reuses the cache and the finished runs instead of redoing them."""
    from molden.data.cache_summary import summarize_cache
    from molden.data.emt import EMTConfig
    from molden.errors import MoldenConfigError
    from molden.pipeline.preprocess import PreprocessConfig

    n_systems = emt_systems if emt_systems is not None else systems
    cache = out_dir / "emt.h5"
    with user_errors(OPTION_NAMES):
        config = PreprocessConfig(
            source="emt", out=cache, workers=workers, overwrite=overwrite,
            emt=EMTConfig.model_validate({} if n_systems is None else {"n_systems": n_systems}),
        )
        stages = 2 + (5 if train_steps else 0)
        console.rule(f"1/{stages}  molden preprocess emt")
        try:
            summary = run_with_progress(config)
        except MoldenConfigError as error:  # preprocess names its own --out; the demo's option is --out-dir
            raise MoldenConfigError(str(error).replace(f"--out {cache}", f"--out-dir {out_dir}: {cache}")
                                    .replace("another --out", "another --out-dir")) from None
        print_preprocess_summary(summary)
        console.rule(f"2/{stages}  molden inspect")
        print_cache_summary(summarize_cache(cache))
        if train_steps:
            run_training_stages(cache, out_dir, train_steps, stages, overwrite)
    rerun = f"molden demo --out-dir {out_dir}" + (f" --emt-systems {n_systems}" if n_systems is not None else "")
    print_next_steps(cache, "train" if "train" in summary.splits else next(iter(summary.splits), "train"), rerun)


STAGE_TITLES = {
    "pretrain": "molden pretrain (denoising, relaxed structures)",
    "s2ef_dens": "molden finetune --task s2ef --dens --init pretrain/best.pt",
    "is2re_noisy_nodes": "molden finetune --task is2re --noisy-nodes-sigma 0.3 --init pretrain/best.pt",
}


def run_training_stages(cache: Path, out_dir: Path, steps: int, stages: int, overwrite: bool = False) -> None:
    """Pre-train, fine-tune twice, evaluate on every test split, print one table."""
    from rich.table import Table

    from molden.cli.train_display import LiveReporter
    from molden.train.demo import demo_configs, run_or_reuse
    from molden.train.loop import TrainingStopped
    from molden.train.evaluate import evaluate_checkpoint

    configs, tests = demo_configs(cache, out_dir, steps)
    rows = []
    for k, (name, config) in enumerate(configs.items(), start=3):
        console.rule(f"{k}/{stages}  {STAGE_TITLES[name]}")
        try:
            with LiveReporter(console, err_console) as reporter:
                summary, reused = run_or_reuse(config, reporter, redo=overwrite)
        except TrainingStopped as error:
            if not error.interrupted:
                raise
            raise TrainingStopped(f"interrupted: {config.run.out}/last.pt written; run the same molden demo command "
                                  "again to continue where it stopped", interrupted=True) from None
        summary = summary if isinstance(summary, dict) else summary.to_json()
        if reused:
            note_line(f"{config.run.out} already holds this finished run: reused (--train-steps or --overwrite to redo)")
        rows.append((name, summary))
    console.rule(f"{stages - 1}/{stages}  molden evaluate (best.pt of each fine-tuning, test splits)")
    runs = Table(title=f"molden demo: training runs ({steps} steps each)")
    for column in ("run", "wall s", "structures/s", "best validation"):
        runs.add_column(column, no_wrap=column == "run")
    for name, summary in rows:
        best = f"{summary['best_metric']} {summary['best_value']:.4g}" if summary["best_step"] >= 0 else "-"
        runs.add_row(str(out_dir / name), f"{summary['wall_s']:.0f}", f"{summary['structures_per_s']:.0f}", best)
    console.print(runs)
    table = Table(title="molden demo: test metrics (best.pt)")
    for column in ("model", "split", "energy MAE meV", "forces MAE meV/Å"):
        table.add_column(column, no_wrap=True)
    for name, _ in rows[1:]:
        for split in tests:
            metrics = evaluate_checkpoint(out_dir / name / "best.pt", cache, split=split, device="cpu")["metrics"]
            forces = metrics.get("forces_mae_mev_per_angstrom")
            table.add_row(name, split, f"{metrics['energy_mae_mev']:.1f}", "-" if forces is None else f"{forces:.1f}")
    console.print(table)
    relax_stage(cache, out_dir, tests, stages)


def relax_stage(cache: Path, out_dir: Path, tests: list[str], stages: int) -> None:
    """Direct IS2RS prediction (the Noisy Nodes IS2RE model's position head) against L-BFGS
    with the DeNS force field, on the in-distribution test split (Noisy Nodes §5.1)."""
    from rich.table import Table

    from molden.relax.run import RelaxConfig, run_relax

    split = "test_id" if "test_id" in tests else tests[0]
    console.rule(f"{stages}/{stages}  molden relax --method direct --method lbfgs ({split})")
    config = RelaxConfig(input=cache, split=split, model=str(out_dir / "s2ef_dens" / "best.pt"),
                         direct_model=out_dir / "is2re_noisy_nodes" / "best.pt", methods=["direct", "lbfgs"],
                         max_steps=100, out=out_dir / "relaxed.extxyz", overwrite=True)
    rows = [r.row() for r in run_relax(config)]
    table = Table(title=f"molden demo: relaxed structures of {split} against EMT's relaxations")
    for column in ("method", "structures", "ADwT", "FbT (EMT)", "mean steps", "ms / structure"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        table.add_row(r["method"], str(r["structures"]), f"{r.get('adwt', float('nan')):.3f}",
                      f"{r.get('fbt', float('nan')):.3f}", f"{r['mean_steps']:.1f}", f"{r['wall_ms_per_structure']:.1f}")
    console.print(table)
    speedup = rows[1]["wall_s"] / max(rows[0]["wall_s"], 1e-9)
    console.print(f"direct prediction: {speedup:.0f}× faster than L-BFGS with the learned force field "
                  f"(files: {config.out.parent / 'relaxed_direct.extxyz'}, relaxed_lbfgs.extxyz, relaxed.json)")


def print_next_steps(cache: Path, split: str, rerun: str) -> None:
    """What to run after the demo: the commands and the Python to read the cache."""
    console.rule("next")
    console.print(
        f"molden inspect {cache} --json    # the summary above, as JSON\n"
        f"molden export {cache} --out {cache.with_suffix('.extxyz')}    # back to extxyz for ASE, MACE, ...\n"
        f"{rerun}    # again: reuses the complete cache\n"
        "\n"
        "from molden.data import H5Dataset\n"
        f"dataset = H5Dataset({str(cache)!r}, split={split!r})\n"
        "structure = dataset[0]   # positions Å, energy eV, forces eV/Å, edge_index, unit_shifts",
        highlight=False, markup=False, soft_wrap=True,
    )
