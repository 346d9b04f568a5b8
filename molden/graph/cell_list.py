"""Pairs for large systems: a vectorised torch cell list, and vesin's C++ one on the CPU.

The torch cell list works on wrapped positions with the completed cell. It returns a superset
of the true pairs, searched at a slightly larger cutoff, as (i, j, wrapped shift, approximate
distance), and `radius_graph` applies the exact test. `vesin_pairs` applies the same exact test
itself, in numpy, so the two backends cannot disagree on the edge set.
"""

from __future__ import annotations

import functools
import math

import numpy as np

import torch

from molden.graph.periodic import face_spacings, image_offsets

# Candidate slots evaluated at once (centres x 27 bins x max occupancy): bounds memory to
# a few tens of MB whatever the system size.
_CANDIDATE_BUDGET = 2_000_000

try:  # vesin is optional: the fastest CPU cell list known (PEERS.md); torch is the fallback.
    import vesin as _vesin
except ImportError:  # pragma: no cover - exercised only where vesin is missing
    _vesin = None


def vesin_available() -> bool:
    """True when the vesin CPU backend can be used."""
    return _vesin is not None


@functools.lru_cache(maxsize=4)
def _vesin_calculator(search_cutoff: float):
    return _vesin.NeighborList(cutoff=search_cutoff, full_list=True)


