"""Radius graphs with periodic images, batched over systems: every pair closer than the cutoff.

The result is ASE's `neighbor_list("ijS", atoms, cutoff)` edge for edge: strict
`distance < cutoff`, every periodic image for any cell (skewed, left-handed, smaller than the
cutoff), partial periodicity, unwrapped positions, no self edge with zero shift but self edges
to periodic images. Non-periodic axes are never wrapped and their cell vectors are ignored.

Edge order: batched systems come one after another. Within a system the torch backend sorts
by (i, j, S); the vesin backend gives vesin's half list then its mirror (deterministic), and
sorts runs of molecules by centre; the Triton backend sorts by centre only (deterministic).
Sort when an order matters (the cache stores edges sorted by i).

Backends: on CPU tensors with vesin installed, vesin's C++ cell list (`vesin_backend`; faster
than vesin called system by system, BENCHMARKS.md). Otherwise, and on CUDA, small systems are
brute-forced over image shells, many at once, and large ones go to a vectorised torch cell
list (`cell_list`). On CUDA with Triton installed, "auto" searches every system of the batch
at once with one Triton cell-list kernel instead (`triton_cells`; one more wait, for its output
size): on an H200 it ties the torch path on small inputs and is 1.5–5× faster from about 1,000
atoms or a batch of 64 slabs up (BENCHMARKS.md); `MOLDEN_TRITON_RADIUS_GRAPH=0` keeps torch.
Every backend searches slightly beyond the cutoff; then one exact test in ASE's order of
operations decides the pairs near the cutoff, `|pos[j] - pos[i] + S @ cell| < cutoff`.
Exactly at the cutoff (a perfect lattice whose shell distance equals the cutoff) ASE's own
result depends on its BLAS, so edges there are not promised to match ASE.

Device tensors (the torch backend): sizes and bounds come from the per-system numbers
(`n_node`, cells, pbc), brought to the host in one small copy per call; no per-atom tensor is
copied and no scalar is read on the brute-force path, so the only waits are the selections
whose size the data decide (nonzero; the cell list also reads its bin counts). Pass `n_node`
on the host so that `batch` is never searched.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence

import numpy as np
import torch

from molden.errors import MoldenInputError
from molden.graph import cell_list, vesin_backend
from molden.graph.edges import cartesian_shifts, mirrored_cartesian_shifts
from molden.graph.periodic import complete_cells, image_offsets, shell_counts_np, wrap_positions
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
    n_node: torch.Tensor | Sequence[int] | np.ndarray | None = None,
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
        n_node: [B] atoms per system (systems contiguous, in order), instead of `batch`: on
            a device, give it on the host (a list, array or CPU tensor) and `batch` is never
            read, which saves a copy to the host.
        max_num_neighbors: keep per centre only its k nearest neighbours plus every
            neighbour within 1e-6 Å of the k-th distance (`nearest_neighbors_mask`).
        backend: "auto" (vesin for CPU tensors when installed; the Triton kernel for CUDA
            tensors when Triton is installed, unless `MOLDEN_TRITON_RADIUS_GRAPH=0`;
            else torch), "torch" or "triton".
    Returns:
        edge_index [2, E] long (i, j) with atom indices absolute across the batch, and
        unit_shifts [E, 3] int32 (as the cache stores them); systems one after another,
        the order within a system depends on the backend (module docstring).
    """
    edge_index, shifts, _, _, _ = _neighbor_list(positions, cutoff, cell, pbc, batch, n_node, max_num_neighbors, backend)
    return edge_index, shifts


