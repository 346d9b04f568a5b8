"""Objectives: how a batch is corrupted and what the model is trained to predict.

Each objective is a module with `corrupt(batch, generator) -> (batch, targets)` and
`loss(predictions, batch, targets) -> dict[str, Tensor]` (the key "loss" holds the total to
minimise; other keys are the terms, in the units their names state). One training loop
serves every objective; nothing is copied per objective.
"""

from molden.objectives.objective import Objective

__all__ = ["Objective"]
