"""Where a real training step spends its time, for every QM9 CPU preset (issues 14 and 16).

`python -m molden.bench.train_step [--cache QM9.h5] [--steps 20] [--threads 2] [--json out.json]`
trains QM9 HOMO with Noisy Nodes (σ = 0.02 Å, `molden finetune --task qm9 --target homo
--noisy-nodes-sigma 0.02 --max-graphs 128`, the CLI's optimiser, schedule, clipping and EMA)
through the loop's own pieces: the `DataLoader` of `molden.train.data.loader` over an
`epoch_plan`, `move`, and `take_step` (whose `objective.corrupt` adds the noise and rebuilds
the radius graph). The presets train side by side, taking turns step by step (a busy spell of a
shared machine touches them alike). After `--warmup` steps, each of `--steps` steps is split into

- data: waiting for the next collated batch (HDF5 read + collate, as `next(stream)` in the loop);
- corrupt: noise + graph rebuild, timed inside `take_step` by wrapping the objective;
- compute: the rest of the step (forward over every block iteration, loss, backward, clipping,
  Adam, scheduler and EMA update).

Reported per preset, medians over the timed steps: structures/s of the whole step, the share of
the step in data + corrupt (goal below 5 %), and the achieved FLOP/s of the compute phase.
FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on each timed step's own
batch and corruption (forward + backward, re-run after the timing so counting costs no time);
it counts matrix products (mm, bmm, addmm, convolutions, attention), not elementwise or scatter
ops, so the figure is the matmul work a GNN does, comparable with the machine's fp32 matmul
peak (`torch.mm` of 2048², same threads, measured before and after the presets; the higher is
the peak). Without `--cache`, a QM9 cache of `--limit` molecules (qm9pack) is built in a
temporary folder first, at 5.5 Å, so that the graph after noise is filtered from the cached one
(the README's advice for training with noise); a cache at the presets' 5 Å times the search
instead. The setup says which (`graph_after_noise`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from molden.bench.tables import print_table
from molden.bench.model_step import CPU_PRESETS, CUTOFF_ANGSTROM, TARGET, machine
from molden.data.batch import Batch
from molden.data.h5_dataset import open_cache
from molden.errors import MoldenConfigError
from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM
from molden.models.presets import PRESETS
from molden.models.spec import backbone_from_preset, build_model
from molden.objectives.objective import LOSS
from molden.train.config import FinetuneConfig, load_config
from molden.train.data import batch_sampler, epoch_plan, for_model, loader, move, open_split
from molden.train.loop import corruption_generator, take_step
from molden.train.optim import EMA, build_optimizer, build_scheduler
from molden.train.tasks import fill_cutoffs, finetune_task

QM9_CPU_PRESETS = tuple(p for p in CPU_PRESETS
                        if getattr(backbone_from_preset(p), "cutoff_angstrom", 0.0) <= CUTOFF_ANGSTROM + 1e-9)
"""The CPU presets that fit a QM9 cache's 5 Å graphs (gns_oc20_cpu reads 6 Å: an OC20 model)."""

NOISY_NODES_SIGMA_ANGSTROM = 0.02  # Noisy Nodes §5.2, Table 10 (QM9)
DEFAULT_LIMIT = 2000
"""Molecules of the QM9 cache built when none is given (80 % train: 12 batches of 128)."""
PEAK_MATMUL_SIZE = 2048


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a phase's time is its own (CUDA runs ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TimedObjective:
    """The task's objective, adding the seconds of each `corrupt` call to `seconds`."""

    def __init__(self, objective):
        self.objective = objective
        self.seconds = 0.0

    def corrupt(self, batch: Batch, generator: torch.Generator):
        _synchronize(batch.positions.device)
        start = time.perf_counter()
        out = self.objective.corrupt(batch, generator)
        _synchronize(batch.positions.device)
        self.seconds += time.perf_counter() - start
        return out

    def __getattr__(self, name: str):
        return getattr(self.objective, name)


