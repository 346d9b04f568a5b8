"""Collation: edge indices offset per graph, edge vectors recomputed from positions and shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.io import read
from ase.neighborlist import neighbor_list

from molden.data import H5Dataset, collate
from molden.graph import edge_vectors
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess


@pytest.fixture
def cache(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=out, cutoff_angstrom=4.0))
    return out


def test_collate_offsets_edges_and_keeps_every_field(cache, mixed_extxyz):
    data = H5Dataset(cache)
    structures = [data[k] for k in range(6)]
    batch = collate(structures, dtype=torch.float64)
    assert batch.num_graphs == 6
    assert batch.n_node.tolist() == [s.n_atoms for s in structures]
    assert batch.n_edge.tolist() == [s.n_edges for s in structures]
    # Every edge joins two atoms of the same graph.
    i, j = batch.edge_index
    assert torch.equal(batch.batch[i], batch.batch[j])
    start = 0
    for k, s in enumerate(structures):
        edges = batch.edge_index[:, batch.batch[i] == k] - start
        np.testing.assert_array_equal(edges.numpy(), s.edge_index)
        start += s.n_atoms
    assert batch.energy.shape == (6,) and batch.forces.shape == (batch.positions.shape[0], 3)
    assert batch.fixed.dtype == torch.bool


def test_edge_vectors_equal_ase_distance_vectors(cache, mixed_extxyz):
    data = H5Dataset(cache)
    frames = read(mixed_extxyz, ":6")
    batch = collate([data[k] for k in range(6)], dtype=torch.float64)
    lengths = edge_vectors(batch).norm(dim=1)
    ref = np.concatenate([np.sort(neighbor_list("d", a, 4.0)) for a in frames])
    ours = np.concatenate(
        [np.sort(lengths[batch.batch[batch.edge_index[0]] == k].numpy()) for k in range(6)]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_noised_positions_keep_the_clean_graph_and_are_differentiable(cache):
    data = H5Dataset(cache)
    batch = collate([data[k] for k in range(3)], dtype=torch.float64)
    noised = (batch.positions + 0.02 * torch.randn_like(batch.positions)).requires_grad_()
    vectors = edge_vectors(batch, noised)
    assert vectors.shape == (int(batch.n_edge.sum()), 3)
    vectors.norm(dim=1).sum().backward()
    assert noised.grad is not None and torch.isfinite(noised.grad).all()


def test_batch_to_changes_float_dtype_only(cache):
    batch = collate([H5Dataset(cache)[0]])
    moved = batch.to("cpu", dtype=torch.float64)
    assert moved.positions.dtype == torch.float64 and moved.edge_index.dtype == torch.int64
    assert batch.positions.dtype == torch.float32  # the original is not mutated
