"""Frozen-backbone fine-tuning (Pre-training via Denoising App. I.1): only the heads train."""

from __future__ import annotations

import torch

from molden.models import GraphScalarHead, Model, NodeVectorHead, keys
from molden.models.freezing import freeze_backbone, unfreeze_backbone
from tiny_models import PairBackbone
from symmetry import example_batch


def _model(conservative: bool = False) -> Model:
    torch.manual_seed(0)
    heads = {keys.ENERGY: GraphScalarHead(8)}
    if not conservative:
        heads[keys.NOISE] = NodeVectorHead(8)
    return Model(PairBackbone(8, blocks=1), heads, conservative_forces=conservative).double()


def test_freeze_backbone_returns_exactly_the_head_parameters():
    model = _model()
    trainable = freeze_backbone(model)
    assert {id(p) for p in trainable} == {id(p) for p in model.heads.parameters()}
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_a_step_after_freezing_changes_the_heads_and_not_the_backbone():
    model = _model()
    optimiser = torch.optim.SGD(freeze_backbone(model), lr=0.1)
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    heads_before = [p.detach().clone() for p in model.heads.parameters()]
    batch = example_batch()
    loss = (model(batch)[keys.ENERGY] - batch.energy).square().mean()
    loss.backward()
    optimiser.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, model.heads.parameters()))


def test_conservative_forces_still_flow_through_a_frozen_backbone():
    model = _model(conservative=True)
    batch = example_batch(("molecule",))
    before = model(batch)[keys.FORCES].detach()
    freeze_backbone(model)
    after = model(batch)[keys.FORCES]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert after.abs().sum() > 0


def test_unfreeze_backbone_trains_every_parameter_again():
    model = _model()
    freeze_backbone(model)
    everything = unfreeze_backbone(model)
    assert len(everything) == len(list(model.parameters())) and all(p.requires_grad for p in everything)