def matmul_peak_flops(threads: int | None = None, size: int = PEAK_MATMUL_SIZE, repeats: int = 7,
                      device: str = "cpu") -> float:
    """The device's fp32 matmul rate (FLOP/s): 2·n³ over the median time of `torch.mm` of two
    n × n float32 matrices, with the current (or `threads`) torch threads, after a warm-up."""
    if threads is not None:
        torch.set_num_threads(threads)
    where = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(where)
    b = torch.randn(size, size, generator=generator).to(where)
    out = torch.empty(size, size, device=where)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        _synchronize(where)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _synchronize(where)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def finetune_config(cache: Path, preset: str, *, max_graphs: int, workers: int, threads: int | None,
                    steps: int, seed: int, device: str = "cpu") -> FinetuneConfig:
    """The config `molden finetune --data CACHE --task qm9 --target homo --noisy-nodes-sigma 0.02
    --model PRESET --max-graphs N --workers W --val-split none` resolves to (cutoffs filled as
    the CLI fills them). Nothing is written: the run folder is never created."""
    data = {
        "data": {"path": str(cache), "max_graphs": max_graphs, "workers": workers, "val_split": None},
        "run": {"out": os.devnull, "steps": steps, "seed": seed, "threads": threads, "device": device},
        "model": {"preset": preset}, "task": "qm9", "targets": [TARGET],
        "noisy_nodes": {"sigma_angstrom": NOISY_NODES_SIGMA_ANGSTROM},
    }
    return load_config(FinetuneConfig, None, fill_cutoffs(data, ("noisy_nodes",)))


