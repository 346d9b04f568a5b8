"""Radius-graph benchmark: molden's public `radius_graph` against the peers listed in
BENCHMARKS.md, on the same systems.

Run as `python -m molden.bench.radius_graph --out bench.json`. Each case first checks that
every peer finds the same set of pairs (i, j, S) as molden, then times molden and the peer
alternately, repeat by repeat (so that drifting machine load hits both alike), after a
warm-up, as medians. ratio = peer time / molden time (> 1 means molden is faster). molden is
timed as a user calls it: `radius_graph` with Cartesian shifts, one call per case.
Peers that are not installed get a row saying how to install them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.collections import g2
from ase.neighborlist import neighbor_list as ase_neighbor_list

from molden.bench.tables import print_table
from molden.graph import backend_for, neighbor_list, radius_graph


@dataclass(frozen=True)
class Case:
    """One benchmark input: a list of systems searched with one cutoff (Å)."""

    name: str
    systems: list[Atoms]
    cutoff: float


def oc20_like_slab(seed: int = 0) -> Atoms:
    """Cu(111) 4x4x4 slab with CO on top, pbc (T, T, F): 66 atoms, OC20-sized."""
    slab = fcc111("Cu", (4, 4, 4), vacuum=10.0)
    add_adsorbate(slab, molecule("CO"), 2.0, "ontop")
    slab.rattle(0.05, seed=seed)
    return slab


def qm9_like_molecules(count: int, seed: int = 0) -> list[Atoms]:
    """Small organic molecules from ASE's g2 set (<= 29 atoms), randomly rotated; no cell."""
    rng = np.random.default_rng(seed)
    pool = [g2[name] for name in g2.names if len(g2[name]) <= 29 and len(g2[name]) > 1]
    molecules = []
    for k in range(count):
        atoms = pool[k % len(pool)].copy()
        atoms.rotate(float(rng.uniform(0, 360)), tuple(rng.normal(size=3)), center="COP")
        molecules.append(atoms)
    return molecules


SCALING_REPEATS = (3, 6, 10, 20, 29)
"""Cubic fcc Cu supercells of 4·n³ atoms: 108, 864, 4,000, 32,000 and 97,556 atoms."""
QUICK_SCALING_REPEATS = (3, 6)
SCALING_CUTOFF = 5.0
ASE_MAX_ATOMS = 40_000
"""ASE's pure-numpy neighbour list is skipped above this (minutes and GBs on 100k atoms)."""


def bulk_copper(repeat: int) -> Atoms:
    """Cubic fcc Cu (a = 3.6 Å) repeated `repeat` times along each axis: 4·repeat³ atoms."""
    return bulk("Cu", "fcc", a=3.6, cubic=True).repeat((repeat,) * 3)


def benchmark_cases(quick: bool = False) -> list[Case]:
    """Molecules, slabs and the bulk crystals of the scaling series (`scaling_case`)."""
    crystals = [bulk_copper(n) for n in (QUICK_SCALING_REPEATS if quick else SCALING_REPEATS)]
    largest_with_ase = max((c for c in crystals if len(c) <= ASE_MAX_ATOMS), key=len)
    slabs, molecules = (8, 64) if quick else (64, 256)
    return [
        Case("OC20-like slab x1", [oc20_like_slab()], 6.0),
        Case(f"OC20-like slabs x{slabs}", [oc20_like_slab(s) for s in range(slabs)], 6.0),
        Case(f"QM9-like molecules x{molecules}", qm9_like_molecules(molecules), 5.0),
        *(Case(f"bulk Cu {len(c)} atoms", [c], SCALING_CUTOFF) for c in crystals),
        Case(f"bulk Cu {len(largest_with_ase)} atoms", [largest_with_ase], 6.0),
    ]


def scaling_case(row: dict) -> bool:
    """Whether a result row belongs to the scaling series (bulk Cu at the scaling cutoff)."""
    return row["case"].startswith("bulk Cu") and row["cutoff_angstrom"] == SCALING_CUTOFF


