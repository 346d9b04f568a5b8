"""schnetpack's SchNet on the QM9 HOMO split of a molden cache, for the equal-wall-clock comparison.

The peer side of issue 14's acceptance test: export exactly the train / val / test molecules of a
molden QM9 cache to an ASE database that schnetpack's `ASEAtomsData` reads (the split fixed by a
`split.npz`), then train schnetpack's standard QM9 SchNet with schnetpack's own training loop (its
`AtomisticTask` under a pytorch-lightning `Trainer`, as schnetpack's tutorials do) for a wall-clock
budget, validating every `--val-every` optimiser steps. Each validation appends one record to
`OUT/metrics.jsonl` in molden's format,

    {"step": 250, "epoch": 2.5, "split": "val", "wall_s": 412.7, "mae_homo_meV": 181.2}

so `molden.train.plots.plot_mae_vs_wallclock` draws this run beside a molden run. `wall_s` counts,
as molden's loop does, seconds since the first training step began (earlier validations and
checkpoints included) up to the start of that validation.

Runs in its own virtual environment (schnetpack pins sympy<=1.12; see examples/peers/README.md)
and does not import molden: the cache is read with h5py (docs/FORMAT.md).

    python examples/peers/schnetpack_qm9.py --cache qm9_12k.h5 --out runs/schnetpack_homo \
        --budget-s 1800 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

HOMO = "homo"
SPLITS = ("train", "val", "test")
VAL_METRIC = "mae_homo_meV"
EXPORT_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# Export: molden cache → ASE db + split.npz (needs h5py, numpy, ase; not schnetpack or molden)
# ---------------------------------------------------------------------------------------------

def cache_fingerprint(cache: Path) -> dict[str, Any]:
    """What identifies the molecules and split of a molden cache: the SHA-256 of its system ids
    and of each split's index array, and the split sizes."""
    with h5py.File(cache, "r") as f:
        if not f.attrs.get("complete", False):
            raise SystemExit(f"{cache}: incomplete molden cache (an interrupted write); rerun molden preprocess")
        ids = f["structures/system_id"].asstr()[:].tolist()
        digest = {"system_id_sha256": hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()}
        for name in SPLITS:
            if f"splits/{name}" not in f:
                raise SystemExit(f"{cache}: no split {name!r} (has {sorted(f['splits'])})")
            idx = f[f"splits/{name}"][:].astype(np.int64)
            digest[f"n_{name}"] = int(idx.size)
            digest[f"{name}_sha256"] = hashlib.sha256(idx.tobytes()).hexdigest()
    return digest


def export_cache(cache: Path, db_path: Path, split_path: Path) -> dict[str, Any]:
    """Write the train, val and test molecules of molden cache `cache` to the ASE db `db_path`
    in schnetpack's `ASEAtomsData` layout (positions Å, `homo` in Hartree as in the cache, the
    unit recorded in the db's metadata), in the order train, val, test, and `split_path`
    (`train_idx`, `val_idx`, `test_idx`: row positions in the db). Returns the export record
    (cache fingerprint and the cache index of every db row). Written under temporary names and
    renamed, so a killed export leaves no half-written db behind."""
    from ase import Atoms
    from ase.db import connect

    fingerprint = cache_fingerprint(cache)
    with h5py.File(cache, "r") as f:
        targets = json.loads(f.attrs["target_names"])
        if HOMO not in targets:
            raise SystemExit(f"{cache}: no {HOMO!r} target (targets: {targets})")
        order = np.concatenate([f[f"splits/{name}"][:].astype(np.int64) for name in SPLITS])
        offsets = f["structures/atom_offsets"][:]
        numbers = f["atoms/numbers"][:]
        positions = f["atoms/positions"][:]
        homo_ha = f["structures/targets"][:, targets.index(HOMO)]
        pbc = f["structures/pbc"][:]
    if pbc[order].any():
        raise SystemExit(f"{cache}: periodic structures; this export is for QM9 molecules")
    if not np.isfinite(homo_ha[order]).all():
        raise SystemExit(f"{cache}: missing (NaN) {HOMO} values in the exported splits")

    tmp_db = db_path.with_name(db_path.name + ".partial.db")
    tmp_db.unlink(missing_ok=True)
    with connect(tmp_db, type="db", use_lock_file=False) as conn:
        # The metadata ASEAtomsData.create writes: schnetpack converts Hartree → eV on loading.
        conn.metadata = {"_property_unit_dict": {HOMO: "Hartree"}, "_distance_unit": "Ang", "atomrefs": {}}
    with connect(tmp_db, type="db", use_lock_file=False) as conn:   # one transaction for every row
        for s in order:
            a, b = offsets[s], offsets[s + 1]
            conn.write(Atoms(numbers=numbers[a:b], positions=positions[a:b]), data={HOMO: np.array([homo_ha[s]])})
    sizes = [fingerprint[f"n_{name}"] for name in SPLITS]
    starts = np.cumsum([0, *sizes])
    tmp_split = split_path.with_name(split_path.name + ".partial.npz")
    np.savez(tmp_split, **{f"{name}_idx": np.arange(starts[i], starts[i + 1]) for i, name in enumerate(SPLITS)})
    record = {"format": EXPORT_FORMAT, "cache": str(cache.resolve()), **fingerprint, "cache_index": order.tolist()}
    os.replace(tmp_db, db_path)
    os.replace(tmp_split, split_path)
    return record