def _stream(dataset, config: FinetuneConfig, dtype: torch.dtype) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, batch index in the epoch, collated batch), epoch after epoch, read as the loop
    reads them: one `loader` per epoch over its `epoch_plan`."""
    sampler = batch_sampler(dataset, config.data, seed=config.run.seed, virtual_ranks=1)
    for epoch in itertools.count():
        plan = epoch_plan(sampler, epoch, rank=0, world_size=1, accumulate=1)
        if plan.steps == 0:
            raise MoldenConfigError(f"{config.data.path}: the train split gives no batch")
        flat = [b for step_batches in plan.batches for b in step_batches]
        for index, batch in enumerate(loader(dataset, flat, config.data, dtype, pin=False)):
            yield epoch, index, batch


def _flops(model: torch.nn.Module, objective, batch: Batch, generator: torch.Generator,
           trim_cutoff_angstrom: float | None) -> int:
    """FLOPs (matrix products) of one forward + backward of `objective` on `batch`."""
    inputs, targets = objective.corrupt(batch, generator)
    inputs = for_model(batch, inputs, trim_cutoff_angstrom)
    with FlopCounterMode(display=False) as counter:
        predictions = model(inputs, all_blocks=objective.needs_all_blocks)
        objective.loss(predictions, inputs, targets)[LOSS].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class PresetRun:
    """One preset training as `molden finetune` would: model, optimiser, schedule, EMA and its
    own batch stream; `step()` runs and times one training step."""

    def __init__(self, cache: Path, preset: str, *, steps: int, max_graphs: int, workers: int,
                 threads: int | None, seed: int, device: str = "cpu"):
        self.preset, self.seed = preset, seed
        self.config = config = finetune_config(cache, preset, max_graphs=max_graphs, workers=workers,
                                               threads=threads, steps=steps, seed=seed, device=device)
        self.dataset = open_split(config.data, config.data.train_split)
        self.task = finetune_task(config, self.dataset)
        self.device = torch.device(device)
        dtype = getattr(torch, config.run.dtype)
        torch.manual_seed(seed)
        self.model = build_model(self.task.spec).to(device=self.device, dtype=dtype)
        for module in self.task.modules:
            module.to(self.device)
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.run.steps, config.optim)
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay is not None else None
        self.objective = _TimedObjective(self.task.objective)
        self.batches = _stream(self.dataset, config, dtype)
        self.model.train()

    def step(self) -> dict:
        """One training step: {"step", "data", "corrupt", "compute"} seconds, whether it was
        taken, and (batch, epoch, index) to count its FLOPs later."""
        start = time.perf_counter()
        epoch, index, batch = next(self.batches)
        batch = move(batch, self.device, self.task.trim_cutoff_angstrom)
        _synchronize(self.device)
        loaded = time.perf_counter()
        self.objective.seconds = 0.0
        _, ok = take_step(self.model, self.objective, [batch], [corruption_generator(self.seed, epoch, index)],
                          self.optimizer, device=self.device, grad_clip_norm=self.config.optim.grad_clip_norm,
                          trim_cutoff_angstrom=self.task.trim_cutoff_angstrom)
        self.scheduler.step()
        if ok and self.ema is not None:
            self.ema.update(self.model)
        _synchronize(self.device)
        end = time.perf_counter()
        corrupt = self.objective.seconds
        return {"step": end - start, "data": loaded - start, "corrupt": corrupt, "compute": end - loaded - corrupt,
                "ok": ok, "batch": (batch, epoch, index)}

    def row(self, records: list[dict]) -> dict:
        """Medians over the timed steps' `records` (ms, structures/s, shares, FLOP/s); closes
        the batch stream. `run_train_step_benchmark` adds `peak_fraction`."""
        self.batches.close()
        times = {k: [r[k] for r in records] for k in ("step", "data", "corrupt", "compute")}
        timed = [r["batch"] for r in records]
        flops = [_flops(self.model, self.task.objective, b, corruption_generator(self.seed, e, k),
                        self.task.trim_cutoff_angstrom) for b, e, k in timed]
        structures = [b.num_graphs for b, _, _ in timed]
        achieved = [f / c for f, c in zip(flops, times["compute"])]
        med = statistics.median
        return {
            "preset": self.preset,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "train_structures": len(self.dataset),
            "structures_per_step": med(structures),
            "atoms_per_step": med(int(b.positions.shape[0]) for b, _, _ in timed),
            "step_ms": 1e3 * med(times["step"]),
            "data_ms": 1e3 * med(times["data"]),
            "corrupt_ms": 1e3 * med(times["corrupt"]),
            "compute_ms": 1e3 * med(times["compute"]),
            "structures_per_second": med(n / t for n, t in zip(structures, times["step"])),
            "data_share": med(d / t for d, t in zip(times["data"], times["step"])),
            "corrupt_share": med(c / t for c, t in zip(times["corrupt"], times["step"])),
            "data_graph_share": med((d + c) / t for d, c, t in zip(times["data"], times["corrupt"], times["step"])),
            "gflop_per_step": med(flops) / 1e9,
            "achieved_gflops": med(achieved) / 1e9,
            "skipped_steps": sum(not r["ok"] for r in records),
            "times_s": times,
            "flops": flops,
        }


def preset_rows(cache: Path, presets: Sequence[str], *, steps: int, warmup: int, max_graphs: int, workers: int,
                threads: int | None, seed: int, device: str = "cpu") -> list[dict]:
    """One row per preset (`PresetRun.row`): `warmup` untimed then `steps` timed training steps,
    the presets taking turns step by step, so a busy spell of a shared machine touches them alike."""
    runs = [PresetRun(cache, name, steps=warmup + steps, max_graphs=max_graphs, workers=workers, threads=threads,
                      seed=seed, device=device) for name in presets]
    records: list[list[dict]] = [[] for _ in runs]
    for i in range(warmup + steps):
        for run, kept in zip(runs, records):
            record = run.step()
            if i >= warmup:
                kept.append(record)
    return [run.row(kept) for run, kept in zip(runs, records)]


CACHE_CUTOFF_ANGSTROM = CUTOFF_ANGSTROM + DEFAULT_SKIN_ANGSTROM
"""The cutoff of the cache built when none is given: half an ångström beyond the presets' 5 Å,
as the README advises for training with noise (the graph after noise is filtered from it)."""


def build_qm9_cache(out: Path, limit: int, cutoff_angstrom: float = CACHE_CUTOFF_ANGSTROM) -> Path:
    """A QM9 cache of the first `limit` molecules (qm9pack, graphs at `cutoff_angstrom`) at
    `out`, 10 % of them held out for validation and 10 % for test (QM9's default 10,000 each
    needs the whole set)."""
    from molden.data.splits import SplitConfig
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    run_preprocess(PreprocessConfig(source="qm9", out=out, limit=limit, cutoff_angstrom=cutoff_angstrom,
                                    split=SplitConfig(val=0.1, test=0.1)))
    return out


def graph_after_noise(cache: Path, presets: Sequence[str]) -> str:
    """How the presets' graph after noise is made from `cache`: filtered or searched."""
    with open_cache(cache) as f:
        cutoff, cap = float(f.attrs["cutoff_angstrom"]), int(f.attrs.get("max_num_neighbors", -1))
    widest = max(float(getattr(backbone_from_preset(p), "cutoff_angstrom", cutoff)) for p in presets)
    if cap < 0 and cutoff > widest:
        return f"filtered from the cache's {cutoff:g} Å graphs (moves below {(cutoff - widest) / 2:g} Å)"
    return f"searched (the cache's graphs stop at {cutoff:g} Å{'' if cap < 0 else f', {cap} neighbours at most'})"


