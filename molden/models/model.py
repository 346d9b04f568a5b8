"""A model: one backbone and named heads; `forward(batch) -> dict` of predictions.

Forces are either a direct head (`keys.FORCES` registered as a `NodeVectorHead`) or
conservative: −∂E/∂positions through autograd of the `keys.ENERGY` head
(`conservative_forces=True`), on any backbone, since every backbone computes its edge vectors
from `batch.positions`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
from torch import Tensor, nn

from molden.data.batch import Batch
from molden.models import keys
from molden.models.backbone import Backbone
from molden.models.heads import Head


class Model(nn.Module):
    """`backbone` + `heads` (name → head; names from `molden.models.keys` or the user's)."""

    def __init__(self, backbone: Backbone, heads: Mapping[str, Head], *, conservative_forces: bool = False):
        super().__init__()
        if conservative_forces and keys.ENERGY not in heads:
            raise ValueError("conservative forces need an energy head")
        if conservative_forces and keys.FORCES in heads:
            raise ValueError("forces are either a head or conservative, not both")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.conservative_forces = conservative_forces

    def forward(self, batch: Batch, *, all_blocks: bool = False) -> dict[str, Tensor]:
        """Predictions of the last block iteration; with `all_blocks` also every head stacked
        over block iterations under `keys.per_block(name)` ([K, ...])."""
        positions = None
        if self.conservative_forces:
            positions = batch.positions if batch.positions.requires_grad else batch.positions.detach().requires_grad_()
            batch = replace(batch, positions=positions)
        latents = self.backbone(batch, all_blocks=all_blocks)
        out: dict[str, Tensor] = {keys.NODE_LATENTS: latents.scalars[-1]}
        for name, head in self.heads.items():
            if all_blocks and latents.n_blocks > 1:
                stacked = torch.stack([head(latents, k, batch) for k in range(latents.n_blocks)])
                out[keys.per_block(name)] = stacked
                out[name] = stacked[-1]
            else:
                out[name] = head(latents, -1, batch)
                if all_blocks:
                    out[keys.per_block(name)] = out[name][None]
        if self.conservative_forces:
            energy = out[keys.ENERGY]
            (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=self.training)
            out[keys.FORCES] = -gradient
        return out

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