def vesin_pairs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    full_cell: torch.Tensor,
    pbc: torch.Tensor,
    offsets: list[int],
    cutoff: float,
    band: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final edges of every system from vesin's C++ cell list (CPU), exact-tested and sorted.

    vesin takes unwrapped positions and returns shifts for them, so no wrapping is needed.
    Everything after vesin stays in numpy: on 2 cores per-call torch overhead cost more than
    vesin itself on OC20-sized slabs. Pairs vesin finds within `band` Å of the cutoff are
    re-tested in ASE's arithmetic (`exact_lengths_numpy`), as the torch path does.
    Returns (edge_index [2, E] long, unit_shifts [E, 3] int32), grouped by system, in vesin's
    order within a system.
    """
    pos = positions.numpy()
    pos64 = pos.astype(np.float64, copy=False)
    cells = full_cell.to(torch.float64).numpy()
    user_cells = cell.numpy()
    flags = pbc.numpy()
    # Unsorted: vesin's own sort (sorted=True) costs more than its whole search on large
    # systems; callers that need edges grouped by centre sort once (structure_graphs does).
    # Rounded up to a 1e-6 Å grid so that repeated calls reuse one calculator: vesin keeps its
    # buffers between calls, and a fresh one costs about half a search on large systems.
    calculator = _vesin_calculator(math.ceil((cutoff + band) * 1e6) / 1e6)
    parts = []
    for b in range(len(offsets) - 1):
        lo, hi = offsets[b], offsets[b + 1]
        if hi == lo or (hi - lo < 2 and not flags[b].any()):
            continue
        i, j, shifts, dist = calculator.compute(pos64[lo:hi], cells[b], flags[b], "ijSd")
        if not len(i):
            continue
        i, j = i.view(np.int64), j.view(np.int64)  # uint64 indices, far below 2**63
        unsure = np.flatnonzero(dist >= cutoff - band)
        if len(unsure):
            local = pos[lo:hi]
            vectors = (local[j[unsure]] - local[i[unsure]]) + shifts[unsure].astype(local.dtype) @ user_cells[b]
            outside = unsure[np.sqrt((vectors * vectors).sum(axis=1)) >= cutoff]
            if len(outside):
                keep = np.ones(len(i), dtype=bool)
                keep[outside] = False
                i, j, shifts = i[keep], j[keep], shifts[keep]
        edges = np.stack([i, j])
        if lo:
            edges += lo
        parts.append((edges, shifts.astype(np.int32, copy=False)))
    if not parts:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.int32)
    edges, shifts = parts[0] if len(parts) == 1 else (np.concatenate(x, axis=k) for x, k in zip(zip(*parts), (1, 0)))
    return torch.from_numpy(edges), torch.from_numpy(shifts)


def torch_cell_list_candidates(
    wrapped: torch.Tensor,
    full_cell: torch.Tensor,
    pbc: torch.Tensor,
    shells: list[int],
    search_cutoff: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs from a device-agnostic cell list over the atoms and their nearby images.

    Images ("ghosts") are kept when they lie within the cutoff of the cell in face-normal
    units; all points are binned on a grid aligned with the lattice planes, whose bins are
    at least one cutoff wide, so every neighbour of a centre lies in the 27 bins around it.
    """
    device, dtype = wrapped.device, wrapped.dtype
    n_atoms = wrapped.shape[0]
    inverse = torch.linalg.inv(full_cell.to(torch.float64))
    spacing = face_spacings(full_cell[None])[0]  # [3] Å
    frac = wrapped.to(torch.float64) @ inverse
    images = image_offsets(shells, device)
    zero_image = images.shape[0] // 2
    reach = search_cutoff / spacing
    frac_images = frac[None] + images[:, None].to(torch.float64)  # [K, N, 3]
    inside = (frac_images >= -reach - 1e-9) & (frac_images < 1 + reach + 1e-9)
    keep = (inside | ~pbc).all(dim=-1)
    keep[zero_image] = True
    image_of_point, source = keep.nonzero(as_tuple=True)
    points = wrapped[source] + (images.to(dtype) @ full_cell.to(dtype))[image_of_point]
    normal_coords = frac_images[image_of_point, source] * spacing  # Å along face normals

    low = normal_coords.min(dim=0).values
    span = (normal_coords.max(dim=0).values - low).tolist()
    bins = [max(1, int(s // search_cutoff)) for s in span]
    # A sparse molecule spread over a large box would otherwise allocate mostly empty bins.
    while math.prod(bins) > 4 * points.shape[0] + 64:
        bins = [max(1, b // 2) for b in bins]
    width = torch.tensor(
        [max(s / b, search_cutoff) for s, b in zip(span, bins)], dtype=torch.float64, device=device
    )
    n_bins = torch.tensor(bins, device=device)
    bin_xyz = torch.minimum(((normal_coords - low) / width).long(), n_bins - 1)
    linear = (bin_xyz[:, 0] * bins[1] + bin_xyz[:, 1]) * bins[2] + bin_xyz[:, 2]
    order = torch.argsort(linear, stable=True)
    counts = torch.bincount(linear, minlength=math.prod(bins))
    starts = torch.cumsum(counts, 0) - counts
    max_occupancy = int(counts.max())
    sorted_points, sorted_source = points[order], source[order]
    sorted_image = image_of_point[order]

    # Centres are the real atoms: the zero-image points, which nonzero() lists by atom index.
    centre_bins = bin_xyz[image_of_point == zero_image]
    stencil = image_offsets([1, 1, 1], device)
    slots = torch.arange(max_occupancy, device=device)
    chunk = max(1, _CANDIDATE_BUDGET // (27 * max_occupancy))
    out_i, out_j, out_s, out_d = [], [], [], []
    for start in range(0, n_atoms, chunk):
        centres = torch.arange(start, min(start + chunk, n_atoms), device=device)
        neighbour_xyz = centre_bins[centres, None, :] + stencil  # [C, 27, 3]
        valid_bin = ((neighbour_xyz >= 0) & (neighbour_xyz < n_bins)).all(dim=-1)
        neighbour_xyz = torch.minimum(neighbour_xyz.clamp(min=0), n_bins - 1)
        neighbour = (neighbour_xyz[..., 0] * bins[1] + neighbour_xyz[..., 1]) * bins[2] + neighbour_xyz[..., 2]
        occupancy = torch.where(valid_bin, counts[neighbour], 0)
        candidate = (starts[neighbour][..., None] + slots).flatten(1)  # [C, 27 * M]
        valid = (slots < occupancy[..., None]).flatten(1)
        candidate = torch.where(valid, candidate, 0)
        delta = sorted_points[candidate] - wrapped[centres, None, :]
        dist2 = (delta * delta).sum(dim=-1)
        is_self = (sorted_source[candidate] == centres[:, None]) & (sorted_image[candidate] == zero_image)
        row, col = (valid & (dist2 < search_cutoff**2) & ~is_self).nonzero(as_tuple=True)
        point = candidate[row, col]
        out_i.append(centres[row])
        out_j.append(sorted_source[point])
        out_s.append(images[sorted_image[point]])
        out_d.append(dist2[row, col].sqrt())
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_s), torch.cat(out_d)
