"""Objectives: how a batch is corrupted and what the model is trained to predict.

Each objective is a module with `corrupt(batch, generator) -> (batch, targets)` and
`loss(predictions, batch, targets) -> dict[str, Tensor]` (the key "loss" holds the total to
minimise; other keys are the terms, in the units their names state). One training loop
serves every objective; nothing is copied per objective.
"""

from molden.objectives.dens import DeNS, DeNSConfig
from molden.objectives.denoising import Denoising, DenoisingConfig
from molden.objectives.noisy_nodes import NoisyNodes, NoisyNodesConfig, PrimaryLoss
from molden.objectives.objective import LOSS, Objective
from molden.objectives.supervised import GraphTargetLoss, IS2RELoss, IS2RSLoss, S2EFConfig, S2EFLoss, TargetNormalizer

__all__ = [
    "LOSS", "DeNS", "DeNSConfig", "Denoising", "DenoisingConfig", "GraphTargetLoss", "IS2RELoss", "IS2RSLoss",
    "NoisyNodes", "NoisyNodesConfig", "Objective", "PrimaryLoss", "S2EFConfig", "S2EFLoss", "TargetNormalizer",
]
