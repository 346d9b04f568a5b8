"""Lattice geometry shared by the neighbour-list backends: completed cells, wrapping, image shells.

Conventions (as ASE): lattice vectors are the rows of `cell`, Å; an image of atom j is
`positions[j] + S @ cell` with integer S, and S is zero along every non-periodic axis.
"""

from __future__ import annotations

import itertools

import torch

from molden.errors import MoldenInputError

# A periodic cell whose volume is below this fraction of the product of its periodic
# lattice-vector lengths is treated as degenerate (its image shells would be unbounded).
_DEGENERATE_RATIO = 1e-8


def complete_cell(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Replace the rows of non-periodic axes by unit vectors orthogonal to the periodic rows.

    The user's vector along a non-periodic axis never changes pairs (S is zero along it), so
    it is ignored: a zero, tiny or tilted vacuum vector gives the same result. Orthogonal
    completion also keeps the face spacing of the periodic axes as large as possible.

    Args:
        cell: [B, 3, 3] lattice vectors as rows, Å.
        pbc: [B, 3] bool.
    Returns:
        [B, 3, 3] cell with the same periodic rows and orthonormal non-periodic rows.
    """
    work = cell.to(torch.float64)
    periodic_rows = work * pbc[..., None]
    # The null space of the periodic rows: eigenvectors of P^T P with zero eigenvalue come
    # first because eigh sorts eigenvalues in ascending order.
    _, vectors = torch.linalg.eigh(periodic_rows.transpose(-1, -2) @ periodic_rows)
    null_rows = vectors.transpose(-1, -2)  # [B, 3 (vector), 3 (xyz)]
    rank = (torch.cumsum((~pbc).long(), dim=1) - 1).clamp(min=0)
    filler = null_rows.gather(1, rank[..., None].expand(-1, 3, 3))
    return torch.where(pbc[..., None], work, filler).to(cell.dtype)


def check_periodic_cells(cell: torch.Tensor, pbc: torch.Tensor, full_cell: torch.Tensor) -> None:
    """Raise `MoldenInputError` for a periodic axis whose lattice vector is zero or degenerate."""
    norms = torch.linalg.vector_norm(cell.to(torch.float64), dim=-1)
    scale = torch.where(pbc, norms, torch.ones_like(norms)).prod(dim=-1)
    volume = torch.linalg.det(full_cell.to(torch.float64)).abs()
    bad = pbc.any(dim=-1) & ((pbc & (norms == 0)).any(dim=-1) | (volume <= _DEGENERATE_RATIO * scale))
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0, 0])
        raise MoldenInputError(
            "radius_graph",
            f"periodic cell is zero or degenerate (pbc={pbc[b].tolist()}, "
            f"cell={cell[b].tolist()}); give three independent lattice vectors for the "
            "periodic axes or set pbc False there",
            record=b,
        )


def face_spacings(full_cell: torch.Tensor) -> torch.Tensor:
    """[B, 3] distance between neighbouring lattice planes of each axis, Å.

    |Δf_k| * h_k <= |d| for any displacement d, so a neighbour within the cutoff never lies
    more than cutoff / h_k cells away along axis k.
    """
    inverse = torch.linalg.inv(full_cell.to(torch.float64))
    return 1.0 / torch.linalg.vector_norm(inverse, dim=-2)


def shell_counts(full_cell: torch.Tensor, pbc: torch.Tensor, cutoff: float) -> torch.Tensor:
    """[B, 3] long: how many image shells each axis needs for wrapped positions.

    For wrapped fractional coordinates |Δf_k| < 1, so |S_k| < 1 + cutoff / h_k; floor + 1
    covers that bound with slack for rounding.
    """
    shells = torch.floor(cutoff / face_spacings(full_cell)).long() + 1
    return torch.where(pbc, shells, torch.zeros_like(shells))


def image_offsets(max_shells: list[int], device: torch.device) -> torch.Tensor:
    """[K, 3] long integer offsets in lexicographic order, |S_k| <= max_shells[k]."""
    ranges = [range(-n, n + 1) for n in max_shells]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.long, device=device).reshape(-1, 3)


def wrap_positions(
    positions: torch.Tensor, batch: torch.Tensor, full_cell: torch.Tensor, pbc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap positions into their system's cell along periodic axes only.

    Args:
        positions: [N, 3] Å; batch: [N] system index; full_cell: [B, 3, 3] completed cells;
        pbc: [B, 3] bool.
    Returns:
        (wrapped [N, 3] Å, cells_moved [N, 3] long) with `positions = wrapped + cells_moved @ cell`;
        non-periodic axes are never moved.
    """
    full64 = full_cell.to(torch.float64)
    inverse = torch.linalg.inv(full64)[batch]
    frac = torch.einsum("nk,nkl->nl", positions.to(torch.float64), inverse)
    moved = torch.where(pbc[batch], torch.floor(frac), torch.zeros_like(frac))
    shift = torch.einsum("nk,nkl->nl", moved, full64[batch])
    return (positions.to(torch.float64) - shift).to(positions.dtype), moved.long()
