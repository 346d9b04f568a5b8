"""The objective contract shared by Noisy Nodes, denoising pre-training, DeNS and the
supervised losses."""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor

from molden.data.batch import Batch

LOSS = "loss"
"""Key of the scalar to minimise in every `Objective.loss` result."""


@runtime_checkable
class Objective(Protocol):
    """What the training loop calls, in this order, once per step."""

    def corrupt(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, dict[str, Tensor]]:
        """The model's input batch (noised, masked, graph rebuilt; never mutated in place)
        and the targets the loss compares with. Randomness only from `generator`, so a
        resumed run draws the same noise."""
        ...

    def loss(self, predictions: Mapping[str, Tensor], batch: Batch, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": scalar to minimise, term name: scalar, ...}; 0 for a perfect predictor."""
        ...

    @property
    def needs_all_blocks(self) -> bool:
        """True when the loss reads every block iteration's decoding (Noisy Nodes)."""
        ...


@runtime_checkable
class ProgressAware(Protocol):
    """An objective whose weights follow the run (DeNS's decaying λ_DeNS)."""

    def set_progress(self, fraction: float) -> None:
        """step / steps, from the training loop before every step: a function of the step, so
        a resumed run (on any number of processes) sees the same values."""
        ...


def term_weights(objective: object, batch: Batch, targets: Mapping[str, Tensor], names) -> dict[str, Tensor]:
    """How many items each loss term of this batch averages over (structures by default;
    atoms for per-atom terms when the objective has `term_weights`), so terms of many batches
    combine into the mean over all items, as the metric is defined."""
    structures = torch.tensor(float(batch.num_graphs), dtype=torch.float64, device=batch.positions.device)
    own = getattr(objective, "term_weights", None)
    given = own(batch, targets) if own is not None else {}
    return {name: torch.as_tensor(given.get(name, structures), dtype=torch.float64, device=structures.device) for name in names}
