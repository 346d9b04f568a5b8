"""Train / validation / test splits by a fixed seed, by system.

All frames of one system (same `system_id`) go to the same split, so trajectories never leak
between training and evaluation. Unique system ids are sorted before the seeded permutation,
so the split depends only on the set of ids and the seed, not on reading order.

QM9 default (documented in docs/FORMAT.md): seed 0, 10,000 validation and 10,000 test
molecules, the remaining 110,831 for training — the 10k/10k held-out sizes of Noisy Nodes
§5.2, whose 114k training set counted molecules that later QM9 releases filter out.
"""

from __future__ import annotations

import numpy as np
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class SplitConfig(BaseModel):
    """Held-out sizes, as counts of systems (when >= 1) or fractions of systems (when < 1)."""

    seed: int = 0
    val: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    group_by: Literal["system", "structure"] = Field(
        "system", description="keep all frames of a system together, or split structures independently"
    )

    @model_validator(mode="after")
    def _fractions_below_one(self) -> "SplitConfig":
        if self.val < 1 and self.test < 1 and self.val + self.test >= 1:
            raise ValueError("val + test fractions must leave something to train on")
        return self


QM9_SPLIT = SplitConfig(seed=0, val=10_000, test=10_000)


def _size(value: float, n: int) -> int:
    return min(n, int(value) if value >= 1 else int(round(value * n)))


def assign_splits(system_ids: np.ndarray, structure_index: np.ndarray, config: SplitConfig) -> np.ndarray:
    """Split name ("train", "val", "test") for each structure, given its system id (str) and
    its index in the cache (used when `config.group_by == "structure"`)."""
    keys = np.asarray(system_ids, dtype=str) if config.group_by == "system" else np.asarray(structure_index)
    unique, inverse = np.unique(keys, return_inverse=True)
    order = np.random.default_rng(config.seed).permutation(len(unique))
    n_val = _size(config.val, len(unique))
    n_test = _size(config.test, len(unique) - n_val)
    names = np.empty(len(unique), dtype=object)
    names[order[:n_val]] = "val"
    names[order[n_val : n_val + n_test]] = "test"
    names[order[n_val + n_test :]] = "train"
    return names[inverse]
