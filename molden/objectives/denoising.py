"""Pre-training via denoising (Zaidi et al. 2023, §3.2): noise the positions of equilibrium
structures and predict the noise; optionally mask atom types and predict them (App. H, after
AttrMask, Hu et al. 2020).

The model predicts the normalised noise ε/σ (`keys.NOISE`, unit variance per component) on free
atoms, and, with masking, the logits of each masked atom's type (`keys.ATOM_LOGITS`). Masked
atoms enter the model with `numbers = 0`, the mask token. Masking draws from every atom with a
known type, fixed atoms included: masking hides a type and moves nothing, so the fixed atoms'
"never corrupted" rule (their positions) does not apply; atoms already masked in the data
(`numbers == 0`) are never targets, having no label. Like Noisy Nodes, whose GNS it pre-trains
(App. B), the loss is averaged over every decoded block iteration unless `decode_all_blocks` is off.

Fine-tuning a frozen backbone (App. I.1) is `molden.models.freezing.freeze_backbone`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from molden.data.batch import Batch
from molden.models import keys
from molden.objectives.noise import gaussian_noise, with_positions
from molden.objectives.noisy_nodes import block_stack, free_atom_mse
from molden.objectives.objective import LOSS

NOISE_TARGET = "denoising/noise"
"""Key in `targets` of the normalised noise ε/σ, [N, 3] (zero on fixed atoms)."""

ATOM_TYPES = "denoising/atom_types"
"""Key in `targets` of the true atomic numbers, [N] int64."""

ATOM_MASK = "denoising/atom_mask"
"""Key in `targets` of the masked atoms, [N] bool."""


class DenoisingConfig(BaseModel):
    """Denoising pre-training options (Pre-training via Denoising §3.2, App. H)."""

    model_config = ConfigDict(extra="forbid")

    sigma_angstrom: float = Field(0.02, gt=0, description="standard deviation of the position noise on free atoms, Å")
    position_loss_weight: float = Field(1.0, ge=0, description="coefficient of the noise-prediction loss")
    mask_probability: float = Field(0.0, ge=0, lt=1, description="probability that an atom's type is masked")
    atom_type_loss_weight: float = Field(0.0, ge=0, description="coefficient of the masked atom-type cross-entropy")
    decode_all_blocks: bool = Field(True, description="average the loss over every block iteration's decoding")
    rebuild_graph: bool = Field(True, description="rebuild the radius graph from the noised positions")
    cutoff_angstrom: float | None = Field(None, gt=0, description="radius-graph cutoff for the rebuild, Å")
    max_num_neighbors: int | None = Field(None, ge=1, description="keep each atom's k nearest neighbours in the rebuild")

    @model_validator(mode="after")
    def _consistent(self) -> DenoisingConfig:
        if self.rebuild_graph and self.cutoff_angstrom is None:
            raise ValueError("rebuild_graph needs cutoff_angstrom (the cutoff the model was built for)")
        return self


def denoising_pcqm4mv2_paper() -> DenoisingConfig:
    """GNS-TAT pre-training on PCQM4Mv2 (Pre-training via Denoising App. H, Table 3: σ = 0.02 Å,
    position loss coefficient 1.0, mask probability 0.75, atom type loss coefficient 4.0, at most
    20 edges per vertex). The cutoff is molden's PCQM4Mv2 cache default (the paper gives none)."""
    return DenoisingConfig(sigma_angstrom=0.02, position_loss_weight=1.0, mask_probability=0.75,
                           atom_type_loss_weight=4.0, cutoff_angstrom=5.0, max_num_neighbors=20)


def denoising_cpu() -> DenoisingConfig:
    """Denoising pre-training on CPU (QM9 or PCQM4Mv2 subsets): the paper's σ, mask probability
    and weights (an objective has no size to scale)."""
    return denoising_pcqm4mv2_paper()


class Denoising:
    """Denoising pre-training objective: position loss on ε/σ plus, with masking, cross-entropy
    of the masked atoms' types (Pre-training via Denoising §3.2, App. H)."""

    def __init__(self, config: DenoisingConfig):
        self.config = config

    @property
    def needs_all_blocks(self) -> bool:
        return self.config.decode_all_blocks

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        """The noised (and masked) batch, graph rebuilt unless `rebuild_graph` is off, and the
        targets `NOISE_TARGET` [N, 3], `ATOM_TYPES` [N], `ATOM_MASK` [N] bool."""
        cfg = self.config
        noise = gaussian_noise(batch, cfg.sigma_angstrom, generator)
        mask = torch.zeros_like(batch.numbers, dtype=torch.bool)
        if cfg.mask_probability > 0:
            draw = torch.rand(batch.numbers.shape, generator=generator, dtype=torch.float64)
            mask = (draw.to(batch.numbers.device) < cfg.mask_probability) & (batch.numbers != 0)
        noisy = with_positions(batch, batch.positions + noise, rebuild_graph=cfg.rebuild_graph,
                               cutoff_angstrom=cfg.cutoff_angstrom, max_num_neighbors=cfg.max_num_neighbors)
        noisy = replace(noisy, numbers=torch.where(mask, torch.zeros_like(batch.numbers), batch.numbers))
        targets = {NOISE_TARGET: noise / cfg.sigma_angstrom, ATOM_TYPES: batch.numbers, ATOM_MASK: mask}
        return noisy, targets

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{"loss", "position" (MSE of ε/σ on free atoms), "atom_type" (cross-entropy on masked
        atoms, nats; 0 without masking), "atom_type_accuracy" (last block)}, block-averaged."""
        cfg = self.config
        position = free_atom_mse(block_stack(predictions, keys.NOISE), targets[NOISE_TARGET], batch.fixed).mean()
        total = cfg.position_loss_weight * position
        out = {"position": position}
        has_logits = keys.ATOM_LOGITS in predictions or keys.per_block(keys.ATOM_LOGITS) in predictions
        if cfg.mask_probability > 0 and (cfg.atom_type_loss_weight > 0 or has_logits):
            logits = block_stack(predictions, keys.ATOM_LOGITS)  # [K, N, 119]
            mask = targets[ATOM_MASK]
            labels = targets[ATOM_TYPES].expand(logits.shape[0], -1)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [K, N]
            weight = mask.to(nll.dtype)
            n_masked = weight.sum().clamp(min=1)
            atom_type = ((nll * weight).sum(-1) / n_masked).mean()
            correct = (logits[-1].argmax(-1) == targets[ATOM_TYPES]).to(nll.dtype)
            out["atom_type"] = atom_type
            out["atom_type_accuracy"] = (correct * weight).sum() / n_masked
            total = total + cfg.atom_type_loss_weight * atom_type
        out[LOSS] = total
        return out

    def term_weights(self, batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The position term averages over free atoms, the atom-type terms over masked atoms."""
        masked = targets[ATOM_MASK].sum().to(torch.float64)
        return {"position": (~batch.fixed).sum().to(torch.float64), "atom_type": masked, "atom_type_accuracy": masked}
