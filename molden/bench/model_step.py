"""How long one training step takes on a QM9 batch, for every CPU model preset (issue 13).

`python -m molden.bench.model_step --batch 128 --repeats 21 --threads 2 --out model_step.json`
reads the first `--batch` QM9 molecules (qm9pack), builds their 5 Å graphs, collates them in
float32 and, for every preset ending in `_cpu`, times after a warm-up (medians of the repeats):

- a clean step: `GraphTargetLoss` on HOMO (standardised), forward + backward + Adam step of a
  model with a `GraphScalarHead` (mean readout) on `keys.TARGETS`;
- a Noisy Nodes step (Noisy Nodes §3.3, `noisy_nodes_qm9_cpu`: σ = 0.02 Å, node weight 0.1,
  graph rebuilt at 5 Å): corrupt (noise + radius-graph rebuild) + forward over every block
  iteration + backward + Adam step, the model carrying a `NodeVectorHead` on `keys.NOISE` too;
- `corrupt` alone, and `corrupt` with the clean graph kept (`rebuild_graph=False`), so that
  rebuild share = corrupt / Noisy Nodes step, and the rebuild itself = the difference.

The four measurements are interleaved within each repeat, so a slow spell of the machine
touches all of them alike. Writes a table (rich) and, with `--out`, JSON with the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from molden.bench.tables import print_table
from molden.data import collate
from molden.data.batch import Batch
from molden.data.readers import read_qm9
from molden.errors import MoldenConfigError
from molden.models import GraphScalarHead, Model, NodeVectorHead, keys
from molden.models.presets import PRESETS, build_backbone, preset
from molden.objectives.noisy_nodes import NoisyNodes, noisy_nodes_qm9_cpu
from molden.objectives.objective import LOSS
from molden.objectives.supervised import GraphTargetLoss, TargetNormalizer
from molden.pipeline.structure_graphs import build_graphs

CPU_PRESETS = tuple(name for name in PRESETS if name.endswith("_cpu"))
CUTOFF_ANGSTROM = 5.0  # QM9 cache default, and the cutoff Noisy Nodes' QM9 preset rebuilds at
TARGET = "homo"


def qm9_batch(n_molecules: int, dtype: torch.dtype = torch.float32) -> Batch:
    """The first `n_molecules` QM9 molecules (qm9pack) with their 5 Å graphs, as one `Batch`."""
    structures, _ = build_graphs(list(read_qm9(None, limit=n_molecules)), CUTOFF_ANGSTROM)
    if len(structures) < n_molecules:
        raise MoldenConfigError(f"QM9 gave {len(structures)} molecules, fewer than the batch of {n_molecules}")
    return collate(structures, dtype=dtype)


def _model(name: str, noise_head: bool) -> Model:
    backbone = build_backbone(preset(name))
    heads = {keys.TARGETS: GraphScalarHead(backbone.scalar_dim, 1, readout="mean", squeeze=False)}
    if noise_head:
        vector_dim = backbone.vector_dim if backbone.equivariant else 0
        heads[keys.NOISE] = NodeVectorHead(backbone.scalar_dim, vector_dim)
    return Model(backbone, heads)


class _Step:
    """One training step as the loop runs it: corrupt → forward → loss → backward → Adam."""

    def __init__(self, model: Model, objective, batch: Batch, seed: int):
        self.model, self.objective, self.batch = model, objective, batch
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[float, float]:
        """(seconds in corrupt, seconds in the whole step)."""
        start = time.perf_counter()
        inputs, targets = self.objective.corrupt(self.batch, self.generator)
        corrupted = time.perf_counter()
        predictions = self.model(inputs, all_blocks=self.objective.needs_all_blocks)
        loss = self.objective.loss(predictions, inputs, targets)[LOSS]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        end = time.perf_counter()
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"non-finite loss {float(loss.detach())} in the benchmark step")
        return corrupted - start, end - start


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def preset_row(name: str, batch: Batch, repeats: int, warmup: int, seed: int = 0) -> dict:
    """Median times (ms) of one preset's clean and Noisy Nodes steps and of `corrupt` on `batch`."""
    values = batch.targets[:, list(batch.target_names).index(TARGET)]
    normalizer = TargetNormalizer([TARGET], values.mean()[None], values.std()[None])
    primary = GraphTargetLoss(normalizer)
    noisy_nodes = NoisyNodes(noisy_nodes_qm9_cpu(), primary)
    kept_graph = NoisyNodes(noisy_nodes_qm9_cpu().model_copy(update={"rebuild_graph": False}), primary)
    torch.manual_seed(seed)
    clean_model, noisy_model = _model(name, noise_head=False), _model(name, noise_head=True)
    clean = _Step(clean_model, primary, batch, seed)
    noisy = _Step(noisy_model, noisy_nodes, batch, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    cases = {
        "clean": lambda: clean()[1],
        "noisy": noisy,
        "corrupt": lambda: _timed(lambda: noisy_nodes.corrupt(batch, generator)),
        "corrupt_kept_graph": lambda: _timed(lambda: kept_graph.corrupt(batch, generator)),
    }
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in ("clean", "noisy", "corrupt_in_step", "corrupt", "corrupt_kept_graph")}
    for _ in range(repeats):
        times["clean"].append(cases["clean"]())
        in_step, step = cases["noisy"]()
        times["noisy"].append(step)
        times["corrupt_in_step"].append(in_step)
        times["corrupt"].append(cases["corrupt"]())
        times["corrupt_kept_graph"].append(cases["corrupt_kept_graph"]())
    ms = {k: _median_ms(v) for k, v in times.items()}
    rebuild_ms = max(ms["corrupt"] - ms["corrupt_kept_graph"], 0.0)
    return {
        "preset": name,
        "backbone_parameters": sum(p.numel() for p in clean_model.backbone.parameters() if p.requires_grad),
        "clean_model_parameters": clean_model.n_parameters(),
        "noisy_nodes_model_parameters": noisy_model.n_parameters(),
        "clean_step_ms": ms["clean"],
        "noisy_nodes_step_ms": ms["noisy"],
        "corrupt_ms": ms["corrupt"],
        "corrupt_in_step_ms": ms["corrupt_in_step"],
        "corrupt_kept_graph_ms": ms["corrupt_kept_graph"],
        "rebuild_ms": rebuild_ms,
        "rebuild_share": ms["corrupt"] / ms["noisy"],
        "rebuild_only_share": rebuild_ms / ms["noisy"],
        "clean_structures_per_second": batch.num_graphs / (ms["clean"] / 1e3),
        "noisy_nodes_structures_per_second": batch.num_graphs / (ms["noisy"] / 1e3),
        "times_s": times,
    }


