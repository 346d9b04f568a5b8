"""`molden evaluate`: a trained model's metrics on a split of a cache, in the task's units."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from molden.data.h5_dataset import open_cache
from molden.errors import MoldenConfigError, MoldenInputError
from molden.models.checkpoint import load_model, read_checkpoint
from molden.train.config import DataConfig, FinetuneConfig, PretrainConfig
from molden.train.data import open_split, validation_batches
from molden.train.distributed import resolve_device
from molden.train.loop import RUN_FILES, evaluate
from molden.train.tasks import energy_reference_offsets, trim_cutoff, validation_objective


def saved_config(payload: dict[str, Any], path: Path) -> PretrainConfig | FinetuneConfig:
    """The training config a checkpoint was written with."""
    if "config" not in payload:
        raise MoldenInputError(path, "the checkpoint holds no training config")
    raw = json.loads(payload["config"])
    cls = PretrainConfig if "denoising" in raw else FinetuneConfig
    return cls.model_validate(raw)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, split: str = "test", max_graphs: int = 64,
                        device: str = "auto", out: str | Path | None = None, frames: str | None = None,
                        overwrite: bool = False) -> dict[str, Any]:
    """{"metrics": {name: value}, "structures": n, ...} of the checkpoint's EMA model on `split`
    of `data` (each batch's terms weighted by its structures); written as JSON to `out`.
    `frames` defaults to those the run validated on: each trajectory's initial structure for
    IS2RE and IS2RS. An existing `out` is replaced only with `overwrite`; an input never."""
    checkpoint = Path(checkpoint)
    if out is not None:  # before the evaluation, not after it
        out = Path(out)
        if any(out.resolve() == Path(p).resolve() for p in (checkpoint, data)):
            raise MoldenConfigError(f"--out {out} is an input of the evaluation: pick another file")
        if out.suffix != ".json" or out.name in RUN_FILES:
            raise MoldenConfigError(f"--out {out}: name a .json file of your own (not one of a run folder's files)")
        if out.exists() and not out.is_dir() and not overwrite:
            raise MoldenConfigError(f"--out {out} exists: pass --overwrite to replace it")
        if out.is_dir() or not out.parent.is_dir():
            raise MoldenConfigError(f"--out {out}: " + ("a folder, not a file" if out.is_dir() else f"no folder {out.parent}"))
    payload = read_checkpoint(checkpoint)
    config = saved_config(payload, checkpoint)
    frames = frames or config.data.validation_frames
    torch_device = resolve_device(device, 0)
    loaded = load_model(checkpoint, device=torch_device)
    objective = validation_objective(config, loaded.task)
    for module in (getattr(objective, "normalizer", None),):
        if module is not None:
            module.to(torch_device)
    data_config = DataConfig(path=Path(data), max_graphs=max_graphs, val_split=split, frames=frames)
    dataset = open_split(data_config, split)
    reference = getattr(getattr(objective, "config", None), "energy_reference", None)
    if reference is not None:  # a model of OC20's referenced S2EF energies: the cache must give them
        with open_cache(dataset.path) as f:
            energy_reference_offsets(f, reference, dataset.indices)
    batches = validation_batches(dataset, data_config, rank=0, world_size=1)
    dtype = next(loaded.model.parameters()).dtype
    trim = trim_cutoff(loaded.spec.backbone_config(), dataset)
    metrics = evaluate(loaded.model, objective, dataset, batches, device=torch_device, dtype=dtype,
                       seed=config.run.seed, data_config=data_config, trim_cutoff_angstrom=trim)
    result = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "frames": frames, "structures": len(dataset),
              "task": loaded.task.get("kind"), "metrics": metrics}
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
    return result
