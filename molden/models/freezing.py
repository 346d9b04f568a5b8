"""Frozen-backbone fine-tuning (Pre-training via Denoising App. I.1): keep the pre-trained
backbone fixed and train only the heads (the decoder, which does no message passing)."""

from __future__ import annotations

from torch import nn

from molden.models.model import Model


def freeze_backbone(model: Model) -> list[nn.Parameter]:
    """Stop gradients to every backbone parameter (`requires_grad = False`) and return the
    parameters that still train (the heads'), to hand to the optimiser.

    Autograd then records nothing for the backbone's weights, so a step costs the heads' backward
    only (conservative forces still flow through the backbone to the positions). Modules with
    training-time behaviour (dropout, batch statistics) are unaffected: put the backbone in
    `eval()` after each `model.train()` if it has any.
    """
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def unfreeze_backbone(model: Model) -> list[nn.Parameter]:
    """Undo `freeze_backbone`: every parameter trains again; returns them all."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return list(model.parameters())
