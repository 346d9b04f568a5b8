"""Edge vectors from positions, cell and integer lattice shifts: the one place that turns
`unit_shifts` into Cartesian offsets.

The cache and `neighbor_list` store integer shifts S; the edge vector of (i, j) is
`positions[j] + S @ cell[graph of i] - positions[i]`, recomputed on the model's device from
whatever positions it is given (noised, relaxed), so vectors never disagree with positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from molden.data.batch import Batch


def cartesian_shifts(unit_shifts: Tensor, cell: Tensor, edge_graph: Tensor) -> Tensor:
    """[E, 3] Cartesian image offsets `unit_shifts @ cell[edge_graph]`, Å.

    Args:
        unit_shifts: [E, 3] integer (any integer or float dtype) lattice offsets.
        cell: [B, 3, 3] lattice vectors as rows, Å; its dtype is the result's.
        edge_graph: [E] long graph index of each edge.
    Differentiable with respect to `cell`.
    """
    return torch.einsum("ek,ekx->ex", unit_shifts.to(cell.dtype), cell[edge_graph])


def edge_vectors(batch: Batch, positions: Tensor | None = None) -> Tensor:
    """[E, 3] vectors pos[j] + shift - pos[i], Å, from `positions` (default: the batch's).

    Pass noised positions to get their vectors over the batch's graph.
    """
    pos = batch.positions if positions is None else positions
    i, j = batch.edge_index
    cell = batch.cell.to(pos.dtype)
    return pos[j] - pos[i] + cartesian_shifts(batch.unit_shifts, cell, batch.batch[i])
