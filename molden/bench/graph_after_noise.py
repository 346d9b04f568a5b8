"""The graph after noise filtered from a wider cache against searched, same run (issue 14).

`python -m molden.bench.graph_after_noise --searched A.h5 --filtered B.h5 [--objective
noisy_nodes|dens|denoising] [--batch 32] [--repeats 50] [--threads 1] [--device cpu] [--json out]`

- A and B hold the same structures (the same `molden preprocess` command but for `--cutoff`:
  checked by system id at every batch), B's graphs wider than A's. The model's cutoff is A's,
  so from A the graph after noise is searched and from B it is filtered (`graph_from_wider`),
  unless an atom moved too far (`filtered` counts the batches that were).
- Objectives, each corrupting as training does (the loop's `move`, `objective.corrupt` and
  `for_model`): Noisy Nodes on QM9 (σ 0.02 Å, Noisy Nodes Table 10), DeNS with its MD17
  recipe (σ 0.05 Å on a quarter of a quarter of the structures, DeNS Table 9; needs forces),
  denoising pre-training (σ 0.02 Å with atom-type masking, Pre-training via Denoising Table 3).
- Each repeat draws `--batch` structures and one noise seed; both caches corrupt the same
  structures with the same seed, in alternating order, and the edges after are compared as
  sets (`same_edges`) before anything is reported. Medians over the repeats after 3 warm-up
  repeats; `speedup` = searched ms / filtered ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from molden.data.batch import Batch
from molden.data.h5_dataset import H5Dataset
from molden.errors import MoldenConfigError, MoldenError
from molden.objectives.dens import DeNS, dens_md17_paper
from molden.objectives.denoising import Denoising
from molden.objectives.noisy_nodes import NoisyNodes, noisy_nodes_qm9_paper
from molden.train.config import default_denoising
from molden.train.data import for_model, move

ObjectiveName = Literal["noisy_nodes", "dens", "denoising"]
WARMUP = 3


class _NoPrimary:
    """Noisy Nodes' node term alone: the primary loss plays no part in the corruption timed."""

    def loss(self, predictions, batch, targets):  # pragma: no cover - never called here
        raise NotImplementedError


def objective_for(name: ObjectiveName, cutoff_angstrom: float):
    """The objective `name` rebuilding its graph at `cutoff_angstrom`, with its paper's noise."""
    if name == "noisy_nodes":
        return NoisyNodes(noisy_nodes_qm9_paper().model_copy(update={"cutoff_angstrom": cutoff_angstrom}), _NoPrimary())
    if name == "dens":
        return DeNS(dens_md17_paper().model_copy(update={"cutoff_angstrom": cutoff_angstrom}))
    if name == "denoising":
        return Denoising(default_denoising(cutoff_angstrom))
    raise MoldenConfigError(f"unknown objective {name!r}: noisy_nodes, dens or denoising")


def _edges(batch: Batch) -> np.ndarray:
    keys = torch.cat([batch.edge_index.T, batch.unit_shifts.long()], dim=1).cpu().numpy()
    return keys[np.lexsort(keys.T[::-1])]


def _corrupted(dataset: H5Dataset, indices: list[int], objective, seed: int, device: torch.device,
               trim: float | None) -> tuple[float, Batch, Batch]:
    clean = move(dataset.collated(indices), device, trim)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    inputs, _ = objective.corrupt(clean, torch.Generator().manual_seed(seed))
    inputs = for_model(clean, inputs, trim)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, clean, inputs