def run_train_step_benchmark(cache: Path | None = None, steps: int = 20, warmup: int = 3,
                             presets: Sequence[str] = QM9_CPU_PRESETS, threads: int | None = 2,
                             max_graphs: int = 128, workers: int = 0, seed: int = 0,
                             limit: int = DEFAULT_LIMIT, peak_size: int = PEAK_MATMUL_SIZE, device: str = "cpu") -> dict:
    """{"machine", "setup", "peak", "rows"}: one row per preset (`PresetRun.row`) on the QM9 cache
    `cache` (or one of `limit` molecules built in a temporary folder); the peak from `torch.mm`
    of `peak_size`² matrices."""
    if steps < 1 or warmup < 0 or max_graphs < 1 or workers < 0 or peak_size < 1:
        raise MoldenConfigError("the benchmark needs --steps >= 1, --warmup >= 0, --max-graphs >= 1, --workers >= 0 "
                                "and --peak-size >= 1")
    if not presets:
        raise MoldenConfigError("name at least one model preset")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise MoldenConfigError(f"unknown model presets {unknown}; presets: {', '.join(PRESETS)}")
    if cache is not None and not Path(cache).is_file():
        raise MoldenConfigError(f"--cache {cache}: no such file (build one with `molden preprocess qm9 --out FILE`)")
    if threads is not None:
        torch.set_num_threads(threads)
    built = cache is None
    with tempfile.TemporaryDirectory(prefix="molden_train_step_") as folder:
        if built:
            cache = build_qm9_cache(Path(folder) / "qm9.h5", limit)
        after_noise = graph_after_noise(Path(cache), presets)
        peak_before = matmul_peak_flops(size=peak_size, device=device)
        rows = preset_rows(Path(cache), presets, steps=steps, warmup=warmup, max_graphs=max_graphs, workers=workers,
                           threads=threads, seed=seed, device=device)
        peak_after = matmul_peak_flops(size=peak_size, device=device)
    peak = max(peak_before, peak_after)
    for row in rows:  # fractions of the higher of the two peak measurements
        row["peak_fraction"] = row["achieved_gflops"] * 1e9 / peak
    return {
        "machine": machine(),
        "setup": {"cache": f"temporary QM9 cache of the first {limit} molecules" if built else str(cache),
                  "graph_after_noise": after_noise,
                  "train_structures": rows[0]["train_structures"], "max_graphs": max_graphs, "workers": workers,
                  "target": TARGET, "noisy_nodes_sigma_angstrom": NOISY_NODES_SIGMA_ANGSTROM,
                  "steps": steps, "warmup": warmup, "seed": seed, "dtype": "float32", "device": device},
        "peak": {"matmul_size": peak_size, "gflops": peak / 1e9,
                 "gflops_before": peak_before / 1e9, "gflops_after": peak_after / 1e9},
        "rows": rows,
    }


def _print_table(result: dict) -> None:
    from rich.table import Table

    m, s, p = result["machine"], result["setup"], result["peak"]
    table = Table(title=f"QM9 HOMO + Noisy Nodes (σ {s['noisy_nodes_sigma_angstrom']} Å), batches of {s['max_graphs']}, "
                        f"{s['workers']} workers; {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
                        f"medians of {s['steps']} steps; fp32 matmul peak {p['gflops']:.1f} GFLOP/s; "
                        f"graph after noise {s['graph_after_noise']}")
    for column in ("preset", "parameters", "ms/step", "ms data", "ms corrupt", "ms compute", "structures/s",
                   "data+graph %", "GFLOP/step", "GFLOP/s", "% of peak"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for r in result["rows"]:
        table.add_row(r["preset"], f"{r['parameters']:,}", f"{r['step_ms']:.1f}", f"{r['data_ms']:.2f}",
                      f"{r['corrupt_ms']:.2f}", f"{r['compute_ms']:.1f}", f"{r['structures_per_second']:,.0f}",
                      f"{100 * r['data_graph_share']:.1f}", f"{r['gflop_per_step']:.2f}", f"{r['achieved_gflops']:.1f}",
                      f"{100 * r['peak_fraction']:.1f}")
    print_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="a QM9 cache (molden preprocess qm9); default: build one")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="molecules of the cache built without --cache")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (medians reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--presets", nargs="+", default=list(QM9_CPU_PRESETS), help="model presets to time")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--max-graphs", type=int, default=128, help="molecules per batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--peak-size", type=int, default=PEAK_MATMUL_SIZE, help="n of the n × n matmul timed for the peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run_train_step_benchmark(args.cache, args.steps, args.warmup, args.presets, args.threads,
                                          args.max_graphs, args.workers, args.seed, args.limit, args.peak_size,
                                          args.device)
    except MoldenConfigError as error:
        parser.exit(2, f"error: {error}\n")
    _print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
