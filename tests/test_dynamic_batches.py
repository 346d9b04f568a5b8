"""DynamicBatchSampler: Noisy Nodes' atom/edge/graph budgets, equal batch counts per rank,
every structure once per epoch, and a multi-worker DataLoader over a cache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from molden.data import H5Dataset, collate
from molden.data.dynamic_batches import DynamicBatchSampler
from molden.data.sampling import BlockShuffleSampler, RandomOrderSampler
from molden.errors import MoldenConfigError
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess


def _counts(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """QM9-like sizes: 3-29 atoms, 8-24 edges per atom."""
    rng = np.random.default_rng(seed)
    atoms = rng.integers(3, 30, n)
    return atoms, atoms * rng.integers(8, 25, n)


def _rank_batches(make, world_size: int, epoch: int = 0) -> list[list[np.ndarray]]:
    out = []
    for rank in range(world_size):
        sampler = make(rank)
        sampler.set_epoch(epoch)
        out.append([np.asarray(b) for b in sampler])
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    world_size=st.integers(1, 5),
    max_atoms=st.one_of(st.none(), st.integers(29, 300)),
    max_edges=st.one_of(st.none(), st.integers(29 * 24, 5000)),
    max_graphs=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_budgets_hold_ranks_get_equal_counts_and_cover_each_structure_once(
    n, world_size, max_atoms, max_edges, max_graphs, seed
):
    atoms, edges = _counts(n, seed)
    make = lambda rank: DynamicBatchSampler(  # noqa: E731
        RandomOrderSampler(n, seed=seed), atoms, edges, max_atoms=max_atoms, max_edges=max_edges,
        max_graphs=max_graphs, rank=rank, world_size=world_size,
    )
    shares = _rank_batches(make, world_size, epoch=seed % 3)
    assert len({len(s) for s in shares}) == 1  # every rank steps the same number of times
    batches = [b for share in shares for b in share]
    assert all(len(b) >= 1 for b in batches)
    for b in batches:
        assert len(b) <= max_graphs
        assert max_atoms is None or atoms[b].sum() <= max_atoms
        assert max_edges is None or edges[b].sum() <= max_edges
    counts = np.bincount(np.concatenate(batches), minlength=n) if batches else np.zeros(n)
    if n >= len(shares[0]) * world_size:
        assert (counts == 1).all()  # exactly once
    else:  # fewer structures than batches across ranks: whole batches repeat to fill up
        assert (counts >= 1).all()


def test_batches_fill_until_the_next_structure_would_exceed_a_budget():
    atoms, edges = _counts(5000)
    sampler = RandomOrderSampler(5000, seed=1)
    batches = list(DynamicBatchSampler(sampler, atoms, edges, max_atoms=256, max_edges=4096, max_graphs=8))
    order = sampler.order()
    assert np.array_equal(np.concatenate(batches), order)  # batches follow the sampler's order
    for b, following in zip(batches[:-1], batches[1:]):
        grown = np.r_[b, following[0]]
        assert len(grown) > 8 or atoms[grown].sum() > 256 or edges[grown].sum() > 4096


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_together_cover_each_structure_exactly_once_with_block_shuffling(world_size):
    n = 3001
    atoms, edges = _counts(n)
    data = SimpleNamespace(indices=np.arange(n), block_size=64)
    make = lambda rank: DynamicBatchSampler(  # noqa: E731
        BlockShuffleSampler(data, seed=5, world_size=1), atoms, edges,
        max_atoms=256, max_edges=4096, max_graphs=8, rank=rank, world_size=world_size,
    )
    for epoch in (0, 1):
        shares = _rank_batches(make, world_size, epoch)
        assert len({len(s) for s in shares}) == 1
        assert np.array_equal(np.sort(np.concatenate([b for s in shares for b in s])), np.arange(n))


def test_batches_depend_only_on_seed_and_epoch():
    atoms, edges = _counts(800)

    def epoch_batches(seed, epoch):
        sampler = DynamicBatchSampler(RandomOrderSampler(800, seed=seed), atoms, edges, max_atoms=128)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in sampler.batches()]

    assert epoch_batches(1, 2) == epoch_batches(1, 2)
    assert epoch_batches(1, 2) != epoch_batches(1, 3)
    assert epoch_batches(1, 2) != epoch_batches(2, 2)


def test_a_structure_over_a_budget_is_refused_with_the_budget_it_needs():
    atoms = np.array([5, 40, 7, 33])
    with pytest.raises(MoldenConfigError, match=r"2 of 4 structures have more atoms than max_atoms=32 \(--max-atoms\), "
                                                r"the largest 40: raise it to at least 40"):
        DynamicBatchSampler(range(4), atoms, max_atoms=32)


def test_a_sharded_inner_sampler_or_no_budget_is_refused():
    atoms = np.ones(10, dtype=np.int64)
    data = SimpleNamespace(indices=np.arange(10), block_size=4)
    with pytest.raises(MoldenConfigError, match="world_size=1"):
        DynamicBatchSampler(BlockShuffleSampler(data, rank=0, world_size=2), atoms, max_atoms=4)
    with pytest.raises(MoldenConfigError, match="at least one"):
        DynamicBatchSampler(range(10), atoms)
    with pytest.raises(MoldenConfigError, match="edge_counts"):
        DynamicBatchSampler(range(10), atoms, max_edges=100)


@pytest.fixture
def cache(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=out, cutoff_angstrom=4.0))
    return out


def test_dataloader_with_two_workers_yields_each_structure_once_within_budgets(cache):
    data = H5Dataset(cache, "train")  # a split: dataset positions differ from cache positions
    budgets = dict(max_atoms=40, max_edges=1500, max_graphs=4)
    sampler = DynamicBatchSampler(
        BlockShuffleSampler(data, seed=2, world_size=1), data.atom_counts, data.edge_counts, **budgets
    )
    sampler.set_epoch(1)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=2)
    seen = []
    for batch in loader:
        assert int(batch.n_node.sum()) <= budgets["max_atoms"]
        assert int(batch.n_edge.sum()) <= budgets["max_edges"]
        assert batch.num_graphs <= budgets["max_graphs"]
        seen.append(batch.structure_index)
    assert len(seen) == len(sampler)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.from_numpy(data.indices))
