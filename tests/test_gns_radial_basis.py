"""The shared radial features (molden/models/radial_basis.py)."""

from __future__ import annotations

import math

import torch

from molden.models.radial_basis import bessel_basis, cosine_cutoff, polynomial_envelope


def test_bessel_basis_is_the_formula_of_noisy_nodes_and_vanishes_at_the_cutoff():
    d = torch.tensor([0.5, 1.7, 4.2], dtype=torch.float64)
    out = bessel_basis(d, 4, 5.0)
    assert out.shape == (3, 4)
    c = 3
    torch.testing.assert_close(out[:, c - 1], math.sqrt(2 / 5.0) * torch.sin(c * math.pi * d / 5.0) / d)
    assert bessel_basis(torch.tensor([5.0], dtype=torch.float64), 8, 5.0).abs().max() < 1e-12


def test_envelopes_go_from_one_to_zero_and_the_polynomial_one_smoothly():
    d = torch.tensor([0.0, 2.0, 5.0, 6.0], dtype=torch.float64, requires_grad=True)
    for envelope in (cosine_cutoff(d, 5.0), polynomial_envelope(d, 5.0)):
        assert float(envelope[0]) == 1.0 and float(envelope[2]) == 0.0 and float(envelope[3]) == 0.0
        assert 0 < float(envelope[1]) < 1
    near = torch.tensor([5.0 - 1e-4], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(polynomial_envelope(near, 5.0).sum(), near, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), near)
    assert abs(float(slope)) < 1e-6 and abs(float(curvature)) < 1e-2