def run_graph_after_noise_benchmark(searched: Path, filtered: Path, objective: ObjectiveName = "noisy_nodes", *,
                                    batch: int = 32, repeats: int = 50, device: str = "cpu", seed: int = 0,
                                    split: str = "train") -> dict:
    """{"setup", "searched_ms", "filtered_ms", "speedup", "filtered_batches", ...}; raises
    `MoldenConfigError` when the caches do not fit the comparison."""
    if batch < 1 or repeats < 1:
        raise MoldenConfigError("the benchmark needs --batch >= 1 and --repeats >= 1")
    narrow, wide = H5Dataset(searched, split), H5Dataset(filtered, split)
    r, w = narrow.cutoff_angstrom, wide.complete_graph_cutoff_angstrom
    if w is None or not w > r:
        raise MoldenConfigError(f"{filtered}: its graphs must be whole radius graphs (no --max-neighbors) wider than "
                                f"{searched}'s {r:g} Å")
    if len(narrow) != len(wide):
        raise MoldenConfigError(f"{searched} and {filtered} hold different structures ({len(narrow)} and {len(wide)} "
                                f"in {split}): preprocess both with the same command but --cutoff")
    torch_device = torch.device(device)
    corrupt = objective_for(objective, r)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"searched": [], "filtered": []}
    filtered_batches = edges = atoms = 0
    for k in range(WARMUP + repeats):
        indices = rng.choice(len(narrow), size=min(batch, len(narrow)), replace=False).tolist()
        order = (("searched", narrow, None), ("filtered", wide, r))
        results = {}
        for name, dataset, trim in (order if k % 2 == 0 else order[::-1]):
            results[name] = _corrupted(dataset, indices, corrupt, seed * 1_000_003 + k, torch_device, trim)
        (t_s, clean_s, out_s), (t_f, clean_f, out_f) = results["searched"], results["filtered"]
        if clean_s.system_ids != clean_f.system_ids:
            raise MoldenConfigError(f"{searched} and {filtered} hold different structures at the same positions")
        if not np.array_equal(_edges(out_s), _edges(out_f)):
            raise AssertionError(f"batch {k}: the filtered graph after noise differs from the searched one")
        if k >= WARMUP:
            times["searched"].append(t_s)
            times["filtered"].append(t_f)
            moved = float((out_f.positions - clean_f.positions).norm(dim=1).max()) if len(out_f.positions) else 0.0
            filtered_batches += moved < (w - r) / 2
            edges += out_s.edge_index.shape[1]
            atoms += len(out_s.positions)
    searched_ms, filtered_ms = (1e3 * statistics.median(times[k]) for k in ("searched", "filtered"))
    return {
        "setup": {"searched": str(searched), "filtered": str(filtered), "objective": objective, "batch": batch,
                  "repeats": repeats, "device": device, "seed": seed, "split": split, "threads": torch.get_num_threads(),
                  "cutoff_angstrom": r, "wider_cutoff_angstrom": w},
        "searched_ms": searched_ms, "filtered_ms": filtered_ms, "speedup": searched_ms / filtered_ms,
        "filtered_batches": filtered_batches, "same_edges": True,
        "atoms_per_batch": atoms / repeats, "edges_per_batch": edges / repeats,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searched", type=Path, required=True, help="cache at the model's cutoff")
    parser.add_argument("--filtered", type=Path, required=True, help="the same structures at a wider cutoff")
    parser.add_argument("--objective", default="noisy_nodes", choices=["noisy_nodes", "dens", "denoising"])
    parser.add_argument("--batch", type=int, default=32, help="structures per batch")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the result here (refused if it exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json is not None and args.json.resolve() in (args.searched.resolve(), args.filtered.resolve()):
        parser.error(f"--json {args.json} is one of the caches")
    if args.json is not None and args.json.exists() and not args.overwrite:
        parser.error(f"--json {args.json} exists: pass --overwrite to replace it")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_graph_after_noise_benchmark(args.searched, args.filtered, args.objective, batch=args.batch,
                                                 repeats=args.repeats, device=args.device, seed=args.seed)
    except MoldenError as error:  # a missing or damaged cache too: one line, no traceback
        parser.error(str(error))
    s = result["setup"]
    print(f"{s['objective']} on {s['device']} ({s['threads']} threads), batches of {s['batch']} "
          f"({result['atoms_per_batch']:.0f} atoms, {result['edges_per_batch']:.0f} edges after), "
          f"{s['repeats']} repeats: searched at {s['cutoff_angstrom']:g} Å {result['searched_ms']:.2f} ms, "
          f"filtered from {s['wider_cutoff_angstrom']:g} Å {result['filtered_ms']:.2f} ms per corruption "
          f"(speedup {result['speedup']:.2f}; {result['filtered_batches']} of {s['repeats']} batches filtered; "
          "same edges in every batch)")
    if args.json:  # whole or not at all: an interrupted write leaves no half file
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(args.json)


if __name__ == "__main__":
    main()
