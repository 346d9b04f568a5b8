"""Random rigid rotations of whole structures: ForceNet's rotation augmentation (§2), drawn from
the objective's generator so a resumed run draws the same rotations."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from molden.data.batch import Batch


def random_rotations(n: int, generator: torch.Generator, axis: Literal["vertical", "any"]) -> Tensor:
    """[n, 3, 3] float64 rotations (det +1) drawn on the CPU from `generator`: "vertical" about
    the z axis, normal to an OC20 slab's surface (ForceNet §2 "Rotation data augmentation"),
    "any" uniform on SO(3) (QR of a Gaussian matrix with the sign fixed)."""
    if axis == "vertical":
        angle = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * math.pi)
        c, s, zero, one = angle.cos(), angle.sin(), torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=1).reshape(n, 3, 3)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]
    flip = torch.where(torch.linalg.det(q) < 0, -1.0, 1.0).to(torch.float64)
    return torch.cat([q[:, :, :1] * flip[:, None, None], q[:, :, 1:]], dim=2)


def rotated_batch(batch: Batch, rotations: Tensor) -> Batch:
    """A copy of `batch` with graph b turned by `rotations[b]` ([B, 3, 3], x → R x): positions,
    cell rows, forces, force inputs and relaxed positions together. The graph stays valid:
    edge vectors pos[j] + S·cell − pos[i] turn with them."""
    r = rotations.to(device=batch.positions.device, dtype=batch.positions.dtype)
    per_atom = r[batch.batch]

    def turn(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.einsum("nij,nj->ni", per_atom, t)

    return replace(
        batch,
        positions=turn(batch.positions),
        cell=torch.einsum("bij,bkj->bki", r, batch.cell),
        forces=turn(batch.forces),
        force_inputs=turn(batch.force_inputs),
        relaxed_positions=turn(batch.relaxed_positions),
    )
