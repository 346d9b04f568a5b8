"""Real spherical harmonics (ForceNet App. A's angular basis): values, orthonormality, rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molden.models.spherical_harmonics import real_spherical_harmonics
from symmetry import random_rotation


def _directions(n: int = 200, seed: int = 0) -> torch.Tensor:
    v = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _scipy_real(directions: np.ndarray, n_degrees: int) -> np.ndarray:
    """Reference: scipy's complex Y_l^m turned into the real form of the module docstring."""
    special = pytest.importorskip("scipy.special")
    x, y, z = directions.T
    polar, azimuth = np.arccos(np.clip(z, -1, 1)), np.arctan2(y, x)
    columns = []
    for l in range(n_degrees):
        for m in range(-l, l + 1):
            ylm = special.sph_harm_y(l, abs(m), polar, azimuth)
            if m > 0:
                columns.append(math.sqrt(2) * (-1) ** m * ylm.real)
            elif m < 0:
                columns.append(math.sqrt(2) * (-1) ** m * ylm.imag)
            else:
                columns.append(ylm.real)
    return np.stack(columns, axis=1)


def test_real_spherical_harmonics_match_scipy_in_real_form():
    d = _directions()
    ours = real_spherical_harmonics(d, 4).numpy()
    np.testing.assert_allclose(ours, _scipy_real(d.numpy(), 4), atol=1e-12, rtol=0)


def test_degree_one_is_the_scaled_direction_in_y_z_x_order():
    d = _directions(10)
    y1 = real_spherical_harmonics(d, 2)[:, 1:4]
    torch.testing.assert_close(y1, math.sqrt(3 / (4 * math.pi)) * d[:, [1, 2, 0]], atol=1e-14, rtol=0)


def test_real_spherical_harmonics_are_orthonormal_on_a_quadrature_grid():
    # Gauss–Legendre in cos(polar) × uniform azimuth: exact for the degree-6 products Y_l Y_l'.
    cos_polar, weights = np.polynomial.legendre.leggauss(8)
    azimuth = np.arange(16) * 2 * np.pi / 16
    c, a = np.meshgrid(cos_polar, azimuth, indexing="ij")
    s = np.sqrt(1 - c**2)
    points = torch.tensor(np.stack([s * np.cos(a), s * np.sin(a), c], -1).reshape(-1, 3))
    w = torch.tensor(np.repeat(weights, 16) * 2 * np.pi / 16)
    y = real_spherical_harmonics(points, 4)
    gram = y.T @ (w[:, None] * y)
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)


def test_each_degree_keeps_its_norm_under_rotations_and_reflections():
    # Addition theorem: Σ_m Y_lm(n)² = (2l+1)/4π for every n, so each degree block turns by an
    # orthogonal matrix; this is why ForceNet's basis changes under rotation but its size does not.
    d = _directions(50)
    for seed, reflect in ((1, False), (2, True)):
        turned = d @ random_rotation(seed, reflect=reflect).T
        for y in (real_spherical_harmonics(d, 4), real_spherical_harmonics(turned, 4)):
            for l in range(4):
                block = y[:, l * l:(l + 1) ** 2]
                torch.testing.assert_close(
                    (block**2).sum(1), torch.full((50,), (2 * l + 1) / (4 * math.pi), dtype=torch.float64),
                    atol=1e-13, rtol=0,
                )


def test_harmonics_depend_only_on_the_direction_and_have_finite_gradients():
    d = _directions(20).requires_grad_()
    y = real_spherical_harmonics(3.7 * d, 4)
    torch.testing.assert_close(y, real_spherical_harmonics(d, 4))
    (grad,) = torch.autograd.grad(y.sum(), d)
    assert torch.isfinite(grad).all()


def test_n_degrees_outside_zero_to_three_is_refused():
    with pytest.raises(ValueError):
        real_spherical_harmonics(_directions(2), 5)
