"""The training stages of `molden demo` on the embedded EMT catalysis cache: denoising
pre-training on the relaxed structures, then S2EF with DeNS from that backbone and IS2RE with
Noisy Nodes, each evaluated on the held-out test splits. Sized to finish in minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

from molden.data.h5_dataset import H5Dataset
from molden.train.config import (
    DataConfig, FinetuneConfig, ModelChoice, OptimConfig, PretrainConfig, RunConfig, default_denoising,
)
from molden.train.loop import BEST, CONFIG_FILE, LAST, SUMMARY_FILE, Reporter, RunSummary, finished, train
from molden.objectives.dens import DeNSConfig
from molden.objectives.noisy_nodes import noisy_nodes_emt_cpu
from molden.objectives.supervised import s2ef_cpu

DEMO_MODEL = "painn_cpu"
"""Equivariant, so DeNS's force encoding is equivariant (DeNS §3.2) and one backbone serves
pre-training, forces and energies."""

DEMO_STEPS = 600


def _splits(cache: Path) -> tuple[str | None, list[str]]:
    """The validation split and the test splits the cache has (EMT: val_id; test_id, test_ood_*)."""
    names = H5Dataset(cache).split_names
    sizes = {name: len(H5Dataset(cache, name)) for name in names}
    val = next((n for n in ("val_id", "val") if sizes.get(n)), None)
    tests = [n for n in names if n.startswith("test") and sizes[n]]
    return val, tests


def demo_configs(cache: Path, out_dir: Path, steps: int = DEMO_STEPS, seed: int = 0) -> tuple[dict[str, PretrainConfig | FinetuneConfig], list[str]]:
    """{stage name: config} in the order they run, and the test splits to evaluate on."""
    val, tests = _splits(cache)
    cutoff = 5.0  # painn_cpu's radius; the cache's graphs (6 Å) are trimmed to it
    optim = OptimConfig(lr=2e-3, warmup_steps=max(1, steps // 10), ema_decay=0.99)
    eval_every = max(1, steps // 3)

    def run(name: str, n: int) -> RunConfig:
        return RunConfig(out=out_dir / name, seed=seed, steps=n, log_every=max(1, n // 15), eval_every=eval_every,
                         checkpoint_every=n, device="cpu")

    data = dict(path=cache, val_split=val, max_graphs=8)
    pretrain = PretrainConfig(
        data=DataConfig(**data, frames="relaxed"), optim=optim, run=run("pretrain", steps),
        model=ModelChoice(preset=DEMO_MODEL), denoising=default_denoising(cutoff),
    )
    s2ef = FinetuneConfig(
        data=DataConfig(**data), optim=optim, run=run("s2ef_dens", steps), model=ModelChoice(preset=DEMO_MODEL),
        task="s2ef", dens=DeNSConfig(s2ef=s2ef_cpu(), cutoff_angstrom=cutoff), init=out_dir / "pretrain" / "best.pt",
    )
    is2re = FinetuneConfig(
        data=DataConfig(**data), optim=optim, run=run("is2re_noisy_nodes", steps), model=ModelChoice(preset=DEMO_MODEL),
        task="is2re", noisy_nodes=noisy_nodes_emt_cpu().model_copy(update={"cutoff_angstrom": cutoff}),
        init=out_dir / "pretrain" / "best.pt",
    )
    return {"pretrain": pretrain, "s2ef_dens": s2ef, "is2re_noisy_nodes": is2re}, tests


def run_or_reuse(config: PretrainConfig | FinetuneConfig, reporter: Reporter | None = None, *,
                 redo: bool = False) -> tuple[RunSummary | dict, bool]:
    """Train `config`, or return the saved summary when its folder already holds a finished
    run of exactly this config (the demo's rerun), or continue it from last.pt when it was
    stopped (Ctrl-C, a kill) before its end. A demo folder of other settings is replaced:
    the demo owns it."""
    out = Path(config.run.out)
    saved_config, saved_summary = out / CONFIG_FILE, out / SUMMARY_FILE
    same = not redo and saved_config.is_file() and json.loads(saved_config.read_text()) == config.model_dump(mode="json")
    if same and saved_summary.is_file() and _loads(out / BEST):
        summary = json.loads(saved_summary.read_text())
        if finished(summary):
            return summary, True
    if same and _resumable(out / LAST, config.run.steps):
        return train(config, resume=True, reporter=reporter), False
    return train(config, overwrite=True, reporter=reporter), False


def _resumable(checkpoint: Path, steps: int) -> bool:
    """Whether `checkpoint` is a last.pt this molden can continue, short of `steps`."""
    from molden.errors import MoldenError
    from molden.models.checkpoint import read_checkpoint

    if not checkpoint.is_file():
        return False
    try:
        return read_checkpoint(checkpoint)["progress"]["step"] < steps
    except (MoldenError, KeyError, TypeError):
        return False


def _loads(checkpoint: Path) -> bool:
    """Whether this molden can load the checkpoint (one from an older version may not)."""
    from molden.errors import MoldenError
    from molden.models.checkpoint import load_model

    try:
        load_model(checkpoint)
    except MoldenError:
        return False
    return True
