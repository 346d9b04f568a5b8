"""Lattice geometry shared by the neighbour-list backends: completed cells, wrapping, image shells.

Conventions (as ASE): lattice vectors are the rows of `cell`, Å; an image of atom j is
`positions[j] + S @ cell` with integer S, and S is zero along every non-periodic axis.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from molden.errors import MoldenInputError

# A periodic cell whose volume is below this fraction of the product of its periodic
# lattice-vector lengths is treated as degenerate (its image shells would be unbounded).
_DEGENERATE_RATIO = 1e-8
# The last (cells, pbc) found valid: MD, relaxations and benchmarks search the same cell
# call after call, and the test is a measurable part of a small system's search.
_last_valid: tuple | None = None


def complete_cells(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Replace the rows of non-periodic axes by unit vectors orthogonal to the periodic rows.

    The user's vector along a non-periodic axis never changes pairs (S is zero along it), so
    it is ignored: a zero, tiny or tilted vacuum vector gives the same result. Orthogonal
    completion also keeps the face spacing of the periodic axes as large as possible.
    Cells are a few numbers per system, so this runs in numpy for every device.

    Args:
        cell: [B, 3, 3] lattice vectors as rows, Å.
        pbc: [B, 3] bool.
    Returns:
        [B, 3, 3] float64 cell with the same periodic rows and orthonormal non-periodic rows.
    """
    work = cell.astype(np.float64)
    periodic_rows = work * pbc[..., None]
    # The null space of the periodic rows: eigenvectors of P^T P with zero eigenvalue come
    # first because eigh sorts eigenvalues in ascending order.
    _, vectors = np.linalg.eigh(np.swapaxes(periodic_rows, -1, -2) @ periodic_rows)
    null_rows = np.swapaxes(vectors, -1, -2)  # [B, 3 (vector), 3 (xyz)]
    rank = np.clip(np.cumsum(~pbc, axis=1) - 1, 0, None)
    filler = np.take_along_axis(null_rows, np.repeat(rank[..., None], 3, axis=-1), axis=1)
    return np.where(pbc[..., None], work, filler)


def check_periodic_cells(cell: np.ndarray, pbc: np.ndarray) -> None:
    """Raise `MoldenInputError` for a periodic axis whose lattice vector is zero or degenerate.

    The squared volume spanned by the periodic rows (their Gram determinant, with 1 on the
    diagonal of non-periodic axes) is compared with the product of their squared lengths; a
    zero periodic row gives 0 <= 0 and is caught by the same test. Squares avoid square roots:
    this runs on every `neighbor_list` call, where a few numpy operations are a measurable
    part of a small system's search.
    """
    global _last_valid
    if not pbc.any():
        return
    key = (cell.shape, cell.dtype.str, cell.tobytes(), pbc.tobytes())
    if key == _last_valid:
        return
    work = np.asarray(cell, dtype=np.float64) * pbc[..., None]
    norms2 = (work * work).sum(axis=-1)
    gram = work @ np.swapaxes(work, -1, -2) + np.eye(3) * ~pbc[:, None, :]
    bad = np.abs(np.linalg.det(gram)) <= _DEGENERATE_RATIO**2 * np.where(pbc, norms2, 1.0).prod(axis=-1)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise MoldenInputError(
            "radius_graph",
            f"periodic cell is zero or degenerate (pbc={pbc[b].tolist()}, "
            f"cell={cell[b].tolist()}); give three independent lattice vectors for the "
            "periodic axes or set pbc False there",
            record=b,
        )
    _last_valid = key


def face_spacings(full_cell: torch.Tensor) -> torch.Tensor:
    """[B, 3] distance between neighbouring lattice planes of each axis, Å.

    |Δf_k| * h_k <= |d| for any displacement d, so a neighbour within the cutoff never lies
    more than cutoff / h_k cells away along axis k.
    """
    inverse = torch.linalg.inv(full_cell.to(torch.float64))
    return 1.0 / torch.linalg.vector_norm(inverse, dim=-2)


def shell_counts_np(full_cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """[B, 3] int64: how many image shells each axis needs for wrapped positions.

    For wrapped fractional coordinates |Δf_k| < 1, so |S_k| < 1 + cutoff / h_k (h_k the face
    spacing); floor + 1 covers that bound with slack for rounding. Computed on the host from
    the completed cells, so that no device value is read to size the search.
    """
    spacing = 1.0 / np.linalg.norm(np.linalg.inv(np.asarray(full_cell, dtype=np.float64)), axis=-2)
    shells = np.floor(cutoff / spacing).astype(np.int64) + 1
    return np.where(pbc, shells, 0)


def image_offsets(max_shells: list[int], device: torch.device) -> torch.Tensor:
    """[K, 3] long integer offsets in lexicographic order, |S_k| <= max_shells[k]."""
    ranges = [range(-n, n + 1) for n in max_shells]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.long, device=device).reshape(-1, 3)


def wrap_positions(
    positions: torch.Tensor,
    batch: torch.Tensor,
    full_cell: torch.Tensor,
    pbc: torch.Tensor,
    inverse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap positions into their system's cell along periodic axes only.

    Args:
        positions: [N, 3] Å; batch: [N] system index; full_cell: [B, 3, 3] completed cells;
        pbc: [B, 3] bool; inverse: [B, 3, 3] float64 inverse of the completed cells when
        already known (computed on the host, it spares a device inversion, which syncs).
    Returns:
        (wrapped [N, 3] Å, cells_moved [N, 3] long) with `positions = wrapped + cells_moved @ cell`;
        non-periodic axes are never moved.
    """
    full64 = full_cell.to(torch.float64)
    inverse = torch.linalg.inv(full64) if inverse is None else inverse.to(torch.float64)
    frac = torch.einsum("nk,nkl->nl", positions.to(torch.float64), inverse[batch])
    moved = torch.where(pbc[batch], torch.floor(frac), torch.zeros_like(frac))
    shift = torch.einsum("nk,nkl->nl", moved, full64[batch])
    return (positions.to(torch.float64) - shift).to(positions.dtype), moved.long()
