"""Clean-structure graphs for blocks of `Structure`s, as the cache stores them.

Many small structures are built in one batched `neighbor_list` call (the radius graph is
vectorised across systems), then split back per structure with local atom indices. Physically
impossible inputs are caught here, before training: overlapping atoms (an edge shorter than
`min_distance_angstrom`) raise `MoldenInputError` naming the record; atoms with no neighbour
within the cutoff are counted and reported. Before any graph is built, the edges a cutoff
would give are estimated from each structure's size and density, so that an absurd cutoff fails
at once instead of filling memory (`MAX_EDGES_PER_ATOM`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError
from molden.graph.edges import cartesian_shifts
from molden.graph.radius_graph import nearest_neighbors_mask, neighbor_list


@dataclass
class GraphReport:
    """What graph building dropped or found, summed over blocks."""

    edges_dropped_by_max_neighbors: int = 0
    isolated_atoms: int = 0
    structures_with_isolated_atoms: list[str] = field(default_factory=list)

    def add(self, other: GraphReport) -> None:
        self.edges_dropped_by_max_neighbors += other.edges_dropped_by_max_neighbors
        self.isolated_atoms += other.isolated_atoms
        room = 20 - len(self.structures_with_isolated_atoms)  # a few examples are enough to act on
        self.structures_with_isolated_atoms += other.structures_with_isolated_atoms[: max(room, 0)]


MAX_EDGES_PER_ATOM = 1000
"""Largest mean edges per atom a block may have: 6 Å gives 40-80 in metals and 20-30 in QM9
molecules, 12 Å in copper about 600; beyond this, memory and time run away (64k atoms × 1000
edges already hold several GB of indices and shifts)."""


def _inverse_depth(extent: np.ndarray, r: float) -> np.ndarray:
    """Per non-periodic direction, the share of the cutoff sphere's width 2r that falls inside
    the atoms' extent L, on average over the atoms, divided by L (1/Å): (1 - r / 2L) / L when
    r <= L, 1 / 2r beyond (the whole extent is within reach)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r <= extent, (1 - r / (2 * extent)) / extent, 1 / (2 * r))


def estimate_neighbors(structures: Sequence[Structure], cutoff_angstrom: float) -> np.ndarray:
    """Expected neighbours per atom [S] of each structure within `cutoff_angstrom` (Å), from
    sizes alone: atoms per volume times the cutoff sphere's volume. The volume is the cell's
    along periodic axes and the atoms' extent along the others, counting only the part of the
    sphere inside that extent, so a molecule gets at most n - 1 whatever the cutoff and a
    crystal grows as r³. Within about 2× of the true count (low for small molecules and thin
    wires): enough to tell a working cutoff from one that cannot finish."""
    r = float(cutoff_angstrom)
    n = np.array([s.n_atoms for s in structures], np.float64)
    pbc = np.stack([s.pbc for s in structures]).astype(bool)
    cell = np.stack([s.cell for s in structures]).astype(np.float64)
    ball = 4.0 / 3.0 * np.pi * r**3
    periodic = pbc.sum(axis=1)
    estimate = np.zeros(len(structures))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        bulk = periodic == 3
        if bulk.any():
            estimate[bulk] = n[bulk] * ball / np.abs(np.linalg.det(cell[bulk]))
        molecules = np.flatnonzero(periodic == 0)
        if len(molecules):
            positions = np.concatenate([structures[k].positions for k in molecules])
            starts = np.concatenate([[0], np.cumsum(n[molecules].astype(np.int64))[:-1]])
            extent = np.maximum.reduceat(positions, starts, axis=0) - np.minimum.reduceat(positions, starts, axis=0)
            per_volume = np.prod(_inverse_depth(extent, r), axis=1)
            estimate[molecules] = np.minimum(n[molecules] - 1, n[molecules] * ball * per_volume)
        for k in np.flatnonzero((periodic > 0) & (periodic < 3)):  # slabs and wires: rare, few per block
            vectors = cell[k][pbc[k]]
            area = np.sqrt(np.linalg.det(vectors @ vectors.T))  # length, or area, of the periodic part
            free = np.linalg.svd(vectors)[2][len(vectors):]  # directions across the periodic ones
            extent = np.ptp(structures[k].positions @ free.T, axis=0)
            estimate[k] = n[k] * ball / area * np.prod(_inverse_depth(extent, r))
    return np.nan_to_num(estimate, nan=np.inf)