def machine() -> dict:
    """CPU model (/proc/cpuinfo), core count, torch threads and version, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.date.today().isoformat(),
    }


def run_model_step_benchmark(batch_size: int = 128, repeats: int = 21, warmup: int = 3, threads: int | None = 2,
                             presets: Sequence[str] = CPU_PRESETS, seed: int = 0) -> dict:
    """{"machine", "batch", "rows"}: one row per preset (`preset_row`), QM9 batch of `batch_size`."""
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise MoldenConfigError("the benchmark needs batch >= 1, repeats >= 1 and warmup >= 0")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise MoldenConfigError(f"unknown model presets {unknown}; presets: {', '.join(PRESETS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    batch = qm9_batch(batch_size)
    info = {"molecules": batch.num_graphs, "atoms": int(batch.positions.shape[0]), "edges": int(batch.edge_index.shape[1]),
            "cutoff_angstrom": CUTOFF_ANGSTROM, "dtype": str(batch.positions.dtype), "target": TARGET,
            "noisy_nodes": noisy_nodes_qm9_cpu().model_dump()}
    rows = [preset_row(name, batch, repeats, warmup, seed) for name in presets]
    return {"machine": machine(), "batch": info, "repeats": repeats, "warmup": warmup, "rows": rows}


def _print_table(result: dict) -> None:
    from rich.table import Table

    b, m = result["batch"], result["machine"]
    table = Table(title=f"QM9 batch of {b['molecules']} ({b['atoms']} atoms, {b['edges']} edges), "
                        f"{m['cpu']}, {m['torch_threads']} threads, medians of {result['repeats']}")
    for column in ("preset", "parameters", "ms/step clean", "ms/step Noisy Nodes", "ms corrupt",
                   "rebuild share %", "structures/s clean / NN"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for r in result["rows"]:
        table.add_row(r["preset"], f"{r['backbone_parameters']:,}", f"{r['clean_step_ms']:.1f}",
                      f"{r['noisy_nodes_step_ms']:.1f}", f"{r['corrupt_ms']:.2f}", f"{100 * r['rebuild_share']:.1f}",
                      f"{r['clean_structures_per_second']:,.0f} / {r['noisy_nodes_structures_per_second']:,.0f}")
    print_table(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="QM9 molecules per batch")
    parser.add_argument("--repeats", type=int, default=21, help="timed repeats (medians reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--presets", nargs="+", default=list(CPU_PRESETS), help="model presets to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run_model_step_benchmark(args.batch, args.repeats, args.warmup, args.threads, args.presets, args.seed)
    except MoldenConfigError as error:
        parser.exit(2, f"error: {error}\n")
    _print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
