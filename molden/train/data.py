"""Which structures each optimiser step reads, on every process, for any number of processes.

An epoch is a list of dynamic batches over the whole train split, the same on every process
(seeded by (seed, epoch)). With W processes and A batches accumulated per step there are
V = W × A "virtual ranks": step t of the epoch reads batches t·V … t·V + V − 1, process r the
A batches r·A … r·A + A − 1 of them. So one process accumulating 2 batches reads exactly
what two DDP processes read together, and the position inside an epoch is a batch count that
means the same thing on any number of processes: a checkpoint from N processes resumes on M.

Batches are cut to a count that is a multiple of V by halving the largest ones
(`DynamicBatchSampler`), so no structure is dropped or repeated within an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from molden.data.batch import Batch
from molden.data.dynamic_batches import DynamicBatchSampler
from molden.data import h5_schema as S
from molden.data.h5_dataset import H5Dataset, open_cache
from molden.data.sampling import BlockShuffleSampler, RandomOrderSampler
from molden.errors import MoldenConfigError
from molden.graph.edges import edges_per_graph
from molden.graph.verlet import batch_edge_lengths
from molden.train.config import DataConfig


def open_split(config: DataConfig, split: str, *, subset: int | None = None, seed: int = 0,
               frames: str | None = None) -> H5Dataset:
    """The cache's `split` (only each trajectory's first or last frame with `frames="initial"`
    or `"relaxed"`; default `config.frames`), or a seeded random subset of `subset` of its structures."""
    dataset = H5Dataset(config.path, split)
    frames = frames or config.frames
    if frames != "all":
        dataset.indices = dataset.indices[trajectory_frames(config.path, dataset.indices, frames)]
    if len(dataset) == 0:
        raise MoldenConfigError(f"{config.path}: split {split!r} is empty")
    if subset is not None:
        if subset > len(dataset):
            raise MoldenConfigError(f"--train-size {subset} is more than the {len(dataset)} structures of split {split!r}")
        pick = np.sort(np.random.default_rng([seed, 7]).permutation(len(dataset))[:subset])
        dataset.indices = dataset.indices[pick]
    return dataset


def trajectory_frames(path, indices: np.ndarray, which: str) -> np.ndarray:
    """Positions in `indices` of the structures that are the first ("initial") or last
    ("relaxed") frame of their system's trajectory."""
    with open_cache(path) as f:
        if S.FRAME not in f:
            return np.arange(len(indices))
        frame = f[S.FRAME][:][indices]
        system = f[S.SYSTEM_ID].asstr()[:][indices] if len(indices) else np.zeros(0, dtype=object)
    _, owner = np.unique(system, return_inverse=True)
    n = owner.max() + 1 if len(owner) else 0
    if which == "relaxed":
        chosen = np.full(n, -1, dtype=np.int64)
        np.maximum.at(chosen, owner, frame)
    else:
        chosen = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(chosen, owner, frame)
    return np.flatnonzero(frame == chosen[owner])


def batch_sampler(dataset: H5Dataset, config: DataConfig, *, seed: int, virtual_ranks: int) -> DynamicBatchSampler:
    """Dynamic batches of `dataset` under the config's budgets, as many as a multiple of
    `virtual_ranks`; block-shuffled for a cache that stays on disk."""
    order = (RandomOrderSampler(len(dataset), seed=seed) if dataset.storage != "disk"
             else BlockShuffleSampler(dataset, seed=seed, world_size=1, rank=0))
    needs_edges = config.max_edges is not None
    return DynamicBatchSampler(
        order, dataset.atom_counts, dataset.edge_counts if needs_edges else None,
        max_atoms=config.max_atoms, max_edges=config.max_edges, max_graphs=config.max_graphs,
        rank=0, world_size=virtual_ranks,
    )


class _Listed(Sampler[list[int]]):
    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


@dataclass
class StepPlan:
    """The micro-batches of this process for the steps of one epoch."""

    epoch: int
    steps: int
    """Optimiser steps in the epoch."""
    batches: list[list[list[int]]]
    """[step][accumulated batch] → dataset indices, for this process."""


def epoch_plan(sampler: DynamicBatchSampler, epoch: int, *, rank: int, world_size: int, accumulate: int) -> StepPlan:
    sampler.set_epoch(epoch)
    every = sampler.global_batches()
    v = world_size * accumulate
    steps = len(every) // v
    mine = [[every[t * v + rank * accumulate + a].tolist() for a in range(accumulate)] for t in range(steps)]
    return StepPlan(epoch=epoch, steps=steps, batches=mine)


