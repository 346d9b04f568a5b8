"""Canonical reduced bases of periodic lattices, batched in torch (GNS's periodic basis,
Noisy Nodes §5.1, made independent of the choice of unit cell).

`canonical_lattice_transform(cell, pbc)` returns, for every graph, an integer matrix N whose
first k rows give the canonical basis N[:k] @ cell of the lattice spanned by the graph's k
periodic cell rows (k = 3 bulk, 2 slab, 1 wire; rows k.. are zero). N is computed without
gradients; apply it as N @ cell so that gradients flow through the cell.

The canonical basis (a, b, c) is a Minkowski-reduced one, |a| ≤ |b| ≤ |c| being the
successive minima of the lattice:
- a: a shortest lattice vector; b: a shortest vector not parallel to a; c: a shortest vector
  that completes (a, b) to a basis (in at most three dimensions the successive minima are
  reached by a basis);
- signs: b makes an obtuse angle with a (a·b ≤ 0); c is obtuse to a, or to b when c ⟂ a;
- 3D orientation: det N = +1, so the basis has the handedness of the given cell.
Where these rules leave a tie (lengths or dot products equal within a relative tolerance,
1e-9 for float64 cells and 100 ulp for others — symmetric lattices, and always ±a in 2D and
1D), the candidate whose integer coordinates in the given cell rows come first in decreasing
lexicographic order wins: deterministic, the same on every device and for a float32 copy of
a float64 cell, and unchanged by rotations and reflections of the cell.

What that guarantees for two cells A and A' = M A of the same lattice (M integer, |det M| = 1):
- rotating or reflecting the cell (A → A Rᵀ) turns the canonical basis with it (C → C Rᵀ);
- 3D, det M = +1: the same canonical basis (to rounding) unless the lattice has a proper
  rotation symmetry (any lattice but a triclinic one), where the two bases may differ by
  such a rotation; det M = −1: the basis −C, the lattice's inversion (no orientation of a
  lattice is canonical and equivariant under reflections at once: −1 maps every lattice to
  itself, so a basis chosen from the lattice alone could not turn with a reflection);
- 2D (slabs), any M on the two periodic rows: the same (a, b) or (−a, −b): every 2D lattice
  is symmetric under the half-turn about its normal, which no choice from the cell alone can
  break while turning with the system (that needs the atoms, and a discontinuous rule);
  hexagonal, square and rectangular lattices add their other rotations and mirrors;
- 1D (wires): a = the given periodic row (its sign is the tie-break), so −1 flips it.

Cost: `SWEEPS` pairwise Lagrange–Gauss sweeps (fixed: no host synchronisation), then one
pass over the 124 combinations with coefficients in −2..2 of the pre-reduced basis. A cell
too skewed for the sweeps (its reduced basis still beyond ±2 in the pre-reduced one; tested
up to products of four random matrices with entries in −2..2) gets a valid basis of its
lattice that may not be the canonical one (the pre-reduced basis when no other is found).
"""

from __future__ import annotations

import torch
from torch import Tensor

SWEEPS = 10  # pairwise reductions; 8 already reduce products of five random unimodular matrices
_PAIRS = ((0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1))
_KEY_BASE = 1 << 20  # lexicographic tie-break key on integer coordinates below 2**19


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a tie for cells given in `dtype`: far above their rounding (so a
    float32 cell breaks ties as its float64 original does), far below physical differences."""
    return min(max(1e-9, 100 * torch.finfo(dtype).eps), 1e-2)


def _pre_reduce(cell: Tensor, pbc: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise Lagrange–Gauss sweeps on the periodic rows: (reduced rows [B, 3, 3], integer
    transform M [B, 3, 3] with reduced = M @ cell and det M = 1). Non-periodic rows are zero."""
    rows = (cell * pbc[..., None]).clone()
    transform = torch.diag_embed(pbc.to(cell.dtype))
    for _ in range(SWEEPS):
        for i, j in _PAIRS:
            ri = rows[:, i]
            norm = (ri * ri).sum(-1)
            ratio = (ri * rows[:, j]).sum(-1) / torch.where(norm > 0, norm, torch.ones_like(norm))
            step = torch.round(ratio)[:, None]
            rows[:, j] = rows[:, j] - step * ri
            transform[:, j] = transform[:, j] - step * transform[:, i]
    return rows, transform


def _side(reference: Tensor, vectors: Tensor, tol: float) -> Tensor:
    """[B, K] 0 where a vector makes an obtuse angle with `reference` [B, 3], 1 where it is
    perpendicular (within `tol`), 2 where acute."""
    dot = (vectors * reference[:, None]).sum(-1)
    limit = tol * vectors.norm(dim=-1) * reference.norm(dim=-1, keepdim=True)
    return torch.where(dot < -limit, 0, torch.where(dot <= limit, 1, 2))


