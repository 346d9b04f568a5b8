"""Verlet lists against a search at every call, on a relaxation-like trajectory (issue 15).

`python -m molden.bench.verlet [--sizes 1 64] [--calls 60] [--skins 0.3 0.5 1.0] [--device cpu]`

- Systems: the relax benchmark's OC20-sized slabs (65–67 atoms, `molden.bench.relax`), the
  6 Å cutoff of `gns_oc20_cpu`, float32 positions as the model sees them.
- Trajectory: every call moves every free atom by a random step of 0.02 Å per axis (an
  L-BFGS step late in a relaxation; OC20's maxstep is 0.04 Å), seeded, the same for every
  skin; the first call of each skin is not timed.
- Checked before timed: at every call of every skin the pairs are compared with a fresh
  search (`agree`); the timings come from a second pass over the same trajectory.
- With `--relax-repeats R`, also whole relaxations: molden's batched L-BFGS on the relax
  benchmark's model (`gns_oc20_cpu`, random weights, float32) and 64 systems, `--relax-steps`
  steps (fmax 0), searching at every step against the Verlet lists, alternating R times;
  medians. This is where a user sees the skin: the graph's share of a step.
- Peer, same run, same trajectory: ASE's `NeighborList` with the same skin (`NewPrimitiveNeighborList`,
  one per system, `update` then the pairs closer than the cutoff, as an ASE calculator gathers
  them), checked by its pair count at every call and its pairs at the last.
- Reported: ms per call (the mean over the calls: searches come in bursts, and a run pays them all), `searched`: systems searched per call on
  average (B for a search at every call), and `speedup` = time of the search at every call /
  time with the skin, same run; for the peer, `ratio` = its time / molden's at the same skin
  (> 1: molden is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from molden.bench.tables import print_table
from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import Batch, collate
from molden.graph.verlet import VerletGraph

CUTOFF_ANGSTROM = 6.0
STEP_ANGSTROM = 0.02


def trajectory(batch: Batch, calls: int, seed: int = 0) -> list[torch.Tensor]:
    """`calls` positions [N, 3]: a random walk of the free atoms, `STEP_ANGSTROM` per axis."""
    rng = np.random.default_rng(seed)
    free = torch.ones(len(batch.positions), 1, dtype=batch.positions.dtype, device=batch.positions.device)
    if batch.fixed is not None:
        free = (~batch.fixed)[:, None].to(batch.positions.dtype)
    positions, out = batch.positions, []
    for _ in range(calls):
        step = torch.from_numpy(rng.uniform(-STEP_ANGSTROM, STEP_ANGSTROM, positions.shape))
        positions = positions + step.to(positions) * free
        out.append(positions)
    return out


def _pairs(out: Batch) -> np.ndarray:
    """[E, 5] (i, j, S) rows in lexicographic order: the pair set, comparable with `==`."""
    rows = torch.cat([out.edge_index.T, out.unit_shifts.long()], dim=1).cpu().numpy()
    return rows[np.lexsort(rows.T[::-1])]


def _timed_pass(graph: VerletGraph, batch: Batch, path: Sequence[torch.Tensor], device: torch.device) -> list[float]:
    times = []
    for positions in path:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = graph(batch, positions)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del out
    return times[1:]  # the first call searches every system, whatever the skin


def _ase_verlet_pass(systems, path: Sequence[torch.Tensor], counts: np.ndarray, skin: float) -> tuple[list[float], list[int], np.ndarray]:
    """ASE's Verlet lists along `path`: seconds per call (the first dropped), pairs per call,
    and the last call's pairs as `_pairs` gives them."""
    from ase.neighborlist import NeighborList

    bounds = np.r_[0, np.cumsum(counts)]
    lists = [NeighborList([CUTOFF_ANGSTROM / 2] * len(a), skin=skin, self_interaction=False, bothways=True) for a in systems]
    atoms = [a.copy() for a in systems]
    frames = [p.detach().cpu().double().numpy() for p in path]
    times, found, rows = [], [], None
    for frame in frames:
        start = time.perf_counter()
        pairs = []
        for k, (a, nl) in enumerate(zip(atoms, lists)):
            a.positions = frame[bounds[k] : bounds[k + 1]]
            nl.update(a)
            cell, pos = a.cell.array, a.positions
            for i in range(len(a)):
                j, offsets = nl.get_neighbors(i)
                d = pos[j] + offsets @ cell - pos[i]
                inside = np.einsum("ij,ij->i", d, d) < CUTOFF_ANGSTROM**2
                pairs.append((bounds[k] + i, bounds[k] + j[inside], offsets[inside]))
        times.append(time.perf_counter() - start)
        found.append(sum(len(j) for _, j, _ in pairs))
        rows = pairs
    last = np.concatenate([np.column_stack([np.full(len(j), i), j, o]) for i, j, o in rows]).astype(np.int64)
    return times[1:], found, last[np.lexsort(last.T[::-1])]


