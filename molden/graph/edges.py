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

import functools
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from molden.data.batch import Batch
from molden.graph.vesin_backend import in_two_threads, reusable_array

# Below this many edges per system on average, one gather beats a Python loop of matmuls.
_MIN_EDGES_PER_MATMUL = 512
_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32}
# Edges per numpy matmul on the host: small enough that BLAS stays single-threaded.
_HOST_BLOCK = 16_384


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
            is the result's.
        edge_graph: [E] long graph index of each edge; needed when B > 1 and `edge_counts`
            is not on the host.
        edge_counts: [B] edges per graph, when edges come graph after graph (as
            `radius_graph` and `Batch` give them). Host counts (a CPU tensor, array or list)
            with a CPU cell replace the per-edge gather by work per graph, and graphs without
            a cell cost nothing; counts on a device are not read (that would synchronise).
    Differentiable with respect to `cell`.
    """
    n_edges, dtype = unit_shifts.shape[0], cell.dtype
    on_host = cell.device.type == "cpu"
    needs_grad = cell.requires_grad and torch.is_grad_enabled()
    if on_host and not needs_grad and cell.numel() == 9 and dtype in _NUMPY_FLOATS:
        one = cell.numpy().reshape(3, 3)
        if n_edges <= _HOST_BLOCK:  # one small product: the fixed cost matters here
            return torch.from_numpy(unit_shifts.numpy().astype(one.dtype) @ one)
        return torch.from_numpy(_host_product(unit_shifts.numpy(), one[None], np.array([n_edges]), np.array([0])))
    cells = cell.reshape(-1, 3, 3)
    counts = _host_counts(edge_counts) if on_host else None
    if counts is None or len(counts) != cells.shape[0] or int(counts.sum()) != n_edges:
        counts = np.array([n_edges]) if cells.shape[0] == 1 and on_host else None
    if counts is not None:
        with_cell = np.flatnonzero(cells.detach().numpy().reshape(-1, 9).any(axis=1) & (counts > 0))
        if not needs_grad and _NUMPY_FLOATS.get(dtype) is not None:
            return torch.from_numpy(_host_product(unit_shifts.numpy(), cells.detach().numpy(), counts, with_cell))
        if len(with_cell) == 0:
            return torch.zeros(n_edges, 3, dtype=dtype)
        if len(with_cell) == 1 or n_edges >= _MIN_EDGES_PER_MATMUL * len(with_cell):
            return _per_graph_matmuls(unit_shifts, cells, counts, with_cell)
        if edge_graph is None:
            edge_graph = torch.repeat_interleave(torch.from_numpy(counts), output_size=n_edges)
    if cells.shape[0] == 1:
        return unit_shifts.to(dtype) @ cells[0]
    if edge_graph is None:
        raise ValueError("cartesian_shifts needs edge_graph or host edge_counts for several cells")
    # Per-edge gather: nine floats per edge, but no host synchronisation on a device.
    return torch.bmm(unit_shifts.to(dtype).unsqueeze(1), cells[edge_graph]).squeeze(1)


def _host_counts(edge_counts) -> np.ndarray | None:
    if edge_counts is None:
        return None
    if isinstance(edge_counts, Tensor):
        if edge_counts.device.type != "cpu":
            return None
        return edge_counts.numpy().astype(np.int64, copy=False)
    return np.asarray(edge_counts, dtype=np.int64).reshape(-1)


def _host_product(shifts: np.ndarray, cells: np.ndarray, counts: np.ndarray, with_cell: np.ndarray) -> np.ndarray:
    """[E, 3] shifts @ cell per graph, in numpy, in blocks of `_HOST_BLOCK` edges.

    Blocks small enough for single-threaded BLAS on purpose: one [E, 3] @ [3, 3] call on
    millions of edges woke BLAS or OpenMP threads that cost several times the product itself
    whenever other work shared the cores (and torch faults its large allocations in 4 KiB
    pages where numpy's get huge pages). Each block's float copy of the shifts stays in cache.
    """
    out = reusable_array("cartesian_shifts", (len(shifts), 3), cells.dtype)
    if len(with_cell) == 1 and len(shifts) <= _HOST_BLOCK and counts[with_cell[0]] == len(shifts):
        return np.matmul(shifts.astype(cells.dtype), cells[with_cell[0]], out=out)
    if len(with_cell) == 0:
        out.fill(0.0)
        return out
    stops = np.cumsum(counts)
    starts = stops - counts
    # Consecutive graphs with the same cell (frames of one system, copies of a slab) form one
    # run of edges: one product per run instead of one per graph.
    flat = cells[with_cell].reshape(len(with_cell), 9)
    new_run = np.ones(len(with_cell), dtype=bool)
    new_run[1:] = (flat[1:] != flat[:-1]).any(axis=1) | (starts[with_cell[1:]] != stops[with_cell[:-1]])
    first = np.flatnonzero(new_run)
    last = np.append(first[1:], len(with_cell)) - 1
    done = 0
    for b, a, z in zip(with_cell[first].tolist(), starts[with_cell[first]].tolist(), stops[with_cell[last]].tolist()):
        out[done:a] = 0.0  # graphs without a cell (or edges) in between
        cell = cells[b]
        for lo in range(a, z, _HOST_BLOCK):
            hi = min(lo + _HOST_BLOCK, z)
            np.matmul(shifts[lo:hi].astype(cells.dtype), cell, out=out[lo:hi])
        done = z
    out[done:] = 0.0
    return out


def mirrored_cartesian_shifts(unit_shifts: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """[E, 3] `unit_shifts @ cell`, Å, in the cell's dtype, for host shifts whose second half
    is the first half negated (a half list and its mirror, as the vesin backend gives one
    system): the first half is multiplied in blocks of `_HOST_BLOCK` edges, the second is its
    negation (exact), half the work of `cartesian_shifts`.
    """
    half = len(unit_shifts) // 2
    out = reusable_array("cartesian_shifts", (len(unit_shifts), 3), cell.dtype)
    if half <= _HOST_BLOCK:
        _mirrored_rows(unit_shifts, cell, out, 0, half)
    else:
        in_two_threads(functools.partial(_mirrored_rows, unit_shifts, cell, out), half)
    return out


def _mirrored_rows(shifts: np.ndarray, cell: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """out[start:stop] = shifts[start:stop] @ cell in blocks of `_HOST_BLOCK` rows, and the
    same rows of the second half of `out` their negation."""
    half = len(out) // 2
    for lo in range(start, stop, _HOST_BLOCK):
        hi = min(lo + _HOST_BLOCK, stop)
        np.matmul(shifts[lo:hi].astype(cell.dtype), cell, out=out[lo:hi])
        np.negative(out[lo:hi], out=out[half + lo : half + hi])


def _per_graph_matmuls(unit_shifts: Tensor, cells: Tensor, counts: np.ndarray, with_cell: np.ndarray) -> Tensor:
    """One [E_b, 3] @ [3, 3] per graph b in `with_cell`, zero rows for the others, kept in
    the autograd graph of `cells`."""
    stops = np.cumsum(counts)
    shifts = unit_shifts.to(cells.dtype)
    blocks = [(int(stops[b] - counts[b]), int(stops[b]), int(b)) for b in with_cell]
    if len(blocks) == 1 and blocks[0][:2] == (0, len(shifts)):
        return shifts @ cells[blocks[0][2]]
    parts = torch.cat([shifts[a:z] @ cells[b] for a, z, b in blocks])
    index = torch.cat([torch.arange(a, z) for a, z, _ in blocks])
    return torch.zeros(len(shifts), 3, dtype=cells.dtype).index_put((index,), parts)


def edges_per_graph(edge_graph: Tensor, num_graphs: int) -> Tensor:
    """[B] long: the edges of each graph, from each edge's graph index [E]. By `index_add`,
    not `bincount`, which reads its input's maximum (a device wait on a GPU)."""
    return torch.zeros(num_graphs, dtype=torch.long, device=edge_graph.device).index_add_(
        0, edge_graph, torch.ones_like(edge_graph))


def edge_vectors(batch: Batch, positions: Tensor | None = None) -> Tensor:
    """[E, 3] vectors pos[j] + shift - pos[i], Å, from `positions` (default: the batch's).

    Pass noised positions to get their vectors over the batch's graph.
    """
    pos = batch.positions if positions is None else positions
    i, j = batch.edge_index
    cell = batch.cell.to(pos.dtype)
    edge_graph = None if cell.device.type == "cpu" else batch.batch[i]
    return pos[j] - pos[i] + cartesian_shifts(batch.unit_shifts, cell, edge_graph, edge_counts=batch.n_edge)