def _interleaved_ms(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median ms of each run, timed alternately within every repeat, after one warm-up each.

    The order flips every repeat: a run that follows another pays for what that one left
    behind (vesin's OpenMP threads spin for a while after a call), so none always goes first.
    """
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for repeat in range(repeats):
        order = list(range(len(runs)))
        for k in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def _molden_runner(case: Case, device: str) -> tuple[Callable[[], object], np.ndarray]:
    """A runner of the public `radius_graph` on the case, and molden's (i, j, S) rows."""
    systems = case.systems
    positions = torch.tensor(np.concatenate([a.positions for a in systems]), device=device)
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), device=device)
    pbc = torch.tensor(np.stack([a.pbc for a in systems]), device=device)
    n_node = [len(a) for a in systems]

    def run() -> object:
        found = radius_graph(positions, case.cutoff, cell=cell, pbc=pbc, n_node=n_node)
        if device != "cpu":
            torch.cuda.synchronize()
        return found

    edge_index, unit_shifts = neighbor_list(positions, case.cutoff, cell=cell, pbc=pbc, n_node=n_node)
    edge_index_rg, shifts = run()
    # The timed function gives the same graph, with shifts = unit_shifts @ cell.
    assert torch.equal(edge_index_rg, edge_index)
    system = torch.repeat_interleave(torch.arange(len(systems), device=device), torch.tensor(n_node, device=device))
    expected = torch.einsum("ek,ekx->ex", unit_shifts.to(cell.dtype), cell[system[edge_index[0]]])
    assert torch.allclose(shifts, expected, rtol=0, atol=1e-9)
    rows = np.column_stack([edge_index.T.cpu().numpy(), unit_shifts.cpu().numpy()]).astype(np.int64)
    return run, _lexsorted(rows)


def _lexsorted(rows: np.ndarray) -> np.ndarray:
    """[E, 5] rows (i, j, S0, S1, S2) sorted lexicographically."""
    return rows[np.lexsort(rows.T[::-1])] if len(rows) else rows.reshape(0, 5)


def _batched_rows(systems: list[Atoms], per_system: Callable[[int, Atoms], tuple]) -> np.ndarray:
    """Rows of a peer run system by system: (i, j, S) with atom indices offset as in a batch."""
    offsets = np.cumsum([0] + [len(a) for a in systems])
    rows = []
    for k, atoms in enumerate(systems):
        i, j, shifts = per_system(k, atoms)
        rows.append(np.column_stack([i + offsets[k], j + offsets[k], shifts]).astype(np.int64))
    return _lexsorted(np.concatenate(rows))


@dataclass(frozen=True)
class Peer:
    """A peer's timed call and the (i, j, S) rows it finds, or why it is not run."""

    run: Callable[[], object] | None = None
    rows: Callable[[], np.ndarray] | None = None
    note: str = ""


def _peer_runners(case: Case, device: str) -> dict[str, Peer]:
    """Per peer (BENCHMARKS.md lists them) its runner and rows, or a note saying why not run."""
    systems, cutoff = case.systems, case.cutoff
    peers: dict[str, Peer] = {}
    if importlib.util.find_spec("vesin"):
        import vesin

        calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)
        peers["vesin"] = Peer(
            lambda: [calculator.compute(a.positions, a.cell.array, a.pbc, "ijS") for a in systems],
            lambda: _batched_rows(systems, lambda _, a: calculator.compute(a.positions, a.cell.array, a.pbc, "ijS")),
        )
    else:
        peers["vesin"] = Peer(note="not installed: pip install vesin")
    if importlib.util.find_spec("matscipy"):
        from matscipy.neighbours import neighbour_list

        # matscipy needs an invertible cell; a box around a non-periodic molecule changes nothing.
        boxed = [_with_box(a, cutoff) for a in systems]
        peers["matscipy"] = Peer(
            lambda: [neighbour_list("ijS", a, cutoff) for a in boxed],
            lambda: _batched_rows(boxed, lambda _, a: neighbour_list("ijS", a, cutoff)),
        )
    else:
        peers["matscipy"] = Peer(note="not installed: pip install matscipy (or molden[bench])")
    peers["ase"] = Peer(
        lambda: [ase_neighbor_list("ijS", a, cutoff) for a in systems],
        lambda: _batched_rows(systems, lambda _, a: ase_neighbor_list("ijS", a, cutoff)),
    )
    peers["torch-cluster"] = _torch_cluster_peer(case, device)
    peers["vesin.torch"] = _vesin_torch_peer(case, device)
    peers["nvalchemiops"] = _nvalchemi_peer(case, device)
    return peers


