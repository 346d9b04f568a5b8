"""Train / validation / test splits by a fixed seed, by system.

All frames of one system (same `system_id`) go to the same split, so trajectories never leak
between training and evaluation. Unique system ids are sorted before the seeded permutation,
so the split depends only on the set of ids and the seed, not on reading order.

QM9 default (documented in docs/FORMAT.md): seed 0, 10,000 validation and 10,000 test
molecules, the remaining 110,831 for training — the 10k/10k held-out sizes of Noisy Nodes
§5.2, whose 114k training set counted molecules that later QM9 releases filter out.

Held-out sizes that would leave nothing to train on are an error (`NoTrainSplitError`), never
an empty train split: `check_train_left` says so before any work where an upper bound of the
number of systems is known, `assign_splits` at the latest.
"""

from __future__ import annotations

import numpy as np
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from molden.errors import MoldenConfigError


class NoTrainSplitError(MoldenConfigError):
    """The validation and test sizes take every system: nothing would be left to train on."""


class SplitConfig(BaseModel):
    """Held-out sizes, as counts of systems (whole numbers >= 1) or fractions of systems (< 1)."""

    seed: int = 0
    val: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    group_by: Literal["system", "structure"] = Field(
        "system", description="keep all frames of a system together, or split structures independently"
    )

    @field_validator("val", "test")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        if value >= 1 and not float(value).is_integer():
            raise ValueError(f"{value:g} is neither a count of systems (a whole number) nor a fraction (below 1)")
        return value

    @model_validator(mode="after")
    def _fractions_below_one(self) -> "SplitConfig":
        if self.val < 1 and self.test < 1 and self.val + self.test >= 1:
            raise ValueError("val + test fractions must leave something to train on")
        return self

    @property
    def unit(self) -> str:
        """What the sizes count: "systems" or "structures"."""
        return "systems" if self.group_by == "system" else "structures"


QM9_SPLIT = SplitConfig(seed=0, val=10_000, test=10_000)


def _size(value: float, n: int) -> int:
    return min(n, int(value) if value >= 1 else int(round(value * n)))


def held_out_sizes(config: SplitConfig, n: int) -> tuple[int, int]:
    """(validation, test) sizes for `n` systems (or structures, by `config.group_by`)."""
    # Both fractions are of all n (10 % val and 10 % test of 100 is 10 and 10, as documented).
    n_val = _size(config.val, n)
    return n_val, min(_size(config.test, n), n - n_val)


def _no_train_message(config: SplitConfig, n: int, *, at_most: bool = False) -> str:
    out_of = f"at most {n:,}" if at_most else f"{n:,}"
    return (
        f"--val {config.val:g} and --test {config.test:g} leave no {config.unit} for training out of {out_of}: "
        "pass smaller counts or fractions such as --val 0.1 --test 0.1"
    )


def check_train_left(config: SplitConfig, n_at_most: int) -> None:
    """Raise `NoTrainSplitError` before any work when the held-out counts alone take every one
    of at most `n_at_most` systems (or structures); the run would otherwise fail at the end.

    Only counts are checked here: they take all of any smaller number too, while fractions round
    differently on fewer systems and are checked by `assign_splits` on the real number.
    """
    counts = sum(v for v in (config.val, config.test) if v >= 1)
    if n_at_most > 0 and counts >= n_at_most:
        raise NoTrainSplitError(_no_train_message(config, n_at_most, at_most=True))


def assign_splits(system_ids: np.ndarray, structure_index: np.ndarray, config: SplitConfig) -> np.ndarray:
    """Split name ("train", "val", "test") for each structure, given its system id (str) and
    its index in the cache (used when `config.group_by == "structure"`).

    Raises `NoTrainSplitError` when the validation and test sizes leave no system to train on.
    """
    keys = np.asarray(system_ids, dtype=str) if config.group_by == "system" else np.asarray(structure_index)
    unique, inverse = np.unique(keys, return_inverse=True)
    n_val, n_test = held_out_sizes(config, len(unique))
    if len(unique) and n_val + n_test >= len(unique):
        raise NoTrainSplitError(_no_train_message(config, len(unique)))
    order = np.random.default_rng(config.seed).permutation(len(unique))
    names = np.empty(len(unique), dtype=object)
    names[order[:n_val]] = "val"
    names[order[n_val : n_val + n_test]] = "test"
    names[order[n_val + n_test :]] = "train"
    return names[inverse]
