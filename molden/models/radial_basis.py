"""Radial features of interatomic distances, shared by every backbone.

- `bessel_basis`: the radial Bessel basis of DimeNet, used by GNS for |d| (Noisy Nodes §3.2:
  ẽ_c = sqrt(2/R) sin(cπd/R) / d, c = 1..n).
- `cosine_cutoff` and `polynomial_envelope`: smooth cutoff functions, 1 at d = 0 and 0 at and
  beyond the cutoff, to multiply messages with so that a model's output stays continuous when
  an edge enters or leaves the radius graph.

All distances are in Å, any shape, any float dtype and device; everything is differentiable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def bessel_basis(d: Tensor, n: int, cutoff: float) -> Tensor:
    """[..., n] radial Bessel functions sqrt(2/R) sin(cπd/R) / d for c = 1..n, 1/Å^(3/2).

    `d` [...]: distances, Å, strictly positive (the graph pipeline rejects overlapping atoms; at
    d = 0 the function is 0/0). `cutoff` R, Å: every function is zero at d = R. Distances beyond
    R are not masked: the functions keep oscillating there, so pass edges within R only, or
    multiply by an envelope.
    """
    c = torch.arange(1, n + 1, dtype=d.dtype, device=d.device)
    d = d.unsqueeze(-1)
    return math.sqrt(2.0 / cutoff) * torch.sin(c * (math.pi / cutoff) * d) / d


def cosine_cutoff(d: Tensor, cutoff: float) -> Tensor:
    """[...] 0.5 (cos(πd/R) + 1) inside R, 0 beyond (SchNet, PaiNN): continuous with a
    continuous first derivative at R."""
    inside = (d < cutoff).to(d.dtype)
    return 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0) * inside


def polynomial_envelope(d: Tensor, cutoff: float, p: int = 6) -> Tensor:
    """[...] DimeNet's polynomial envelope of x = d/R without its 1/x factor:
    1 − (p+1)(p+2)/2 xᵖ + p(p+2) xᵖ⁺¹ − p(p+1)/2 xᵖ⁺², 0 beyond R.

    1 at d = 0; it and its first two derivatives vanish at R (smoother than `cosine_cutoff`),
    and it stays flat near 0, so short edges are not damped.
    """
    x = d / cutoff
    xp = x**p
    value = 1.0 - (p + 1) * (p + 2) / 2 * xp + p * (p + 2) * xp * x - p * (p + 1) / 2 * xp * x * x
    return torch.where(x < 1.0, value, torch.zeros_like(value))
