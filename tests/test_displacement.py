"""Specifications of `minimum_image_displacement`: the shortest displacement across periodic
boundaries, never across non-periodic axes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from molden.objectives.displacement import minimum_image_displacement
from symmetry import example_batch


def _brute_force(batch, start, end, reach=3):
    """Shortest image over every lattice offset in [-reach, reach]^3 on periodic axes."""
    offsets = torch.tensor(list(itertools.product(range(-reach, reach + 1), repeat=3)), dtype=start.dtype)
    periodic = batch.pbc.to(start.dtype)[batch.batch]  # [N, 3]
    shifts = offsets[None] * periodic[:, None]  # [N, K, 3]
    candidates = (end - start)[:, None] + torch.einsum("nkj,nji->nki", shifts, batch.cell[batch.batch])
    return candidates.norm(dim=-1).min(dim=1).values


def test_atom_that_crossed_the_periodic_boundary_moved_only_its_small_step():
    batch = example_batch(("bulk",))
    step = torch.tensor([0.05, -0.02, 0.03], dtype=torch.float64)
    wrapped = batch.positions.clone()
    wrapped[0] = batch.positions[0] + step + batch.cell[0, 0] - batch.cell[0, 2]  # crossed two faces
    delta = minimum_image_displacement(batch, batch.positions, wrapped)
    torch.testing.assert_close(delta[0], step, rtol=0, atol=1e-12)
    torch.testing.assert_close(delta[1:], torch.zeros_like(delta[1:]), rtol=0, atol=1e-12)


def test_displacement_is_the_shortest_image_on_a_skewed_cell():
    batch = example_batch(("bulk", "slab"))
    g = torch.Generator().manual_seed(3)
    end = batch.positions + 4.0 * torch.randn(batch.positions.shape, generator=g, dtype=torch.float64)
    delta = minimum_image_displacement(batch, batch.positions, end)
    torch.testing.assert_close(delta.norm(dim=-1), _brute_force(batch, batch.positions, end), rtol=0, atol=1e-10)
    # still a lattice translate of the raw difference on periodic axes
    fractional = torch.linalg.solve(batch.cell[batch.batch].transpose(1, 2), (end - batch.positions - delta)[..., None])[..., 0]
    torch.testing.assert_close(fractional, fractional.round(), rtol=0, atol=1e-9)


def test_non_periodic_axes_and_molecules_never_wrap():
    batch = example_batch(("molecule", "slab"))
    end = batch.positions.clone()
    slab = batch.batch == 1
    end[slab] = end[slab] + batch.cell[1, 2]  # one cell along the slab's non-periodic z
    end[~slab] = end[~slab] + torch.tensor([30.0, 0.0, 0.0], dtype=torch.float64)  # far, no cell
    delta = minimum_image_displacement(batch, batch.positions, end)
    torch.testing.assert_close(delta, end - batch.positions, rtol=0, atol=1e-12)


def test_displacement_is_differentiable_and_does_not_mutate_its_inputs():
    batch = example_batch(("bulk",))
    before = batch.positions.clone()
    end = (batch.positions + 0.1).requires_grad_()
    minimum_image_displacement(batch, batch.positions, end).sum().backward()
    torch.testing.assert_close(end.grad, torch.ones_like(end), rtol=0, atol=0)
    assert torch.equal(batch.positions, before)


def test_batch_without_periodic_axes_gets_the_plain_difference():
    batch = example_batch(("molecule",))
    batch = replace(batch, cell=torch.zeros_like(batch.cell))
    end = batch.positions * 2
    assert torch.equal(minimum_image_displacement(batch, batch.positions, end), end - batch.positions)
