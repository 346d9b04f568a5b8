"""Shuffled sampling that reads an on-disk cache block by block, sharded for DDP.

A cache too big for memory loads a whole block of consecutive structures when several of
them are asked for together (`H5Dataset`); a fully random order reads structures one by one,
each costing a decompressed HDF5 chunk per array (about 250/s on QM9). `BlockShuffleSampler`
shuffles the order of the blocks and the order inside each block, then interleaves a few
blocks at a time, so that every block is loaded once per epoch while batches still mix
structures from several places of the file (about 13,000/s). Under DDP each rank takes a
contiguous share of the shuffled blocks, so ranks read their own blocks (at most one block
on each boundary between two ranks is read by both).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from molden.data.h5_dataset import CACHED_BLOCKS, H5Dataset
from molden.errors import MoldenConfigError


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): the given ones, else torch.distributed's when it is initialised, else (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise MoldenConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    return int(rank), int(world_size)


def _interleave(seq: np.ndarray, blocks: np.ndarray, mix: int, rng: np.random.Generator) -> np.ndarray:
    """`seq` (runs of equal `blocks`) with each window of `mix` runs randomly interleaved,
    every run keeping its own order: batches mix blocks while each block is read once."""
    if len(seq) == 0:
        return seq
    run = np.cumsum(np.r_[True, blocks[1:] != blocks[:-1]]) - 1
    window = run // mix
    # Shuffle the run labels within each window; the k-th slot labelled r then takes the
    # k-th element of run r (runs are in ascending order in `seq`, so a stable sort works).
    owner = run[np.lexsort((rng.random(len(seq)), window))]
    merged = np.empty_like(seq)
    merged[np.argsort(owner, kind="stable")] = seq
    return merged


class BlockShuffleSampler(Sampler[int]):
    """Dataset indices in a seeded, epoch-dependent, block-local shuffled order, per rank.

    Args:
        dataset: the `H5Dataset` sampled (its storage blocks define the grouping).
        seed: base seed; the order of epoch e depends only on (seed, e, rank, world_size).
        mix: how many blocks are interleaved at a time; at most the number of blocks the
            dataset keeps in memory, so that each block is read from disk once per epoch.
        rank, world_size: this process's share under DDP; default torch.distributed's
            when it is initialised, else 0 and 1.
        drop_last: as `torch.utils.data.DistributedSampler`: every rank gets the same
            number of indices, floor(n / world_size) with `drop_last` (the last few of the
            shuffled order are left out, different ones each epoch), else ceil(n / world_size)
            with the start of the shuffled order repeated to fill up.
    Call `set_epoch(e)` before each epoch, as with `DistributedSampler`.
    """

    def __init__(
        self,
        dataset: H5Dataset,
        *,
        seed: int = 0,
        mix: int = CACHED_BLOCKS,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ):
        self.blocks = (dataset.indices // dataset.block_size).astype(np.int64)
        self.seed = int(seed)
        self.mix = max(1, min(int(mix), CACHED_BLOCKS))
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, w = len(self.blocks), self.world_size
        return n // w if self.drop_last else -(-n // w)

    def global_order(self) -> np.ndarray:
        """This epoch's shuffled order of all dataset indices, blocks kept together, before
        sharding; the same on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.blocks)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        within = np.lexsort((rng.random(n), self.blocks))  # by block, random inside each
        run = np.cumsum(np.r_[True, self.blocks[within][1:] != self.blocks[within][:-1]]) - 1
        new_place = np.argsort(rng.permutation(int(run[-1]) + 1))
        return within[np.argsort(new_place[run], kind="stable")]

    def order(self) -> np.ndarray:
        """This rank's indices for this epoch, in the order they are read."""
        order = self.global_order()
        share = len(self)
        total = share * self.world_size
        if total > len(order) and len(order) > 0:
            order = np.resize(order, total)  # repeats from the start, as DistributedSampler
        mine = order[self.rank * share : (self.rank + 1) * share]
        rng = np.random.default_rng([self.seed, self.epoch, 1, self.rank])
        return _interleave(mine, self.blocks[mine], self.mix, rng)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


class RandomOrderSampler(Sampler[int]):
    """A seeded random permutation of range(length) that changes with `set_epoch`.

    Unlike `torch.utils.data.RandomSampler`, the order of epoch e depends only on
    (seed, e), so a resumed run replays it; for in-memory datasets, or to wrap in
    `DynamicBatchSampler`.
    """

    def __init__(self, length: int, *, seed: int = 0):
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.length)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())
