"""Displacements between two sets of positions of the same atoms, across periodic boundaries.

Relaxed-position targets (IS2RS, Noisy Nodes §3.3 relative targets) compare positions that a
relaxation may have wrapped into the cell on the other side: the displacement an atom made is
the shortest vector between the two positions modulo the lattice translations along the
periodic axes (the minimum image), never the raw difference across the cell.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from molden.data.batch import Batch

# The 27 neighbouring lattice offsets searched after rounding fractional coordinates: rounding
# alone is the minimum image only for orthogonal cells, a skewed cell can have a shorter image
# one cell further.
_OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.float64)


def minimum_image_displacement(batch: Batch, positions_from: Tensor, positions_to: Tensor) -> Tensor:
    """[N, 3] Å: for each atom, the shortest `positions_to - positions_from + n @ cell` over
    integer lattice offsets `n` along its graph's periodic axes (non-periodic axes never wrap;
    a molecule without a cell gets the plain difference).

    The periodic part is found in the coordinates of the difference projected onto the span
    of the periodic lattice vectors (pseudo-inverse, so cells with zero rows on non-periodic
    axes work): rounded, then the 27 neighbouring offsets searched, so the result is the
    minimum image for any cell whose reduced basis is within one offset of the rounding.
    Differentiable in both positions; ties go to the first offset in a fixed order.
    """
    delta = positions_to - positions_from
    pbc = batch.pbc.to(delta.device)
    if not bool(pbc.any()):
        return delta
    periodic = pbc.to(delta.dtype)  # [B, 3]
    lattice = batch.cell.to(delta) * periodic[:, :, None]  # non-periodic rows zeroed
    fractional_basis = torch.linalg.pinv(lattice)  # [B, 3, 3]: delta @ pinv = coordinates
    atom_lattice = lattice[batch.batch]
    fractional = torch.einsum("ni,nij->nj", delta.detach(), fractional_basis[batch.batch])
    offsets = _OFFSETS.to(delta)  # [27, 3]
    shifts = (-torch.round(fractional))[:, None, :] + offsets[None]  # [N, 27, 3] in cells
    shifts = shifts * periodic[batch.batch][:, None, :]
    candidates = delta[:, None, :] + torch.einsum("nkj,nji->nki", shifts, atom_lattice)
    best = candidates.detach().square().sum(-1).argmin(dim=1)
    return candidates[torch.arange(len(delta), device=delta.device), best]