def radius_graph(
    positions: torch.Tensor,
    cutoff: float,
    *,
    cell: torch.Tensor | None = None,
    pbc: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    n_node: torch.Tensor | Sequence[int] | np.ndarray | None = None,
    max_num_neighbors: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`neighbor_list` with Cartesian shifts: (edge_index [2, E], edge_shift [E, 3] Å).

    The edge vector is `positions[j] + edge_shift - positions[i]`; edge_shift is
    `unit_shifts @ cell[system of i]` (`cartesian_shifts`), in the positions' dtype,
    differentiable with respect to `cell`.
    """
    edge_index, unit_shifts, layout, edge_counts, mirrored = _neighbor_list(
        positions, cutoff, cell, pbc, batch, n_node, max_num_neighbors, backend
    )
    device, dtype = positions.device, positions.dtype
    if cell is None or not layout.pbc.any():  # every shift is zero: nothing to multiply
        return edge_index, torch.zeros(unit_shifts.shape[0], 3, dtype=dtype, device=device)
    host_cell = not (isinstance(cell, torch.Tensor) and cell.requires_grad and torch.is_grad_enabled())
    if mirrored and host_cell and layout.cells.dtype in (np.float32, np.float64):
        # One system's half list and its mirror (vesin backend): half the products, and no
        # torch overhead, a measurable part of an OC20-sized call (BENCHMARKS.md).
        return edge_index, torch.from_numpy(mirrored_cartesian_shifts(unit_shifts.numpy(), layout.cells[0]))
    cells = torch.as_tensor(cell).to(device=device, dtype=dtype)
    if cells.ndim == 3 and cells.shape[0] > 1:
        periodic = layout.pbc.any(axis=1)
        if not periodic.all() and layout.cells[~periodic].any():  # boxes of molecules: S is 0
            cells = cells * torch.from_numpy(periodic).to(device=device, dtype=dtype)[:, None, None]
    edge_graph = None
    if edge_counts is None and layout.n_systems > 1:
        offsets = torch.from_numpy(layout.offsets).to(device)
        edge_graph = torch.searchsorted(offsets, edge_index[0], right=True) - 1
    return edge_index, cartesian_shifts(unit_shifts, cells, edge_graph, edge_counts=edge_counts)


def _neighbor_list(positions, cutoff, cell, pbc, batch, n_node, max_num_neighbors, backend):
    """(edge_index, unit_shifts, layout, edge counts per system on the host or None,
    mirrored: whether the second half of the edges is the first half reversed, (j, i, -S))."""
    positions = positions.detach()
    device = positions.device
    if not cutoff > 0:
        raise MoldenInputError("radius_graph", f"cutoff must be positive, got {cutoff}")
    layout = system_layout(positions, cell, pbc, batch, n_node)
    found = vesin_backend.vesin_neighbor_list(positions.numpy(), layout, cutoff) if _uses_vesin(device, backend) else None
    if found is not None:
        edge_index, shifts, edge_counts = torch.from_numpy(found[0]), torch.from_numpy(found[1]), found[2]
        mirrored = layout.n_systems == 1  # vesin's half list then its mirror (vesin_backend)
    else:
        edge_index, shifts = _torch_neighbor_list(positions, layout, cutoff, triton=_uses_triton(device, backend))
        edge_counts = _sorted_edge_counts(edge_index[0], layout) if device.type == "cpu" else None
        mirrored = False

    if max_num_neighbors is not None:
        cells = torch.from_numpy(layout.cells).to(device)
        system = _batch_of(layout, device)
        lengths = edge_lengths(positions, cells, system, edge_index[0], edge_index[1], shifts)
        mask = nearest_neighbors_mask(edge_index[0], lengths, max_num_neighbors, num_nodes=len(positions))
        edge_index, shifts = edge_index[:, mask], shifts[mask]
        edge_counts, mirrored = None, False
    return edge_index, shifts, layout, edge_counts, mirrored


def _sorted_edge_counts(centres: torch.Tensor, layout: SystemLayout) -> np.ndarray:
    """[B] edges per system from centre indices sorted in ascending order (CPU)."""
    return np.diff(np.searchsorted(centres.numpy(), layout.offsets))


def backend_for(device: torch.device | str, backend: str = "auto") -> str:
    """Which candidate backend `neighbor_list` uses on `device`: "vesin", "triton" or "torch"."""
    device = torch.device(device)
    if _uses_vesin(device, backend):
        return "vesin"
    return "triton" if _uses_triton(device, backend) else "torch"


def _uses_vesin(device: torch.device, backend: str) -> bool:
    if backend == "auto":
        return device.type == "cpu" and vesin_backend.vesin_available()
    if backend in ("torch", "triton"):
        return False
    raise MoldenInputError("radius_graph", f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


TRITON_BY_DEFAULT_ENV = "MOLDEN_TRITON_RADIUS_GRAPH"
"""Set to 0 to make "auto" keep the torch backend for CUDA tensors (in training and relaxation
too). The compiled kernel was checked against ASE on an H200 (tests/test_triton_radius.py,
tests/test_radius_graph.py) and is the CUDA default since then (BENCHMARKS.md)."""


def _uses_triton(device: torch.device, backend: str) -> bool:
    """"auto" takes the Triton kernel for CUDA tensors when Triton is installed, unless
    `MOLDEN_TRITON_RADIUS_GRAPH=0`; "triton" insists, and runs on CPU tensors only under
    Triton's interpreter (`TRITON_INTERPRET=1`)."""
    if backend != "triton":
        return (backend == "auto" and device.type == "cuda" and _env_flag(TRITON_BY_DEFAULT_ENV, default=True)
                and _triton_installed())
    if not _triton_installed():
        raise MoldenInputError("radius_graph", "backend 'triton' needs Triton: pip install triton")
    interpreted = _env_flag("TRITON_INTERPRET", default=False)
    if device.type != "cuda" and not (device.type == "cpu" and interpreted):
        raise MoldenInputError(
            "radius_graph", f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device.type}"
        )
    return True