def exported(cache: Path, data_dir: Path) -> tuple[Path, Path]:
    """The ASE db and split file of `cache` in `data_dir`, exported unless an export of the same
    molecules and split is already there."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db_path, split_path, record_path = data_dir / "qm9_homo.db", data_dir / "split.npz", data_dir / "export.json"
    fingerprint = cache_fingerprint(cache)
    if db_path.exists() and split_path.exists() and record_path.exists():
        old = json.loads(record_path.read_text())
        if old.get("format") == EXPORT_FORMAT and all(old.get(k) == v for k, v in fingerprint.items()):
            return db_path, split_path
    record = export_cache(cache, db_path, split_path)
    record_path.write_text(json.dumps(record) + "\n")
    return db_path, split_path


# ---------------------------------------------------------------------------------------------
# Training: schnetpack's SchNet in schnetpack's own loop
# ---------------------------------------------------------------------------------------------

def import_schnetpack():
    """schnetpack 2.1 on torch 2.13: its loader imports `T_co` from torch's dataloader module,
    which torch no longer defines there; define it first (PEERS.md)."""
    import torch.utils.data.dataloader as dataloader

    if not hasattr(dataloader, "T_co"):
        dataloader.T_co = TypeVar("T_co", covariant=True)
    import schnetpack

    return schnetpack


def build_task(spk, args: argparse.Namespace):
    """schnetpack's standard QM9 SchNet (configs/model/representation/schnet.yaml: 128 features,
    6 interactions, 20 Gaussians, cosine cutoff 5 Å) with an Atomwise head, MSE loss, AdamW
    (weight decay 0, i.e. Adam) at 5e-4 and ReduceLROnPlateau on val_loss as in
    configs/task/scheduler/reduce_on_plateau.yaml."""
    import torch
    import torchmetrics

    cutoff = args.cutoff_angstrom
    schnet = spk.representation.SchNet(
        n_atom_basis=128, n_interactions=6,
        radial_basis=spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff))
    model = spk.model.NeuralNetworkPotential(
        representation=schnet,
        input_modules=[spk.atomistic.PairwiseDistances()],
        # HOMO is intensive: a mean over atoms, and the mean (not per-atom) offset removed.
        output_modules=[spk.atomistic.Atomwise(n_in=128, output_key=HOMO, aggregation_mode="avg")],
        postprocessors=[spk.transform.CastTo64(), spk.transform.AddOffsets(HOMO, add_mean=True, is_extensive=False)])
    output = spk.task.ModelOutput(name=HOMO, loss_fn=torch.nn.MSELoss(), loss_weight=1.0,
                                  metrics={"MAE": torchmetrics.regression.MeanAbsoluteError()})
    # schnetpack's own ReduceLROnPlateau passes `verbose=` to torch's, which torch 2.13 rejects;
    # torch's class with the same arguments (smoothing_factor 0 there means no smoothing).
    return spk.task.AtomisticTask(
        model=model, outputs=[output],
        optimizer_cls=torch.optim.AdamW, optimizer_args={"lr": args.lr, "weight_decay": 0.0},
        scheduler_cls=torch.optim.lr_scheduler.ReduceLROnPlateau,
        scheduler_args=dict(mode="min", factor=0.5, patience=75, threshold=0.0, threshold_mode="rel",
                            cooldown=10, min_lr=0.0),
        scheduler_monitor="val_loss")


def build_data(spk, args: argparse.Namespace, db_path: Path, split_path: Path):
    """schnetpack's AtomsDataModule over the exported db with the fixed split, the transforms of
    configs/experiment/qm9_atomwise.yaml (HOMO in eV, as schnetpack's QM9 set-up converts it)."""
    transforms = [
        spk.transform.SubtractCenterOfMass(),
        spk.transform.RemoveOffsets(HOMO, remove_mean=True, remove_atomrefs=False, is_extensive=False),
        (spk.transform.MatScipyNeighborList if args.neighbor_list == "matscipy" else spk.transform.ASENeighborList)(
            cutoff=args.cutoff_angstrom),
        spk.transform.CastTo32(),
    ]
    return spk.data.AtomsDataModule(
        str(db_path), batch_size=args.batch_size, split_file=str(split_path),
        transforms=transforms, load_properties=[HOMO], property_units={HOMO: "eV"}, distance_unit="Ang",
        num_workers=args.workers, pin_memory=False)


def make_callbacks(args: argparse.Namespace, out: Path, ev_to_mev: float):
    """The EMA, budget and metrics callbacks (defined here so pytorch_lightning is imported only
    inside the schnetpack venv)."""
    import pytorch_lightning as pl
    from torch_ema import ExponentialMovingAverage as TorchEMA

    class ValidatedEMA(pl.Callback):
        """schnetpack's ExponentialMovingAverage callback (configs/callbacks/ema.yaml, decay 0.995):
        validate with the averaged weights. Unlike schnetpack's callback, which puts the training
        weights back only at the next epoch start, restore them right after each validation: with
        several validations per epoch, schnetpack's would go on training the averaged weights and
        then, at the epoch start, throw away every step since the last validation."""

        def __init__(self, decay: float):
            self.decay, self.ema = decay, None

        def on_fit_start(self, trainer, pl_module):
            self.ema = TorchEMA(pl_module.model.parameters(), decay=self.decay)

        def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
            self.ema.update()

        def on_validation_epoch_start(self, trainer, pl_module):
            self.ema.store()
            self.ema.copy_to()

        def on_validation_epoch_end(self, trainer, pl_module):
            self.ema.restore()

    class BudgetAndLog(pl.Callback):
        """Stops training once `budget_s` seconds of wall clock have passed since the first
        training step; appends one molden metrics record per validation."""

        def __init__(self):
            self.t0 = None
            self.batches_per_epoch = 1
            self.val_seconds = 0.0
            self.val_start = 0.0
            self.wall_at_val = 0.0
            self.train_s_at_val = 0.0
            self.step_at_val = None
            self.logged_steps: set[int] = set()
            self.best = math.inf
            self.last = math.nan
            self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
            self.train_molecules = 0
            self.window = (0.0, 0)   # (train seconds, molecules) at the last record

        def elapsed(self) -> float:
            return time.perf_counter() - self.t0

        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()
            self.batches_per_epoch = max(int(trainer.num_training_batches), 1)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.train_molecules += int(batch["_n_atoms"].numel())
            if self.elapsed() >= args.budget_s or (args.max_steps and trainer.global_step >= args.max_steps):
                trainer.should_stop = True

        def on_validation_start(self, trainer, pl_module):
            self.val_start = time.perf_counter()
            self.wall_at_val = self.elapsed()
            self.train_s_at_val = self.wall_at_val - self.val_seconds
            self.step_at_val = trainer.global_step

        def on_validation_end(self, trainer, pl_module):
            self.val_seconds += time.perf_counter() - self.val_start
            step = self.step_at_val
            if step in self.logged_steps:
                return
            self.logged_steps.add(step)
            mae_mev = float(trainer.callback_metrics[f"val_{HOMO}_MAE"]) * ev_to_mev
            self.best, self.last = min(self.best, mae_mev), mae_mev
            epoch = step / self.batches_per_epoch
            d_s, d_n = self.train_s_at_val - self.window[0], self.train_molecules - self.window[1]
            if d_n > 0:   # training throughput since the last record, validation time left out
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                self.write(step, epoch, "train", {"structures_per_s": d_n / max(d_s, 1e-9), "lr": lr})
                self.window = (self.train_s_at_val, self.train_molecules)
            self.write(step, epoch, "val", {VAL_METRIC: mae_mev, "loss": float(trainer.callback_metrics["val_loss"])})
            print(f"step {step:6d}  epoch {epoch:6.2f}  wall {self.wall_at_val:7.1f} s  "
                  f"val HOMO MAE {mae_mev:8.2f} meV", flush=True)

        def write(self, step: int, epoch: float, split: str, values: dict[str, float]) -> None:
            record = {"step": int(step), "epoch": round(float(epoch), 6), "split": split,
                      "wall_s": round(self.wall_at_val, 3), **values}
            self.jsonl.write(json.dumps(record) + "\n")

    return ValidatedEMA(args.ema_decay), BudgetAndLog()


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Export, train for `args.budget_s` wall-clock seconds, validate once more at the end, and
    write OUT/metrics.jsonl and OUT/summary.json. Returns the summary."""
    cache, out = args.cache.resolve(), args.out.resolve()
    if (out / "metrics.jsonl").exists() and not args.overwrite:
        raise SystemExit(f"{out} already holds a run (metrics.jsonl); pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    db_path, split_path = exported(cache, (args.data_dir or out / "data").resolve())
    if args.export_only:
        print(f"exported {cache} → {db_path} and {split_path}")
        return {}

    import torch

    torch.set_num_threads(args.threads)
    spk = import_schnetpack()
    import pytorch_lightning as pl
    from ase.units import Hartree

    pl.seed_everything(args.seed, workers=True)
    os.chdir(out)   # AtomsDataModule writes its splitting.lock into the working directory
    ev_to_mev = 1000.0   # the db's Hartree are converted to eV by ASEAtomsData (ase.units.Hartree)
    task, data = build_task(spk, args), build_data(spk, args, db_path, split_path)
    ema, budget = make_callbacks(args, out, ev_to_mev)
    checkpoint = spk.train.ModelCheckpoint(model_path=str(out / "best_model"), dirpath=str(out / "checkpoints"),
                                           monitor="val_loss", save_top_k=1, save_last=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[ema, budget, checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, default_root_dir=str(out))
    trainer.fit(task, datamodule=data)
    stopped_wall_s = budget.elapsed()
    # The last validation of the budget, unless the stop fell right on one.
    if trainer.global_step not in budget.logged_steps:
        trainer.validate(task, datamodule=data, verbose=False)
    budget.jsonl.close()
    summary = {
        "tool": "schnetpack", "schnetpack_version": _version("schnetpack"),
        "torch_version": torch.__version__, "threads": args.threads, "budget_s": args.budget_s,
        "train_wall_s": round(stopped_wall_s, 3), "steps": trainer.global_step,
        "epochs": round(trainer.global_step / budget.batches_per_epoch, 4),
        "train_molecules_per_s": budget.train_molecules / max(stopped_wall_s - budget.val_seconds, 1e-9),
        "molecules_per_s_with_validation": budget.train_molecules / max(stopped_wall_s, 1e-9),
        "best_val_mae_homo_meV": budget.best, "final_val_mae_homo_meV": budget.last,
        "hartree_in_ev": float(Hartree), "cache": str(cache), "n_train": len(data.train_idx),
        "n_val": len(data.val_idx), "n_test": len(data.test_idx), "val_every_steps": args.val_every,
        "batch_size": args.batch_size, "neighbor_list": args.neighbor_list, "ema_decay": args.ema_decay,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="molden QM9 cache (.h5) with train/val/test splits")
    p.add_argument("--out", type=Path, required=True, help="run folder: metrics.jsonl, summary.json, best_model")
    p.add_argument("--budget-s", type=float, required=True, help="wall-clock training budget, seconds")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--val-every", type=int, default=25, help="optimiser steps between validations (default 25: "
                   "4 a epoch on 10,000 molecules at batch 100)")
    p.add_argument("--batch-size", type=int, default=100, help="molecules per batch (schnetpack's QM9 default 100)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (schnetpack's QM9 default 5e-4)")
    p.add_argument("--cutoff-angstrom", type=float, default=5.0)
    p.add_argument("--ema-decay", type=float, default=0.995, help="schnetpack's default EMA decay")
    p.add_argument("--neighbor-list", choices=("matscipy", "ase"), default="matscipy",
                   help="schnetpack transform (matscipy: configs/experiment/qm9_atomwise.yaml; ase: the tutorials)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: load in the training process, "
                   "as molden's CPU configs do; workers compete with --threads for the same cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="also stop after this many steps (0: budget only)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the ASE db goes (default OUT/data; reused "
                   "when it holds the same molecules and split)")
    p.add_argument("--export-only", action="store_true", help="write the ASE db and split.npz, do not train")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    args = p.parse_args(argv)
    if args.budget_s <= 0 or args.threads < 1 or args.val_every < 2 or args.batch_size < 1:
        p.error("--budget-s must be > 0, --threads ≥ 1, --val-every ≥ 2, --batch-size ≥ 1")
    return args


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
