"""BlockShuffleSampler: per-rank shares under DDP, block-local reads, (seed, epoch) determinism."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest

from molden.data.h5_dataset import CACHED_BLOCKS
from molden.data.sampling import BlockShuffleSampler, RandomOrderSampler
from molden.errors import MoldenConfigError


def _dataset(n: int = 1001, block_size: int = 16, seed: int = 0) -> SimpleNamespace:
    """What the sampler reads of an `H5Dataset`: a split's storage indices (sorted, with
    gaps, as a split stores them) and the block size."""
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(3 * n, size=n, replace=False))
    return SimpleNamespace(indices=indices, block_size=block_size)


def _shares(data, world_size: int, drop_last: bool, epoch: int = 0, seed: int = 7) -> list[np.ndarray]:
    samplers = [
        BlockShuffleSampler(data, seed=seed, rank=r, world_size=world_size, drop_last=drop_last)
        for r in range(world_size)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return [np.fromiter(iter(s), dtype=np.int64) for s in samplers]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_together_cover_each_structure_once_per_epoch(world_size, drop_last):
    n = 1001  # not a multiple of 2, 3 or 4
    shares = _shares(_dataset(n), world_size, drop_last)
    expected = n // world_size if drop_last else -(-n // world_size)
    assert [len(s) for s in shares] == [expected] * world_size
    counts = np.bincount(np.concatenate(shares), minlength=n)
    if drop_last:  # at most once; fewer than world_size left out
        assert counts.max() == 1 and n - counts.sum() == n % world_size
    else:  # at least once; only the padding (fewer than world_size) repeats
        assert counts.min() == 1 and counts.sum() - n == expected * world_size - n
        assert counts.max() <= 2


def test_ranks_split_exactly_when_the_size_divides():
    shares = _shares(_dataset(1000), 4, drop_last=False)
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(1000))


def test_ranks_read_their_own_blocks():
    data = _dataset()
    world_size = 4
    shares = _shares(data, world_size, drop_last=True)
    blocks = data.indices // data.block_size
    touched = [set(blocks[s].tolist()) for s in shares]
    shared = sum(len(a & b) for k, a in enumerate(touched) for b in touched[k + 1 :])
    assert shared <= world_size - 1  # only the blocks on the boundaries between shares


@pytest.mark.parametrize("world_size", [1, 3])
def test_each_rank_loads_each_of_its_blocks_once_with_the_dataset_block_cache(world_size):
    data = _dataset(2000, block_size=32)
    blocks = data.indices // data.block_size
    for order in _shares(data, world_size, drop_last=True, epoch=2):
        cache: OrderedDict[int, None] = OrderedDict()
        loads = 0
        for b in blocks[order].tolist():  # H5Dataset keeps the last CACHED_BLOCKS blocks
            if b in cache:
                cache.move_to_end(b)
                continue
            loads += 1
            cache[b] = None
            if len(cache) > CACHED_BLOCKS:
                cache.popitem(last=False)
        assert loads == len(set(blocks[order].tolist()))


def test_order_depends_only_on_seed_epoch_and_rank():
    data = _dataset()
    first = _shares(data, 2, False, epoch=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, _shares(data, 2, False, epoch=3)))
    assert not np.array_equal(first[0], _shares(data, 2, False, epoch=4)[0])
    assert not np.array_equal(first[0], _shares(data, 2, False, epoch=3, seed=8)[0])


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(MoldenConfigError, match="rank 2"):
        BlockShuffleSampler(_dataset(), rank=2, world_size=2)


def test_an_empty_split_gives_an_empty_order():
    assert len(list(BlockShuffleSampler(_dataset(0), world_size=2, rank=1))) == 0


def test_random_order_is_a_permutation_fixed_by_seed_and_epoch():
    sampler = RandomOrderSampler(50, seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(50))
    again = RandomOrderSampler(50, seed=3)
    again.set_epoch(1)
    assert list(again) == order
    again.set_epoch(2)
    assert list(again) != order
