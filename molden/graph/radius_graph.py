"""Radius graphs with periodic images, batched over systems: every pair closer than the cutoff.

The result is ASE's `neighbor_list("ijS", atoms, cutoff)` edge for edge: strict
`distance < cutoff`, every periodic image for any cell (skewed, left-handed, smaller than the
cutoff), partial periodicity, unwrapped positions, no self edge with zero shift but self edges
to periodic images. Non-periodic axes are never wrapped and their cell vectors are ignored.

Edge order: batched systems come one after another. Within a system the torch backend sorts
by (i, j, S); the vesin backend gives vesin's half list then its mirror (deterministic), and
sorts runs of molecules by centre. Sort when an order matters (the cache stores edges sorted
by i).

Backends: on CPU tensors with vesin installed, vesin's C++ cell list (`vesin_backend`; faster
than vesin called system by system, BENCHMARKS.md). Otherwise, and on CUDA, small systems are
brute-forced over image shells, many at once, and large ones go to a vectorised torch cell
list (`cell_list`). Every backend searches slightly beyond the cutoff; then one exact test in
ASE's order of operations decides the pairs near the cutoff, `|pos[j] - pos[i] + S @ cell| <
cutoff`. Exactly at the cutoff (a perfect lattice whose shell distance equals the cutoff) ASE's
own result depends on its BLAS, so edges there are not promised to match ASE.
"""

from __future__ import annotations

import numpy as np
import torch

from molden.errors import MoldenInputError
from molden.graph import cell_list, vesin_backend
from molden.graph.edges import cartesian_shifts
from molden.graph.periodic import complete_cells, image_offsets, shell_counts, wrap_positions
from molden.graph.systems import SystemLayout, system_layout

# Pair-images (atoms^2 x images) a brute-force group may hold at once: ~40 MB in float64.
_BRUTE_FORCE_BUDGET = 500_000
# Above this many atoms a system goes to a cell list (brute force is O(N^2) per image).
_CELL_LIST_MIN_ATOMS = 1_000