def run_verlet_benchmark(sizes: Sequence[int] = (1, 64), calls: int = 60, skins: Sequence[float] = (0.3, 0.5, 1.0),
                         device: str = "cpu", seed: int = 0, peer_skin: float | None = None) -> list[dict]:
    """Rows per size and skin (molden), and ASE's Verlet lists at `peer_skin` when given."""
    from molden.bench.relax import oc20_like_systems

    if calls < 2 or not sizes or min(sizes) < 1 or any(not k > 0 for k in skins):
        raise ValueError("the Verlet benchmark needs calls >= 2, systems >= 1 and skins > 0")

    device_t = torch.device(device)
    rows = []
    for n in sizes:
        systems = oc20_like_systems(n, seed)
        structures = [replace(structure_from_atoms(a, system_id=f"bench:{k}"), edge_index=None, unit_shifts=None)
                      for k, a in enumerate(systems)]
        batch = collate(structures, dtype=torch.float32).to(device_t)
        path = trajectory(batch, calls, seed)
        fresh = VerletGraph(CUTOFF_ANGSTROM, 0.0)
        expected = [_pairs(fresh(batch, p)) for p in path]
        base_ms = None
        for skin in (0.0, *skins):
            checked = VerletGraph(CUTOFF_ANGSTROM, skin)
            agree = all(np.array_equal(_pairs(checked(batch, p)), pairs) for p, pairs in zip(path, expected))
            graph = VerletGraph(CUTOFF_ANGSTROM, skin)
            times = _timed_pass(graph, batch, path, device_t)
            ms = 1000 * statistics.fmean(times)
            base_ms = ms if skin == 0.0 else base_ms
            rows.append({"tool": "molden", "n_systems": n, "n_atoms": int(batch.n_node.sum()), "calls": calls,
                         "skin_angstrom": skin, "ms_per_call": ms, "searched_per_call": (checked.built - n) / (calls - 1),
                         "speedup": base_ms / ms, "agree": agree, "device": str(device_t)})
        if peer_skin is not None:
            times, found, last = _ase_verlet_pass(systems, path, batch.n_node.cpu().numpy(), peer_skin)
            ms = 1000 * statistics.fmean(times)
            ours = next((r for r in rows if r["n_systems"] == n and r["skin_angstrom"] == peer_skin), None)
            agree = found == [len(pairs) for pairs in expected] and np.array_equal(last, expected[-1])
            rows.append({"tool": "ase NeighborList", "n_systems": n, "n_atoms": int(batch.n_node.sum()), "calls": calls,
                         "skin_angstrom": peer_skin, "ms_per_call": ms, "searched_per_call": None,
                         "speedup": base_ms / ms, "ratio": None if ours is None else ms / ours["ms_per_call"],
                         "agree": agree, "device": "cpu"})
    return rows


