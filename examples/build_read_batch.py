"""End to end with molden's Python API: build a small cache, read it, batch it, build graphs.

    python examples/build_read_batch.py --workdir /tmp/molden_example

1. Write a small extxyz with ASE: copper crystals, Pt(111) slabs with a fixed bottom layer and
   methane molecules, each with EMT energies (eV) and forces (eV/Å).
2. Build an HDF5 graph cache from it with `run_preprocess` (radius graphs at 4 Å, splits).
3. Read the train split with `H5Dataset` and batch structures with `collate`.
4. Rebuild the graph of the batch on the fly with `molden.graph.radius_graph` and check that it
   matches the cached graph, and that `edge_vectors(batch)` equals the Cartesian shifts
   `radius_graph` returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from molden.data.batch import collate
from molden.data.h5_dataset import H5Dataset
from molden.graph import edge_vectors, radius_graph
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

CUTOFF_ANGSTROM = 4.0


def write_frames(path: Path, n: int = 12, seed: int = 0) -> Path:
    """`n` frames (bulk Cu, Pt slabs, CH4) with EMT energies and forces, as extxyz."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        if k % 3 == 0:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        elif k % 3 == 1:
            atoms = fcc111("Pt", (2, 2, 3), vacuum=6.0)
            atoms.info.pop("adsorbate_info", None)  # a dict extxyz cannot store
            atoms.set_constraint(FixAtoms(indices=range(4)))  # bottom layer
        else:
            atoms = molecule("CH4")
            atoms.center(vacuum=4.0)
            atoms.pbc = False
        # Every frame carries tags (ASE builds them only for slabs): a cache keeps the fields
        # of its first structure and refuses later structures that have more.
        atoms.set_tags(atoms.get_tags())
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    ase.io.write(path, frames)
    return path


def sorted_edges(edge_index: torch.Tensor, shifts: torch.Tensor) -> np.ndarray:
    """Edges as rows (i, j, shift) in one fixed order, to compare two graphs."""
    rows = torch.cat([edge_index.T.to(shifts.dtype), shifts], dim=1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def main(workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    source = write_frames(workdir / "frames.extxyz")

    # 1-2. Library call behind `molden preprocess ase frames.extxyz --out frames.h5 --cutoff 4`.
    cache = workdir / "frames.h5"
    cache.unlink(missing_ok=True)
    summary = run_preprocess(PreprocessConfig(source="ase", inputs=[source], out=cache, cutoff_angstrom=CUTOFF_ANGSTROM))
    print(f"cache {summary.path}: {summary.n_structures} structures, {summary.n_edges} edges, splits {summary.splits}")

    # 3. Read one split and batch it (float64 here so the checks below can be exact).
    train = H5Dataset(cache, "train")
    batch = collate([train[k] for k in range(len(train))], dtype=torch.float64)
    print(f"batch: {batch.num_graphs} graphs, {batch.positions.shape[0]} atoms, {batch.edge_index.shape[1]} edges")

    # 4. Graphs built on the fly from the batch (what a model does after moving atoms).
    edge_index, edge_shift = radius_graph(
        batch.positions, CUTOFF_ANGSTROM, cell=batch.cell, pbc=batch.pbc, batch=batch.batch
    )
    vectors = edge_vectors(batch)  # from the cached graph: pos[j] + S @ cell - pos[i], Å
    rebuilt = batch.positions[edge_index[1]] + edge_shift - batch.positions[edge_index[0]]
    cached = sorted_edges(batch.edge_index, vectors)
    fresh = sorted_edges(edge_index, rebuilt)
    same_graph = cached.shape == fresh.shape and np.allclose(cached, fresh, rtol=0, atol=1e-9)
    lengths = vectors.norm(dim=1)
    print(f"on-the-fly graph equals the cached one: {same_graph}; "
          f"edge lengths {lengths.min():.3f}-{lengths.max():.3f} Å (cutoff {CUTOFF_ANGSTROM} Å)")
    if not same_graph:
        raise SystemExit("the graph built on the fly differs from the cached graph")
    return {"n_structures": summary.n_structures, "n_edges": int(batch.edge_index.shape[1]),
            "max_edge_length": float(lengths.max()), "same_graph": same_graph}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("molden_example"), help="where to write the files")
    main(parser.parse_args().workdir)
