"""Edge vectors from positions, cell and integer lattice shifts: the one place that turns
`unit_shifts` into Cartesian offsets.

The cache and `neighbor_list` store integer shifts S; the edge vector of (i, j) is
`positions[j] + S @ cell[graph of i] - positions[i]`, recomputed on the model's device from
whatever positions it is given (noised, relaxed), so vectors never disagree with positions.

Speed (issue 12): gathering a 3x3 cell per edge moves nine floats per edge and cost more than
half of vesin's whole search on a 32,000-atom crystal. With one cell this is one [E, 3] @ [3, 3]
matmul; with host-side edge counts (edges come system after system) it is one matmul per
system with a non-zero cell, and molecules without a cell cost nothing. The per-edge gather is
left for device tensors without host counts, where reading counts would synchronise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from molden.data.batch import Batch

# Below this many edges per system on average, one gather beats a Python loop of matmuls.
_MIN_EDGES_PER_MATMUL = 512


def cartesian_shifts(
    unit_shifts: Tensor,
    cell: Tensor,
    edge_graph: Tensor | None = None,
    *,
    edge_counts: Tensor | Sequence[int] | np.ndarray | None = None,
) -> Tensor:
    """[E, 3] Cartesian image offsets `unit_shifts[e] @ cell[graph of edge e]`, Å.

    Args:
        unit_shifts: [E, 3] integer (any integer or float dtype) lattice offsets.
        cell: [3, 3] or [B, 3, 3] lattice vectors as rows, Å, on the shifts' device; its dtype
            is the result's. One cell (or B = 1) is one matmul for every edge.
        edge_graph: [E] long graph index of each edge; needed when B > 1 and `edge_counts`
            is not on the host.
        edge_counts: [B] edges per graph, when edges come graph after graph (as
            `radius_graph` and `Batch` give them). Host counts (a CPU tensor, array or list)
            with a CPU cell give one matmul per graph whose cell is not zero and no work for
            graphs without a cell; counts on a device are not read (that would synchronise).
    Differentiable with respect to `cell`.
    """
    dtype = cell.dtype
    if cell.ndim == 2 or cell.shape[0] == 1:
        return unit_shifts.to(dtype) @ cell.reshape(3, 3)
    n_edges = unit_shifts.shape[0]
    counts = _host_counts(edge_counts) if cell.device.type == "cpu" else None
    if counts is not None and len(counts) == cell.shape[0] and int(counts.sum()) == n_edges:
        with_cell = np.flatnonzero(cell.detach().numpy().reshape(-1, 9).any(axis=1) & (counts > 0))
        if len(with_cell) == 0:
            return torch.zeros(n_edges, 3, dtype=dtype, device=cell.device)
        if len(with_cell) == 1 or n_edges >= _MIN_EDGES_PER_MATMUL * len(with_cell):
            return _per_graph_matmuls(unit_shifts, cell, counts, with_cell)
        if edge_graph is None:
            edge_graph = torch.repeat_interleave(torch.from_numpy(counts), output_size=n_edges)
    if edge_graph is None:
        raise ValueError("cartesian_shifts needs edge_graph or host edge_counts for several cells")
    # Per-edge gather: nine floats per edge, but no host synchronisation on a device.
    return torch.bmm(unit_shifts.to(dtype).unsqueeze(1), cell[edge_graph]).squeeze(1)


def _host_counts(edge_counts) -> np.ndarray | None:
    if edge_counts is None:
        return None
    if isinstance(edge_counts, Tensor):
        if edge_counts.device.type != "cpu":
            return None
        return edge_counts.numpy().astype(np.int64, copy=False)
    return np.asarray(edge_counts, dtype=np.int64)


def _per_graph_matmuls(unit_shifts: Tensor, cell: Tensor, counts: np.ndarray, with_cell: np.ndarray) -> Tensor:
    """One [E_b, 3] @ [3, 3] per graph b in `with_cell`; zero rows for the others."""
    n_edges, dtype = unit_shifts.shape[0], cell.dtype
    stops = np.cumsum(counts)
    starts = stops - counts
    if len(with_cell) == len(counts) or counts[with_cell].sum() == n_edges:
        out = torch.empty(n_edges, 3, dtype=dtype)
    else:
        out = torch.zeros(n_edges, 3, dtype=dtype)
    shifts = unit_shifts.to(dtype)
    blocks = [(int(starts[b]), int(stops[b]), int(b)) for b in with_cell]
    if cell.requires_grad and torch.is_grad_enabled():
        # out= does not record autograd; keep the graph with a scatter of the blocks.
        parts = [shifts[a:z] @ cell[b] for a, z, b in blocks]
        index = torch.cat([torch.arange(a, z) for a, z, _ in blocks])
        return out.index_put((index,), torch.cat(parts))
    for a, z, b in blocks:
        torch.matmul(shifts[a:z], cell[b], out=out[a:z])
    return out


def edge_vectors(batch: Batch, positions: Tensor | None = None) -> Tensor:
    """[E, 3] vectors pos[j] + shift - pos[i], Å, from `positions` (default: the batch's).

    Pass noised positions to get their vectors over the batch's graph.
    """
    pos = batch.positions if positions is None else positions
    i, j = batch.edge_index
    cell = batch.cell.to(pos.dtype)
    edge_graph = None if cell.device.type == "cpu" else batch.batch[i]
    return pos[j] - pos[i] + cartesian_shifts(batch.unit_shifts, cell, edge_graph, edge_counts=batch.n_edge)