def neighbor_list(
    positions: torch.Tensor,
    cutoff: float,
    *,
    cell: torch.Tensor | None = None,
    pbc: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    max_num_neighbors: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (i, j, S) with `|pos[j] + S @ cell - pos[i]| < cutoff`, as ASE's "ijS".

    Args:
        positions: [N, 3] Cartesian positions, Å (may lie outside the cell).
        cutoff: radius, Å (strict inequality).
        cell: [3, 3] or [B, 3, 3] lattice vectors as rows, Å; None means no cell.
        pbc: [3] or [B, 3] bool periodicity; None means not periodic (ASE's default).
        batch: [N] system index per atom, sorted and contiguous; None means one system.
        max_num_neighbors: keep per centre only its k nearest neighbours plus every
            neighbour within 1e-6 Å of the k-th distance (`nearest_neighbors_mask`).
        backend: "auto" (vesin for CPU tensors when installed, else torch) or "torch".
    Returns:
        edge_index [2, E] long (i, j) with atom indices absolute across the batch, and
        unit_shifts [E, 3] int32 (as the cache stores them); systems one after another,
        the order within a system depends on the backend (module docstring).
    """
    positions = positions.detach()
    device = positions.device
    if not cutoff > 0:
        raise MoldenInputError("radius_graph", f"cutoff must be positive, got {cutoff}")
    layout = system_layout(positions, cell, pbc, batch)
    found = vesin_backend.vesin_neighbor_list(positions.numpy(), layout, cutoff) if _uses_vesin(device, backend) else None
    if found is not None:
        edge_index, shifts = torch.from_numpy(found[0]), torch.from_numpy(found[1])
    else:
        edge_index, shifts = _torch_neighbor_list(positions, layout, cutoff)

    if max_num_neighbors is not None:
        cells = torch.from_numpy(layout.cells).to(device)
        batch = _batch_of(layout, device)
        lengths = edge_lengths(positions, cells, batch, edge_index[0], edge_index[1], shifts)
        mask = nearest_neighbors_mask(edge_index[0], lengths, max_num_neighbors, num_nodes=len(positions))
        edge_index, shifts = edge_index[:, mask], shifts[mask]
    return edge_index, shifts


def radius_graph(
    positions: torch.Tensor,
    cutoff: float,
    *,
    cell: torch.Tensor | None = None,
    pbc: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    max_num_neighbors: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`neighbor_list` with Cartesian shifts: (edge_index [2, E], edge_shift [E, 3] Å).

    The edge vector is `positions[j] + edge_shift - positions[i]`; edge_shift is
    `unit_shifts @ cell[system of i]`, differentiable with respect to `cell`.
    """
    edge_index, unit_shifts = neighbor_list(
        positions, cutoff, cell=cell, pbc=pbc, batch=batch, max_num_neighbors=max_num_neighbors, backend=backend
    )
    cells = _cells_like(positions, cell, batch)
    system = batch[edge_index[0]] if batch is not None else torch.zeros_like(edge_index[0])
    return edge_index, cartesian_shifts(unit_shifts, cells, system)


def backend_for(device: torch.device | str, backend: str = "auto") -> str:
    """Which candidate backend `neighbor_list` uses on `device`: "vesin" or "torch"."""
    return "vesin" if _uses_vesin(torch.device(device), backend) else "torch"


def _uses_vesin(device: torch.device, backend: str) -> bool:
    if backend == "auto":
        return device.type == "cpu" and vesin_backend.vesin_available()
    if backend == "torch":
        return False
    raise MoldenInputError("radius_graph", f"backend must be 'auto' or 'torch', got {backend!r}")


def edge_lengths(
    positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, i: torch.Tensor, j: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """[E] |pos[j] - pos[i] + S @ cell|, Å, in ASE's order of operations."""
    vectors = (positions[j] - positions[i]) + cartesian_shifts(shifts, cell.to(positions.dtype), batch[i])
    return torch.sqrt((vectors * vectors).sum(dim=-1))


def nearest_neighbors_mask(
    centers: torch.Tensor,
    distances: torch.Tensor,
    k: int,
    *,
    num_nodes: int | None = None,
    tie_tolerance: float = 1e-6,
) -> torch.Tensor:
    """[E] bool: True for edges among each centre's k nearest, ties included.

    A centre keeps every edge whose length is within `tie_tolerance` Å of its k-th smallest
    length, so the kept set depends only on distances: not on atom order, edge order or the
    choice of unit cell (fairchem #467). `(~mask).sum()` is the number of edges dropped.
    """
    if k < 1:
        raise MoldenInputError("radius_graph", f"max_num_neighbors must be at least 1, got {k}")
    n_edges = centers.numel()
    if n_edges == 0:
        return torch.zeros(0, dtype=torch.bool, device=centers.device)
    num_nodes = int(centers.max()) + 1 if num_nodes is None else num_nodes
    order = torch.argsort(distances, stable=True)
    order = order[torch.argsort(centers[order], stable=True)]
    degree = torch.bincount(centers, minlength=num_nodes)
    first = torch.cumsum(degree, 0) - degree
    sorted_centers = centers[order]
    rank = torch.arange(n_edges, device=centers.device) - first[sorted_centers]
    at_k = rank == k - 1
    kth = torch.full((num_nodes,), float("inf"), dtype=distances.dtype, device=distances.device)
    kth[sorted_centers[at_k]] = distances[order][at_k]
    return distances <= kth[centers] + tie_tolerance


def _batch_of(layout: SystemLayout, device: torch.device) -> torch.Tensor:
    """[N] long system index of every atom."""
    counts = torch.from_numpy(layout.counts).to(device)
    return torch.repeat_interleave(torch.arange(layout.n_systems, device=device), counts)


def _torch_neighbor_list(positions: torch.Tensor, layout: SystemLayout, cutoff: float):
    """(edge_index, unit_shifts) from the torch candidates and one exact test."""
    device, dtype = positions.device, positions.dtype
    cell = torch.from_numpy(layout.cells).to(device)
    pbc = torch.from_numpy(layout.pbc).to(device)
    full_cell = torch.from_numpy(complete_cells(layout.cells, layout.pbc)).to(device=device, dtype=dtype)
    batch = _batch_of(layout, device)
    counts = torch.from_numpy(layout.counts).to(device)
    # Candidates are searched slightly beyond the cutoff so that rounding (wrapping, another
    # backend's arithmetic) can never lose a pair; the exact test below removes the extras.
    scale = cutoff + float(positions.abs().max()) + float(np.abs(layout.cells).sum(axis=(1, 2)).max()) if len(positions) else cutoff
    band = 256 * torch.finfo(dtype).eps * scale
    search = cutoff + band
    offsets = layout.offsets.tolist()
    i, j, shifts, approx = _torch_pairs(positions, batch, counts, offsets, full_cell, pbc, search)
    # One exact test in ASE's arithmetic, only where the candidate distance is within the band.
    keep = approx < cutoff - band
    unsure = (~keep & (approx < search)).nonzero(as_tuple=True)[0]
    if unsure.numel():
        exact = edge_lengths(positions, cell, batch, i[unsure], j[unsure], shifts[unsure])
        keep[unsure] = exact.to(torch.float64) < cutoff  # a float32 cutoff would round
    if not bool(keep.all()):
        i, j, shifts = i[keep], j[keep], shifts[keep]
    return torch.stack([i, j]), shifts


def _cells_like(positions: torch.Tensor, cell: torch.Tensor | None, batch: torch.Tensor | None) -> torch.Tensor:
    n_systems = 1 if batch is None or batch.numel() == 0 else int(batch.max()) + 1
    if cell is None:
        return torch.zeros(n_systems, 3, 3, dtype=positions.dtype, device=positions.device)
    cell = torch.as_tensor(cell).to(device=positions.device, dtype=positions.dtype)
    return cell.expand(n_systems, 3, 3) if cell.ndim == 2 else cell


def _torch_pairs(positions, batch, counts, offsets, full_cell, pbc, search):
    """Candidates of every system in torch: brute force for groups of small systems, a cell
    list for large ones. Returns (i, j, S, distance) sorted by (i, j, S)."""
    wrapped, moved = wrap_positions(positions, batch, full_cell, pbc)
    shells = shell_counts(full_cell, pbc, search)
    n_list, k_list = counts.tolist(), torch.prod(2 * shells + 1, dim=1).tolist()
    parts: list[tuple[torch.Tensor, ...]] = []
    group: list[int] = []
    group_n = group_k = 0

    def flush() -> None:
        nonlocal group, group_n, group_k
        if group:
            parts.append(_brute_force(wrapped, full_cell, shells, counts, offsets, group, search))
        group, group_n, group_k = [], 0, 0

    for b, (n, k) in enumerate(zip(n_list, k_list)):
        if n > _CELL_LIST_MIN_ATOMS or n * n * k > _BRUTE_FORCE_BUDGET:
            flush()
            sl = slice(offsets[b], offsets[b + 1])
            pairs = cell_list.torch_cell_list_candidates(wrapped[sl], full_cell[b], pbc[b], shells[b].tolist(), search)
            parts.append(_sorted_pairs(*pairs, n, shells[b], offsets[b]))
            continue
        # Groups are bounded by their padded size, so one big system never inflates the others.
        if (len(group) + 1) * max(n, group_n) ** 2 * max(k, group_k) > _BRUTE_FORCE_BUDGET:
            flush()
        group.append(b)
        group_n, group_k = max(n, group_n), max(k, group_k)
    flush()
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=positions.device)
        return empty, empty, torch.zeros(0, 3, dtype=torch.long, device=positions.device), positions.new_zeros(0)
    i, j, wrapped_shift, approx = (torch.cat(x) for x in zip(*parts))
    # positions = wrapped + moved @ cell, so the shift for the given positions is:
    return i, j, (wrapped_shift + moved[i] - moved[j]).to(torch.int32), approx


def _brute_force(wrapped, full_cell, shells, counts, offsets, group, search):
    """Candidates for a group of small systems, every pair against every image at once.

    The pair tensor is laid out [system, i, j, image] so that nonzero() already yields the
    documented (i, j, S) order.
    """
    device, dtype = wrapped.device, wrapped.dtype
    systems = torch.tensor(group, device=device)
    n_max = int(counts[systems].max())
    group_shells = shells[systems]
    images = image_offsets(group_shells.max(dim=0).values.tolist(), device)
    image_ok = (images.abs()[None] <= group_shells[:, None, :]).all(dim=-1)  # [G, K]
    slots = torch.arange(n_max, device=device)
    start = torch.tensor([offsets[b] for b in group], device=device)
    atom_ok = slots < counts[systems][:, None]
    atoms = torch.where(atom_ok, start[:, None] + slots, 0)
    points = wrapped[atoms]  # [G, n, 3]
    image_vectors = images.to(dtype) @ full_cell[systems].to(dtype)  # [G, K, 3]
    delta = points[:, None, :, None, :] - points[:, :, None, None, :] + image_vectors[:, None, None]
    dist2 = (delta * delta).sum(dim=-1)  # [G, i, j, K]
    not_self = ~(torch.eye(n_max, dtype=torch.bool, device=device)[:, :, None] & (images == 0).all(-1))
    mask = (dist2 < search**2) & not_self & image_ok[:, None, None, :]
    mask &= atom_ok[:, :, None, None] & atom_ok[:, None, :, None]
    g, i, j, k = mask.nonzero(as_tuple=True)
    return start[g] + i, start[g] + j, images[k], dist2[g, i, j, k].sqrt()


def _sorted_pairs(i, j, wrapped_shift, approx, n_atoms, shells, offset):
    """Order one system's candidates by (i, j, S) and make atom indices absolute."""
    span = 2 * shells + 1
    code = ((wrapped_shift[:, 0] + shells[0]) * span[1] + wrapped_shift[:, 1] + shells[1]) * span[2] + wrapped_shift[:, 2] + shells[2]
    n_codes = int(span.prod())
    if n_atoms * n_atoms * n_codes < 2**62:
        key = (i * n_atoms + j) * n_codes + code
        if key.device.type == "cpu":  # numpy's timsort is several times faster than torch's here
            order = torch.from_numpy(key.numpy().argsort(kind="stable"))
        else:
            order = torch.argsort(key, stable=True)
    else:
        order = torch.argsort(code, stable=True)
        order = order[torch.argsort((i * n_atoms + j)[order], stable=True)]
    return i[order] + offset, j[order] + offset, wrapped_shift[order], approx[order]