def loader(dataset: H5Dataset, batches: list[list[int]], config: DataConfig, dtype: torch.dtype, pin: bool) -> DataLoader:
    """A DataLoader that yields collated `Batch`es of exactly `batches`, in order, each read
    and collated in one call (`H5Dataset.collated`), in the workers when there are some."""
    return DataLoader(
        _Collated(dataset, dtype), batch_sampler=_Listed(batches), collate_fn=_as_is,
        num_workers=config.workers, pin_memory=pin,
        persistent_workers=False, prefetch_factor=4 if config.workers else None,
    )


class _Collated(torch.utils.data.Dataset):
    """`dataset` for a DataLoader with a batch sampler: `__getitems__` (which the loader calls
    with a batch's positions) returns the collated `Batch` at once."""

    def __init__(self, dataset: H5Dataset, dtype: torch.dtype):
        self.dataset, self.dtype = dataset, dtype

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> Batch:
        return self.dataset.collated([position], dtype=self.dtype)

    def __getitems__(self, positions: list[int]) -> Batch:
        return self.dataset.collated(positions, dtype=self.dtype)


def _as_is(batch: Batch) -> Batch:
    return batch


def validation_batches(dataset: H5Dataset, config: DataConfig, *, rank: int, world_size: int) -> list[list[int]]:
    """This process's share of the validation split in fixed-order batches (every structure
    exactly once over all processes, none repeated, so reduced metrics are exact)."""
    sampler = DynamicBatchSampler(np.arange(len(dataset)), dataset.atom_counts,
                                  dataset.edge_counts if config.max_edges is not None else None,
                                  max_atoms=config.max_atoms, max_edges=config.max_edges, max_graphs=config.max_graphs,
                                  rank=0, world_size=1)
    every = [b.tolist() for b in sampler.global_batches()]
    return every[rank::world_size]


def move(batch: Batch, device: torch.device, cutoff_angstrom: float | None = None) -> Batch:
    """`batch` on `device`, its cached graph cut to `cutoff_angstrom` when the model's radius is
    below the cache's (so clean and rebuilt-after-noise graphs hold the same edges). A whole
    radius graph (`Batch.graph_cutoff_angstrom`) stays wide until `for_model`, after the
    corruption: the graph after noise is then filtered from it, not searched."""
    batch = batch if device.type == "cpu" else batch.to(device, non_blocking=True)
    if cutoff_angstrom is None or batch.graph_cutoff_angstrom is not None:
        return batch
    return trim_graph(batch, cutoff_angstrom)


def for_model(clean: Batch, inputs: Batch, cutoff_angstrom: float | None) -> Batch:
    """The corrupted `inputs` of the batch `clean` (as `move` gave it), with a graph that may
    be wider than the model's `cutoff_angstrom` cut to it. A graph the corruption kept (noise
    without a rebuild) is cut where the clean positions put its edges, as `move` would have."""
    if cutoff_angstrom is None:
        return inputs
    if inputs.edge_index is clean.edge_index:  # the corruption kept the graph
        if not _wider(clean, cutoff_angstrom):
            return inputs  # `move` cut it already
        unmoved = inputs.positions is clean.positions
        return replace(_kept(inputs, _within(clean, cutoff_angstrom)),
                       graph_cutoff_angstrom=cutoff_angstrom if unmoved else None)
    # a new graph: cut when wider, or of unknown radius (a capped rebuild at the objective's cutoff)
    unknown = inputs.graph_cutoff_angstrom is None
    return trim_graph(inputs, cutoff_angstrom) if unknown or _wider(inputs, cutoff_angstrom) else inputs


def _wider(batch: Batch, cutoff_angstrom: float) -> bool:
    return batch.graph_cutoff_angstrom is not None and batch.graph_cutoff_angstrom > cutoff_angstrom


def trim_graph(batch: Batch, cutoff_angstrom: float) -> Batch:
    """The batch with only the edges shorter than `cutoff_angstrom` (Å), by the radius graph's
    exact test, so a whole radius graph stays one (at the smaller cutoff)."""
    trimmed = _kept(batch, _within(batch, cutoff_angstrom))
    return replace(trimmed, graph_cutoff_angstrom=None if batch.graph_cutoff_angstrom is None else cutoff_angstrom)


def _within(batch: Batch, cutoff_angstrom: float) -> Tensor:
    """[E] bool: the edges shorter than `cutoff_angstrom` at the batch's positions."""
    lengths = batch_edge_lengths(batch, batch.positions.detach(), periodic=bool(batch.unit_shifts.any()))
    return lengths.to(torch.float64) < cutoff_angstrom  # the radius graph's exact test


def _kept(batch: Batch, keep: Tensor) -> Batch:
    keep = keep.nonzero().squeeze(1)  # one device wait, not one per boolean index
    edge_index = batch.edge_index[:, keep]
    n_edge = edges_per_graph(batch.batch[edge_index[0]], batch.num_graphs)
    return replace(batch, edge_index=edge_index, unit_shifts=batch.unit_shifts[keep], n_edge=n_edge)
