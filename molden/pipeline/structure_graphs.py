"""Clean-structure graphs for blocks of `Structure`s, as the cache stores them.

Many small structures are built in one batched `neighbor_list` call (the radius graph is
vectorised across systems), then split back per structure with local atom indices. Physically
impossible inputs are caught here, before training: overlapping atoms (an edge shorter than
`min_distance_angstrom`) raise `MoldenInputError` naming the record; atoms with no neighbour
within the cutoff are counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from molden.data.structure import Structure
from molden.errors import MoldenInputError
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


def _record(s: Structure) -> str:
    return f"{s.system_id} frame {s.frame}" if s.system_id else f"frame {s.frame}"


def build_graphs(
    structures: Sequence[Structure],
    cutoff_angstrom: float,
    *,
    max_num_neighbors: int | None = None,
    min_distance_angstrom: float = 0.1,
    where: str | Path | None = None,
) -> tuple[list[Structure], GraphReport]:
    """Each structure with its radius graph (`edge_index` local, integer `unit_shifts`)."""
    report = GraphReport()
    if not structures:
        return [], report
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
