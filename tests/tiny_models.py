"""Shared test models and checks: a minimal invariant backbone for testing heads and objectives
independently of GNS/ForceNet/PaiNN, and the finite-difference check of conservative forces."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from molden.graph import edge_vectors
from molden.models import Backbone, Latents, keys


class PairBackbone(Backbone):
    """Node latents from a sum over neighbours of a smooth radial function of |d|; each of
    `blocks` iterations adds the message again (enough to exercise per-block decoding and to
    train end to end)."""

    def __init__(self, dim: int = 8, blocks: int = 2):
        super().__init__()
        self.scalar_dim = dim
        self.embed = nn.Embedding(119, dim)
        self.radial = nn.Linear(4, dim)
        self.blocks = blocks

    def forward(self, batch, *, all_blocks=False):
        d = edge_vectors(batch).norm(dim=1, keepdim=True)
        rbf = torch.exp(-(d - torch.arange(1.0, 5.0, dtype=d.dtype, device=d.device)) ** 2)
        h, out = self.embed(batch.numbers), []
        for _ in range(self.blocks):
            msg = self.radial(rbf) * h[batch.edge_index[1]]
            h = h + torch.zeros_like(h).index_add_(0, batch.edge_index[0], msg)
            out.append(torch.tanh(h))
        return Latents(scalars=out if all_blocks else out[-1:])


def assert_forces_are_energy_gradients(model, batch, *, n_atoms: int = 6, step_angstrom: float = 1e-5,
                                       rtol: float = 1e-7, seed: int = 1) -> None:
    """`model(batch)[FORCES]` equals −∂E/∂x by central differences on `n_atoms` random atoms
    (float64 batches), to `rtol` of the largest force (at least 1 eV/Å)."""
    forces = model(batch)[keys.FORCES].detach()
    g = torch.Generator().manual_seed(seed)
    scale = max(1.0, float(forces.abs().max()))
    for atom in torch.randint(len(batch.positions), (n_atoms,), generator=g).tolist():
        for axis in range(3):
            step = torch.zeros_like(batch.positions)
            step[atom, axis] = step_angstrom
            e_plus = model(replace(batch, positions=batch.positions + step))[keys.ENERGY].sum()
            e_minus = model(replace(batch, positions=batch.positions - step))[keys.ENERGY].sum()
            numeric = -(e_plus - e_minus).detach() / (2 * step_angstrom)
            assert abs(float(numeric) - float(forces[atom, axis])) < rtol * scale, (atom, axis)