def relax_with_and_without(skin: float, *, systems: int = 64, steps: int = 5, repeats: int = 8, device: str = "cpu",
                           seed: int = 0) -> dict:
    """Seconds of molden's L-BFGS over `steps` steps on `systems` slabs, searching at every
    step and with Verlet lists of `skin`, alternating (the order flips every repeat)."""
    import tempfile
    from pathlib import Path

    from molden.bench.relax import oc20_like_systems, random_checkpoints
    from molden.models.checkpoint import load_model
    from molden.relax.driver import relax
    from molden.relax.optimizers import LBFGSSettings
    from molden.relax.providers import ModelProvider

    structures = [structure_from_atoms(a, system_id=f"bench:{k}") for k, a in enumerate(oc20_like_systems(systems, seed))]
    with tempfile.TemporaryDirectory(prefix="molden_bench_verlet_") as folder:
        loaded = load_model(random_checkpoints(Path(folder), seed=seed).s2ef, device=device)
    providers = {0.0: ModelProvider(loaded, skin_angstrom=0.0), skin: ModelProvider(loaded, skin_angstrom=skin)}
    seconds: dict[float, list[float]] = {0.0: [], skin: []}
    for repeat in range(repeats):
        for chosen in (0.0, skin) if repeat % 2 == 0 else (skin, 0.0):
            start = time.perf_counter()
            relax(structures, providers[chosen], method="lbfgs", fmax_ev_per_angstrom=0.0, max_steps=steps,
                  batch_size=systems, lbfgs=LBFGSSettings(curvature_guard=False), device=device)
            seconds[chosen].append(time.perf_counter() - start)
    every, kept = statistics.median(seconds[0.0]), statistics.median(seconds[skin])
    return {"n_systems": systems, "steps": steps, "repeats": repeats, "skin_angstrom": skin,
            "seconds_search_every_step": every, "seconds_verlet": kept, "speedup": every / kept,
            "all_seconds": {str(k): v for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--skins", type=float, nargs="+", default=[0.3, 0.5, 1.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-skin", type=float, default=0.5, help="ASE's NeighborList at this skin (0: no peer)")
    parser.add_argument("--relax-repeats", type=int, default=0, help="also whole relaxations, alternating (0: not)")
    parser.add_argument("--relax-steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = run_verlet_benchmark(args.sizes, args.calls, args.skins, args.device, args.seed, peer_skin=args.peer_skin or None)
    except ValueError as error:
        parser.error(str(error))
    from rich.table import Table

    table = Table(title=f"Verlet lists against a search at every call ({args.device}, cutoff {CUTOFF_ANGSTROM} Å, "
                        f"steps {STEP_ANGSTROM} Å)")
    for column in ("tool", "systems", "atoms", "skin Å", "ms / call", "searched / call", "vs search every call",
                   "peer / molden", "same pairs"):
        table.add_column(column, justify="right")
    for r in rows:
        searched = "-" if r["searched_per_call"] is None else f"{r['searched_per_call']:.2f}"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        table.add_row(r["tool"], str(r["n_systems"]), str(r["n_atoms"]), f"{r['skin_angstrom']:.2f}",
                      f"{r['ms_per_call']:.2f}", searched, f"{r['speedup']:.2f}", ratio, str(r["agree"]))
    print_table(table)
    report: dict = {"graph": rows}
    if args.relax_repeats:
        from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM

        ab = relax_with_and_without(DEFAULT_SKIN_ANGSTROM, steps=args.relax_steps, repeats=args.relax_repeats,
                                    device=args.device, seed=args.seed)
        report["relax"] = ab
        print(f"molden L-BFGS, {ab['n_systems']} systems x {ab['steps']} steps, medians of {ab['repeats']}: "
              f"{ab['seconds_search_every_step']:.2f} s searching every step, {ab['seconds_verlet']:.2f} s with "
              f"{ab['skin_angstrom']} Å Verlet lists ({ab['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