def _nvalchemi_peer(case: Case, device: str) -> Peer:
    """nvalchemi-toolkit-ops (NVIDIA Warp kernels): one batched call over the case, through the
    prepared state its documentation recommends for repeated calls (the method it picks itself
    and the buffers are settled once, outside the timing, as a relaxation or MD loop would while
    the atoms stay within the bounds it prepared; molden's timed call does all of its work)."""
    if not _importable("nvalchemiops.torch.neighbors"):
        return Peer(note="not installed: pip install nvalchemi-toolkit-ops (brings warp-lang)")
    import warp

    warp.config.quiet = True  # its start-up banner would interleave with the table
    from nvalchemiops.torch.neighbors import neighbor_list as nv_neighbor_list
    from nvalchemiops.torch.neighbors import prepare_neighbor_list

    systems = case.systems
    counts = torch.tensor([len(a) for a in systems])
    positions = torch.tensor(np.concatenate([a.positions for a in systems]), device=device)
    batch_idx = torch.repeat_interleave(torch.arange(len(systems), dtype=torch.int32), counts).to(device)
    batch_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(device=device, dtype=torch.int32)
    periodic = any(a.pbc.any() for a in systems)
    # Molecules go without a cell: nvalchemi bounds them itself (a zero cell is refused).
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), device=device) if periodic else None
    pbc = torch.tensor(np.stack([a.pbc for a in systems]), device=device) if periodic else None
    where = dict(cell=cell, pbc=pbc, batch_idx=batch_idx, batch_ptr=batch_ptr, return_neighbor_list=True)
    state = prepare_neighbor_list(positions, case.cutoff, **where)

    def run() -> tuple:
        found = nv_neighbor_list(positions, state=state, **where)
        if device != "cpu":
            torch.cuda.synchronize()
        return found

    def rows() -> np.ndarray:
        pairs, _, *shifts = run()
        unit_shifts = shifts[0].cpu().numpy() if shifts else np.zeros((pairs.shape[1], 3), dtype=np.int64)
        return _lexsorted(np.column_stack([pairs.T.cpu().numpy(), unit_shifts]).astype(np.int64))

    return Peer(run, rows)


def _vesin_torch_peer(case: Case, device: str) -> Peer:
    """vesin-torch: vesin's cell list on torch tensors (CPU or CUDA), one call per system."""
    if not _importable("vesin_torch"):
        return Peer(note="not installed: pip install vesin-torch")
    from vesin_torch import NeighborList

    calculator = NeighborList(cutoff=case.cutoff, full_list=True)
    inputs = [(torch.tensor(a.positions, device=device), torch.tensor(a.cell.array, device=device),
               torch.tensor(a.pbc, device=device)) for a in case.systems]

    def run() -> list:
        found = [calculator.compute(points=p, box=c, periodic=b, quantities="ijS") for p, c, b in inputs]
        if device != "cpu":
            torch.cuda.synchronize()
        return found

    def rows() -> np.ndarray:
        found = iter(run())
        return _batched_rows(case.systems, lambda _, a: tuple(t.cpu().numpy() for t in next(found)))

    return Peer(run, rows)


def _torch_cluster_peer(case: Case, device: str) -> Peer:
    """torch-cluster's `radius_graph` (PyG): batched, no periodic images, so molecules only."""
    if not _importable("torch_cluster"):
        return Peer(note="not installed: pip install molden[pyg] (compiles torch-cluster for minutes)")
    if any(a.pbc.any() for a in case.systems):
        return Peer(note="no periodic images: molecules only")
    from torch_cluster import radius_graph as cluster_radius_graph

    systems = case.systems
    positions = torch.tensor(np.concatenate([a.positions for a in systems]), device=device)
    batch = torch.repeat_interleave(
        torch.arange(len(systems), device=device), torch.tensor([len(a) for a in systems], device=device)
    )
    # Every pair: no neighbour cap (torch-cluster keeps 32 per atom by default).
    cap = max(len(a) for a in systems)

    def run() -> torch.Tensor:
        found = cluster_radius_graph(positions, case.cutoff, batch=batch, loop=False, max_num_neighbors=cap)
        if device != "cpu":
            torch.cuda.synchronize()
        return found

    def rows() -> np.ndarray:
        j, i = run().cpu().numpy()  # flow source_to_target: row 0 is the neighbour
        return _lexsorted(np.column_stack([i, j, np.zeros((len(i), 3), dtype=np.int64)]))

    return Peer(run, rows)


def _importable(module: str) -> bool:
    try:  # vesin.torch exists as a module but raises ImportError without vesin-torch
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _with_box(atoms: Atoms, cutoff: float) -> Atoms:
    if abs(np.linalg.det(atoms.cell.array)) > 1e-6:
        return atoms
    boxed = atoms.copy()
    boxed.cell = np.diag(np.ptp(atoms.positions, axis=0) + 2 * cutoff)
    return boxed


