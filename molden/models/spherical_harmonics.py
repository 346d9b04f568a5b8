"""Real spherical harmonics up to degree 3, in closed form and vectorised over any batch shape.

Orthonormal on the unit sphere (∫ Y_lm Y_l'm' dΩ = δ_ll' δ_mm'), in the usual real form of the
complex Y_l^m with the Condon–Shortley phase: Y_l,m = √2 (−1)^m Re Y_l^m for m > 0,
√2 (−1)^m Im Y_l^|m| for m < 0, Y_l^0 for m = 0. Ordered by degree, then m = −l … l, so
degree l occupies columns l² … (l+1)² − 1, and Y_1 = √(3/4π) (y, z, x).

Plain polynomials of the unit vector's components (no angles, no `atan2`), so they are smooth,
differentiable everywhere away from the origin and run on any device; ForceNet's spherical
basis (ForceNet App. A) uses them for the edge directions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_DEGREE = 3


def n_functions(n_degrees: int) -> int:
    """How many functions degrees 0 … n_degrees − 1 hold: n_degrees²."""
    return n_degrees * n_degrees


def real_spherical_harmonics(directions: Tensor, n_degrees: int = MAX_DEGREE + 1) -> Tensor:
    """[..., n_degrees²] real orthonormal spherical harmonics of degrees 0 … n_degrees − 1 at
    the directions of `directions` [..., 3] (any non-zero length; normalised here).

    `n_degrees` is ForceNet's L (App. A: "degree L, which gives L² orthogonal basis"), 1 to 4.
    """
    if not 1 <= n_degrees <= MAX_DEGREE + 1:
        raise ValueError(f"n_degrees must be 1 to {MAX_DEGREE + 1}, got {n_degrees}")
    unit = directions / directions.norm(dim=-1, keepdim=True)
    x, y, z = unit.unbind(-1)
    pi = math.pi
    out = [torch.full_like(x, 0.5 * math.sqrt(1.0 / pi))]
    if n_degrees > 1:
        c1 = math.sqrt(3.0 / (4.0 * pi))
        out += [c1 * y, c1 * z, c1 * x]
    if n_degrees > 2:
        c2 = 0.5 * math.sqrt(15.0 / pi)
        out += [
            c2 * x * y,
            c2 * y * z,
            0.25 * math.sqrt(5.0 / pi) * (3.0 * z * z - 1.0),
            c2 * x * z,
            0.5 * c2 * (x * x - y * y),
        ]
    if n_degrees > 3:
        c33 = 0.25 * math.sqrt(35.0 / (2.0 * pi))
        c32 = 0.5 * math.sqrt(105.0 / pi)
        c31 = 0.25 * math.sqrt(21.0 / (2.0 * pi))
        out += [
            c33 * y * (3.0 * x * x - y * y),
            c32 * x * y * z,
            c31 * y * (5.0 * z * z - 1.0),
            0.25 * math.sqrt(7.0 / pi) * z * (5.0 * z * z - 3.0),
            c31 * x * (5.0 * z * z - 1.0),
            0.5 * c32 * z * (x * x - y * y),
            c33 * x * (x * x - 3.0 * y * y),
        ]
    return torch.stack(out, dim=-1)