def check_edge_budget(
    structures: Sequence[Structure],
    cutoff_angstrom: float,
    max_edges_per_atom: float = MAX_EDGES_PER_ATOM,
    where: str | Path | None = None,
) -> None:
    """Raise `MoldenConfigError` saying what the cutoff would produce when the estimated
    edges per atom of these structures exceed `max_edges_per_atom`."""
    n_atoms = sum(s.n_atoms for s in structures)
    if not structures or not n_atoms:
        return
    edges = float(np.dot([s.n_atoms for s in structures], estimate_neighbors(structures, cutoff_angstrom)))
    if edges > max_edges_per_atom * n_atoms:
        prefix = f"{where}: " if where else ""
        raise MoldenConfigError(
            f"{prefix}cutoff {cutoff_angstrom:g} Å would give about {edges / n_atoms:.3g} edges per atom "
            f"({edges:.3g} edges for {len(structures):,} structures, {n_atoms:,} atoms, from {_record(structures[0])}); "
            f"the limit is {max_edges_per_atom:,.0f} per atom: choose a smaller --cutoff"
        )


def _record(s: Structure) -> str:
    return f"{s.system_id} frame {s.frame}" if s.system_id else f"frame {s.frame}"


def build_graphs(
    structures: Sequence[Structure],
    cutoff_angstrom: float,
    *,
    max_num_neighbors: int | None = None,
    min_distance_angstrom: float = 0.1,
    where: str | Path | None = None,
    max_edges_per_atom: float | None = MAX_EDGES_PER_ATOM,
) -> tuple[list[Structure], GraphReport]:
    """Each structure with its radius graph (`edge_index` local, integer `unit_shifts`).

    Refuses (`MoldenConfigError`) a cutoff estimated to give more than `max_edges_per_atom`
    edges per atom on average (None: no limit) before building anything."""
    report = GraphReport()
    if not structures:
        return [], report
    if max_edges_per_atom is not None:
        check_edge_budget(structures, cutoff_angstrom, max_edges_per_atom, where)
    n_node = np.array([s.n_atoms for s in structures], np.int64)
    positions = torch.from_numpy(np.concatenate([s.positions for s in structures]))
    cell = torch.from_numpy(np.stack([s.cell for s in structures]))
    pbc = torch.from_numpy(np.stack([s.pbc for s in structures]))
    batch = torch.repeat_interleave(torch.arange(len(structures)), torch.from_numpy(n_node))
    edge_index, unit_shifts = neighbor_list(positions, cutoff_angstrom, cell=cell, pbc=pbc, batch=batch)
    if edge_index.shape[1] > 1 and not bool((edge_index[0, 1:] >= edge_index[0, :-1]).all()):
        # The cache stores edges sorted by centre; numpy's stable sort on int32 is a radix-like
        # pass that is several times faster than torch's on the CPU.
        order = torch.from_numpy(np.argsort(edge_index[0].numpy().astype(np.int32), kind="stable"))
        edge_index, unit_shifts = edge_index[:, order], unit_shifts[order]
    i, j = edge_index
    vectors = positions[j] - positions[i] + cartesian_shifts(unit_shifts, cell, batch[i])
    distances = vectors.norm(dim=1)

    too_close = distances < min_distance_angstrom
    if bool(too_close.any()):
        e = int(torch.nonzero(too_close)[0, 0])
        s = structures[int(batch[i[e]])]
        offset = int(np.concatenate([[0], np.cumsum(n_node)])[int(batch[i[e]])])
        raise MoldenInputError(
            where,
            f"atoms {int(i[e]) - offset} and {int(j[e]) - offset} overlap "
            f"({float(distances[e]):.3g} Å apart, below {min_distance_angstrom} Å)",
            _record(s),
        )
    if max_num_neighbors is not None:
        keep = nearest_neighbors_mask(i, distances, max_num_neighbors, num_nodes=len(positions))
        report.edges_dropped_by_max_neighbors = int((~keep).sum())
        edge_index, unit_shifts, i = edge_index[:, keep], unit_shifts[keep], edge_index[0, keep]

    degree = torch.bincount(i, minlength=len(positions))
    isolated = degree == 0
    if bool(isolated.any()):
        report.isolated_atoms = int(isolated.sum())
        owners = torch.unique(batch[isolated]).tolist()
        report.structures_with_isolated_atoms = [_record(structures[k]) for k in owners[:20]]

    # Edges come sorted by centre atom, so each structure's edges are one contiguous run.
    n_edge = torch.bincount(batch[i], minlength=len(structures)).numpy()
    atom_offsets = np.concatenate([[0], np.cumsum(n_node)[:-1]])
    local = (edge_index - torch.from_numpy(atom_offsets)[batch[i]]).numpy().astype(np.int32)
    shifts = unit_shifts.numpy().astype(np.int32)
    edge_starts = np.concatenate([[0], np.cumsum(n_edge)])
    out = [
        s.with_graph(local[:, edge_starts[k] : edge_starts[k + 1]], shifts[edge_starts[k] : edge_starts[k + 1]])
        for k, s in enumerate(structures)
    ]
    return out, report
