"""Candidate pairs for large systems from a vectorised, device-agnostic torch cell list.

It works on wrapped positions with the completed cell and returns a superset of the true
pairs, searched at a slightly larger cutoff, as (i, j, wrapped shift, approximate distance);
`radius_graph` applies the exact test.
"""

from __future__ import annotations

import math

import torch

from molden.graph.periodic import image_offsets

# Candidate slots evaluated at once (centres x 27 bins x max occupancy): bounds memory to
# a few tens of MB whatever the system size.
_CANDIDATE_BUDGET = 2_000_000

def torch_cell_list_candidates(
    wrapped: torch.Tensor,
    full_cell: torch.Tensor,
    pbc: torch.Tensor,
    shells: list[int],
    search_cutoff: float,
    *,
    inverse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs from a device-agnostic cell list over the atoms and their nearby images.

    Images ("ghosts") are kept when they lie within the cutoff of the cell in face-normal
    units; all points are binned on a grid aligned with the lattice planes, whose bins are
    at least one cutoff wide, so every neighbour of a centre lies in the 27 bins around it.
    `inverse` ([3, 3] float64) is the completed cell's inverse when known. On a device the bin
    grid and the densest bin are sized from two small reads (the data decide them).
    """
    device, dtype = wrapped.device, wrapped.dtype
    n_atoms = wrapped.shape[0]
    inverse = torch.linalg.inv(full_cell.to(torch.float64)) if inverse is None else inverse.to(torch.float64)
    spacing = 1.0 / torch.linalg.vector_norm(inverse, dim=-2)  # [3] Å between lattice planes
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

    low, high = normal_coords.aminmax(dim=0)
    span = (high - low).tolist()
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