def _env_flag(name: str, *, default: bool) -> bool:
    """An on/off environment variable: 1/true/on/yes or 0/false/off/no (any case); unset or
    anything else gives `default`."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    return default


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # without importing it (~1 s on a CPU)


def edge_lengths(
    positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, i: torch.Tensor, j: torch.Tensor, shifts: torch.Tensor,
    *, periodic: bool = True, edge_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """[E] |pos[j] - pos[i] + S @ cell|, Å, in ASE's order of operations. `periodic=False`
    promises every S is zero (molecules): the same lengths to the bit (x + 0 is x) without
    the per-edge cell product. `edge_counts` [B] (edges graph after graph, as a `Batch` holds
    them) lets a CPU cell multiply once per graph instead of once per edge (`cartesian_shifts`)."""
    if not periodic:
        return pair_lengths(positions, i, j, None)
    cell = cell.to(positions.dtype)
    on_host = edge_counts is not None and cell.device.type == "cpu"
    shift = cartesian_shifts(shifts, cell, None if on_host else batch[i], edge_counts=edge_counts if on_host else None)
    return pair_lengths(positions, i, j, shift)


def pair_lengths(positions: torch.Tensor, i: torch.Tensor, j: torch.Tensor, edge_shift: torch.Tensor | None) -> torch.Tensor:
    """[E] |pos[j] - pos[i] + edge_shift|, Å, with `edge_shift` = S @ cell already computed
    (`edge_lengths`'s arithmetic: the Verlet lists of `molden.graph.verlet` keep it), or None
    when every shift is zero."""
    vectors = positions[j] - positions[i]
    if edge_shift is not None:
        vectors = vectors + edge_shift
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
    """[N] long system index of every atom, built on the device from host counts (no sync)."""
    counts = torch.from_numpy(layout.counts).to(device)
    system = torch.arange(layout.n_systems, device=device)
    return torch.repeat_interleave(system, counts, output_size=int(layout.offsets[-1]))


def _torch_neighbor_list(positions: torch.Tensor, layout: SystemLayout, cutoff: float, triton: bool = False):
    """(edge_index, unit_shifts) from the torch (or, with `triton`, the Triton) candidates and
    one exact test.

    Every size and bound comes from the host-side layout, so the only synchronisations on a
    device are the data-dependent ones: selecting candidate pairs (and, for large systems,
    sizing the cell list's bins).
    """
    device, dtype = positions.device, positions.dtype
    full_np = complete_cells(layout.cells, layout.pbc)
    full_cell = torch.from_numpy(full_np).to(device=device, dtype=dtype)
    pbc = torch.from_numpy(layout.pbc).to(device)
    batch = _batch_of(layout, device)
    # Candidates are searched slightly beyond the cutoff so that rounding (wrapping, another
    # backend's arithmetic) can never lose a pair; the exact test below removes the extras.
    scale = cutoff + layout.position_bound + layout.cell_bound
    band = 256 * torch.finfo(dtype).eps * scale
    search = cutoff + band
    shells = shell_counts_np(full_np, layout.pbc, search)
    inverse_np = np.linalg.inv(full_np)
    inverse = torch.from_numpy(inverse_np).to(device)
    if triton:
        cells, inverses = (full_np, full_cell), (inverse_np, inverse)
        i, j, shifts, approx = _triton_pairs(positions, batch, layout, cells, inverses, pbc, search)
    else:
        i, j, shifts, approx = _torch_pairs(positions, batch, layout, full_cell, inverse, pbc, shells, search)
    # One exact test in ASE's arithmetic, only where the candidate distance is within the band.
    unsure = (approx >= cutoff - band).nonzero(as_tuple=True)[0]
    if unsure.numel():
        cell = torch.from_numpy(layout.cells).to(device)
        exact = edge_lengths(positions, cell, batch, i[unsure], j[unsure], shifts[unsure])
        outside = (approx[unsure] >= search) | (exact.to(torch.float64) >= cutoff)  # a float32 cutoff would round
        drop = unsure[outside]
        if drop.numel():
            keep = torch.ones_like(approx, dtype=torch.bool)
            keep[drop] = False
            i, j, shifts = i[keep], j[keep], shifts[keep]
    return torch.stack([i, j]), shifts


def _torch_pairs(positions, batch, layout, full_cell, inverse, pbc, shells, search):
    """Candidates of every system in torch: brute force for groups of small systems, a cell
    list for large ones. Returns (i, j, S, distance) sorted by (i, j, S).

    `shells` is the host-side [B, 3] int64 array of image shells per axis."""
    wrapped, moved = wrap_positions(positions, batch, full_cell, pbc, inverse)
    offsets = layout.offsets.tolist()
    n_list, k_list = layout.counts.tolist(), np.prod(2 * shells + 1, axis=1).tolist()
    parts: list[tuple[torch.Tensor, ...]] = []
    group: list[int] = []
    group_n = group_k = 0

    def flush() -> None:
        nonlocal group, group_n, group_k
        if group:
            parts.append(_brute_force(wrapped, full_cell, shells, layout.counts, offsets, group, search))
        group, group_n, group_k = [], 0, 0

    for b, (n, k) in enumerate(zip(n_list, k_list)):
        if n > _CELL_LIST_MIN_ATOMS or n * n * k > _BRUTE_FORCE_BUDGET:
            flush()
            sl = slice(offsets[b], offsets[b + 1])
            pairs = cell_list.torch_cell_list_candidates(
                wrapped[sl], full_cell[b], pbc[b], shells[b].tolist(), search, inverse=inverse[b]
            )
            parts.append(_sorted_pairs(*pairs, n, shells[b].tolist(), offsets[b]))
            continue
        # Groups are bounded by their padded size, so one big system never inflates the others.
        if (len(group) + 1) * max(n, group_n) ** 2 * max(k, group_k) > _BRUTE_FORCE_BUDGET:
            flush()
        group.append(b)
        group_n, group_k = max(n, group_n), max(k, group_k)
    flush()
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=positions.device)
        return empty, empty, torch.zeros(0, 3, dtype=torch.int32, device=positions.device), positions.new_zeros(0)
    i, j, wrapped_shift, approx = (torch.cat(x) for x in zip(*parts))
    # positions = wrapped + moved @ cell, so the shift for the given positions is:
    return i, j, (wrapped_shift + moved[i] - moved[j]).to(torch.int32), approx


def _triton_pairs(positions, batch, layout, full_cells, inverses, pbc, search):
    """Candidates of every system from the Triton kernel (`triton_cells`), all systems in one
    launch per pass; (i, j, S, distance) with centres ascending. `full_cells` and `inverses`
    are (host array, device tensor) pairs of the completed cells and their inverses."""
    from molden.graph import triton_cells  # imports Triton: only when this backend runs

    wrapped, moved = wrap_positions(positions, batch, full_cells[1], pbc, inverses[1])
    i, j, wrapped_shift, approx = triton_cells.triton_cell_list_candidates(
        wrapped, batch, layout, full_cells[0], inverses[0], search
    )
    return i, j, (wrapped_shift + moved[i] - moved[j]).to(torch.int32), approx


def _brute_force(wrapped, full_cell, shells, counts, offsets, group, search):
    """Candidates for a group of small systems, every pair against every image at once.

    The pair tensor is laid out [system, i, j, image] so that nonzero() already yields the
    documented (i, j, S) order. `shells` and `counts` are host arrays: sizes need no sync.
    """
    device, dtype = wrapped.device, wrapped.dtype
    n_max = int(counts[group].max())
    group_shells = shells[group]
    images = image_offsets(group_shells.max(axis=0).tolist(), device)
    image_ok = (images.abs()[None] <= torch.from_numpy(group_shells).to(device)[:, None, :]).all(dim=-1)  # [G, K]
    slots = torch.arange(n_max, device=device)
    start = torch.tensor([offsets[b] for b in group], device=device)
    atom_ok = slots < torch.from_numpy(counts[group]).to(device)[:, None]
    atoms = torch.where(atom_ok, start[:, None] + slots, 0)
    points = wrapped[atoms]  # [G, n, 3]
    systems = torch.tensor(group, device=device)
    image_vectors = images.to(dtype) @ full_cell[systems].to(dtype)  # [G, K, 3]
    delta = points[:, None, :, None, :] - points[:, :, None, None, :] + image_vectors[:, None, None]
    dist2 = (delta * delta).sum(dim=-1)  # [G, i, j, K]
    not_self = ~(torch.eye(n_max, dtype=torch.bool, device=device)[:, :, None] & (images == 0).all(-1))
    mask = (dist2 < search**2) & not_self & image_ok[:, None, None, :]
    mask &= atom_ok[:, :, None, None] & atom_ok[:, None, :, None]
    g, i, j, k = mask.nonzero(as_tuple=True)
    return start[g] + i, start[g] + j, images[k], dist2[g, i, j, k].sqrt()


def _sorted_pairs(i, j, wrapped_shift, approx, n_atoms, shells, offset):
    """Order one system's candidates by (i, j, S) and make atom indices absolute.

    `shells` is a host list of 3 ints."""
    span = [2 * s + 1 for s in shells]
    code = ((wrapped_shift[:, 0] + shells[0]) * span[1] + wrapped_shift[:, 1] + shells[1]) * span[2] + wrapped_shift[:, 2] + shells[2]
    n_codes = span[0] * span[1] * span[2]
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