def run_radius_graph_benchmark(device: str = "cpu", repeats: int = 7, quick: bool = False) -> list[dict]:
    """Time molden's `radius_graph` and each installed peer on every case; one row per
    (case, peer). `agree` says whether the peer found exactly molden's pairs (i, j, S)."""
    rows = []
    for case in benchmark_cases(quick):
        n_atoms = sum(len(a) for a in case.systems)
        molden_run, molden_rows = _molden_runner(case, device)
        base = {
            "case": case.name,
            "n_systems": len(case.systems),
            "n_atoms": n_atoms,
            "cutoff_angstrom": case.cutoff,
            "n_edges": len(molden_rows),
            "molden_function": "radius_graph",
            "molden_path": backend_for(device),
        }
        for name, peer in _peer_runners(case, device).items():
            if peer.run is None:
                rows.append({**base, "molden_ms": None, "peer": name, "peer_ms": None, "ratio": None, "agree": None, "note": peer.note})
                continue
            if name == "ase" and n_atoms > ASE_MAX_ATOMS:
                rows.append({**base, "molden_ms": None, "peer": name, "peer_ms": None, "ratio": None, "agree": None,
                             "note": f"skipped above {ASE_MAX_ATOMS:,} atoms (minutes)"})
                continue
            agree = bool(np.array_equal(peer.rows(), molden_rows))
            # ASE is pure numpy: one repeat on large systems keeps the run short.
            peer_repeats = 1 if name == "ase" and n_atoms > 5_000 else repeats
            molden_ms, peer_ms = _interleaved_ms([molden_run, peer.run], peer_repeats)
            note = "1 repeat" if peer_repeats == 1 else ""
            rows.append(
                {**base, "molden_ms": molden_ms, "peer": name, "peer_ms": peer_ms, "ratio": peer_ms / molden_ms, "agree": agree, "note": note}
            )
    return rows


def compare_cuda_backends(device: str = "cuda", repeats: int = 7, dtype: torch.dtype = torch.float64) -> list[dict]:
    """molden's two CUDA backends (Triton kernel, torch path) and vesin-torch on the device, on
    every case: one row per case with the edges, whether all found the same (i, j, S), and each
    one's median ms (timed alternately). vesin-torch runs in float64 only (its inputs' dtype).
    `examples/gpu/radius_backends.py` prints it; BENCHMARKS.md records it."""
    rows = []
    for case in benchmark_cases():
        systems = case.systems
        positions = torch.tensor(np.concatenate([a.positions for a in systems]), device=device, dtype=dtype)
        cell = torch.tensor(np.stack([a.cell.array for a in systems]), device=device, dtype=dtype)
        pbc = torch.tensor(np.stack([a.pbc for a in systems]), device=device)
        n_node = [len(a) for a in systems]

        def runner(backend: str) -> Callable[[], tuple]:
            def run() -> tuple:
                found = neighbor_list(positions, case.cutoff, cell=cell, pbc=pbc, n_node=n_node, backend=backend)
                if positions.is_cuda:
                    torch.cuda.synchronize()
                return found
            return run

        found = {}
        for backend in ("torch", "triton"):
            edge_index, unit_shifts = runner(backend)()
            found[backend] = _lexsorted(np.column_stack([edge_index.T.cpu().numpy(), unit_shifts.cpu().numpy()]).astype(np.int64))
        runs = [runner("torch"), runner("triton")]
        vesin = _vesin_torch_peer(case, device) if dtype == torch.float64 else None
        if vesin is not None and vesin.run is not None:
            found["vesin-torch"] = vesin.rows()
            runs.append(vesin.run)
        times = _interleaved_ms(runs, repeats)
        row = {"case": case.name, "n_atoms": sum(n_node), "cutoff_angstrom": case.cutoff, "n_edges": len(found["torch"]),
               "same_pairs": all(np.array_equal(found["triton"], other) for other in found.values()),
               "torch_ms": times[0], "triton_ms": times[1], "torch_over_triton": times[0] / times[1],
               "vesin_torch_ms": None, "vesin_torch_over_triton": None, "dtype": str(dtype).removeprefix("torch.")}
        if len(times) == 3:
            row.update(vesin_torch_ms=times[2], vesin_torch_over_triton=times[2] / times[1])
        rows.append(row)
    return rows


def machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_radius_graph.json", help="JSON results file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="crystals of 108 and 864 atoms only (up to 97,556 otherwise)")
    args = parser.parse_args(argv)
    rows = run_radius_graph_benchmark(args.device, args.repeats, args.quick)
    table = Table(title=f"Radius graph ({args.device}, {torch.get_num_threads()} torch threads)")
    for column in ("case", "cutoff Å", "edges", "molden path", "molden ms", "peer", "peer ms", "ratio", "agree"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["case"], f"{r['cutoff_angstrom']:g}", str(r["n_edges"]), r["molden_path"],
            "-" if r["molden_ms"] is None else f"{r['molden_ms']:.3f}",
            r["peer"], "-" if r["peer_ms"] is None else f"{r['peer_ms']:.3f}",
            escape(r["note"]) if r["ratio"] is None else f"{r['ratio']:.2f}", "-" if r["agree"] is None else str(r["agree"]),
        )
    print_table(table)
    with open(args.out, "w") as handle:
        json.dump({"machine": machine_description(), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
