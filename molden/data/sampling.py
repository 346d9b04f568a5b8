"""Shuffled sampling that reads an on-disk cache block by block.

A cache too big for memory loads a whole block of consecutive structures when several of
them are asked for together (`H5Dataset`); a fully random order reads structures one by one,
each costing a decompressed HDF5 chunk per array (about 250/s on QM9). `BlockShuffleSampler`
shuffles the order of the blocks and the order inside each block, then interleaves a few
blocks at a time, so that every block is loaded once per epoch while batches still mix
structures from several places of the file (about 13,000/s).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from molden.data.h5_dataset import CACHED_BLOCKS, H5Dataset


class BlockShuffleSampler(Sampler[int]):
    """Dataset indices in a seeded, epoch-dependent, block-local shuffled order.

    Args:
        dataset: the `H5Dataset` sampled (its storage blocks define the grouping).
        seed: base seed; the order of epoch e depends only on (seed, e).
        mix: how many blocks are interleaved at a time; at most the number of blocks the
            dataset keeps in memory, so that each block is read from disk once per epoch.
    Call `set_epoch(e)` before each epoch, as with `DistributedSampler`.
    """

    def __init__(self, dataset: H5Dataset, *, seed: int = 0, mix: int = CACHED_BLOCKS):
        self.blocks = (dataset.indices // dataset.block_size).astype(np.int64)
        self.seed = int(seed)
        self.mix = max(1, min(int(mix), CACHED_BLOCKS))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.blocks)

    def order(self) -> np.ndarray:
        """This epoch's permutation of dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.blocks)
        # Positions grouped by block (a random order inside each), then the blocks shuffled.
        within = np.lexsort((rng.random(n), self.blocks))
        starts = np.flatnonzero(np.r_[True, self.blocks[within][1:] != self.blocks[within][:-1]])
        groups = np.split(within, starts[1:])
        groups = [groups[k] for k in rng.permutation(len(groups))]
        out = []
        for g in range(0, len(groups), self.mix):
            # Interleave `mix` blocks by drawing a random block for each slot, keeping each
            # block's own order: batches mix blocks, and each block is read once.
            chosen = groups[g : g + self.mix]
            owner = np.concatenate([np.full(len(c), k) for k, c in enumerate(chosen)])
            rng.shuffle(owner)
            merged = np.empty(len(owner), dtype=np.int64)
            for k, c in enumerate(chosen):
                merged[owner == k] = c
            out.append(merged)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())