def _pick(allowed: Tensor, squared_length: Tensor, rank: Tensor, key: Tensor, tol: float) -> Tensor:
    """[B] index of the shortest allowed candidate; among those tied in length (within `tol`),
    the lowest `rank`; then the largest `key`."""
    inf = torch.full_like(squared_length, float("inf"))
    shortest = torch.where(allowed, squared_length, inf).min(dim=1, keepdim=True).values
    tied = allowed & (squared_length <= shortest * (1 + 2 * tol))
    best_rank = torch.where(tied, rank, torch.full_like(rank, 1 << 30)).min(dim=1, keepdim=True).values
    best = tied & (rank == best_rank)
    return torch.where(best, key, torch.full_like(key, torch.iinfo(key.dtype).min)).argmax(dim=1)


def _gather(table: Tensor, index: Tensor) -> Tensor:
    """table [B, K, D], index [B] → [B, D]."""
    return table.gather(1, index[:, None, None].expand(-1, 1, table.shape[-1]))[:, 0]


@torch.no_grad()
def canonical_lattice_transform(cell: Tensor, pbc: Tensor) -> Tensor:
    """[B, 3, 3] integer matrices N (in `cell`'s dtype and device): the first k rows of N @ cell
    are the canonical reduced basis (module docstring) of the lattice of each graph's k
    periodic rows of `cell` [B, 3, 3] (rows, Å); its other rows are zero. `pbc` [B, 3] bool.

    Vectorised over graphs with a fixed number of steps: no host synchronisation, any device.
    """
    dtype = _work_dtype(cell.device)
    tol = _tolerance(cell.dtype)
    pbc = pbc.to(torch.bool)
    work = cell.detach().to(dtype)
    reduced, transform = _pre_reduce(work, pbc)

    steps = torch.arange(-2, 3, device=cell.device, dtype=dtype)
    coefficients = torch.cartesian_prod(steps, steps, steps)  # [125, 3], on the device
    vectors = torch.einsum("kc,bcx->bkx", coefficients, reduced)
    in_cell = torch.einsum("kc,bcx->bkx", coefficients, transform).round().long()  # coordinates in `cell` rows
    key = (in_cell[..., 0] * _KEY_BASE + in_cell[..., 1]) * _KEY_BASE + in_cell[..., 2]
    nonzero = coefficients != 0
    allowed = nonzero.any(1)[None] & ~(nonzero[None] & ~pbc[:, None, :]).any(-1)  # periodic rows only
    squared = (vectors * vectors).sum(-1)
    flat = torch.zeros_like(squared, dtype=torch.long)

    ia = _pick(allowed, squared, flat, key, tol)
    na, va = coefficients[ia], _gather(vectors, ia)
    not_parallel = (torch.linalg.cross(coefficients[None], na[:, None].expand_as(vectors)) != 0).any(-1)
    ib = _pick(allowed & not_parallel, squared, _side(va, vectors, tol), key, tol)
    nb, vb = coefficients[ib], _gather(vectors, ib)
    normal = torch.linalg.cross(na, nb)
    completes = ((coefficients[None] * normal[:, None]).sum(-1).abs() == 1)
    ic = _pick(allowed & completes, squared, 3 * _side(va, vectors, tol) + _side(vb, vectors, tol), key, tol)
    nc = coefficients[ic]

    k = pbc.sum(dim=1)
    used = (torch.arange(3, device=cell.device)[None, :] < k[:, None])[..., None].to(dtype)  # rows 0..k-1
    eye = torch.eye(3, dtype=dtype, device=cell.device)
    rows = torch.stack([na, nb, nc], dim=1) * used
    det = torch.linalg.det(torch.where((k == 3)[:, None, None], rows, eye))
    rows = rows * torch.where(det < 0, -1.0, 1.0).to(dtype)[:, None, None]  # 3D: handedness of the given cell
    is_basis = torch.where(k == 3, det.abs().round() == 1, torch.where(
        k == 2, normal.abs().sum(-1) == 1, torch.where(k == 1, na.abs().sum(-1) == 1, True)))
    periodic_first = torch.argsort((~pbc).to(torch.int8), dim=1, stable=True)
    fallback = eye[periodic_first] * used  # the pre-reduced periodic rows
    rows = torch.where(is_basis[:, None, None], rows, fallback)
    return (rows @ transform).to(cell.dtype)


__all__ = ["SWEEPS", "canonical_lattice_transform"]
