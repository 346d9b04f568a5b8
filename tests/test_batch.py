"""Collation: edge indices offset per graph, records mapped back, graph-less batches, pinning;
edge vectors recomputed from (noised) positions and shifts."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from ase.io import read
from ase.neighborlist import neighbor_list
from torch.utils.data._utils.pin_memory import pin_memory

from molden.data import Batch, H5Dataset, Structure, collate
from molden.errors import MoldenInputError
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


def test_edge_vectors_of_noised_positions_are_their_shifted_differences_with_analytic_gradients(cache):
    data = H5Dataset(cache)
    structures = [data[k] for k in range(6)]  # bulk, slab and molecule, twice
    batch = collate(structures, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(batch.positions.shape, generator=generator, dtype=torch.float64)
    noised = (batch.positions + noise).requires_grad_()
    vectors = edge_vectors(batch, noised)
    # Reference per structure, in numpy: pos[j] + S @ cell - pos[i] over the batch's graph.
    start = 0
    reference = []
    for s in structures:
        pos = noised.detach().numpy()[start : start + s.n_atoms]
        i, j = s.edge_index
        reference.append(pos[j] + s.unit_shifts @ s.cell - pos[i])
        start += s.n_atoms
    np.testing.assert_allclose(vectors.detach().numpy(), np.concatenate(reference), rtol=0, atol=1e-12)
    # d(sum of lengths)/d(pos_a) = sum of unit vectors of edges ending at a minus those starting at a.
    vectors.norm(dim=1).sum().backward()
    units = (vectors / vectors.norm(dim=1, keepdim=True)).detach()
    i, j = batch.edge_index
    expected = torch.zeros_like(noised).index_add_(0, j, units).index_add_(0, i, -units)
    torch.testing.assert_close(noised.grad, expected, rtol=0, atol=1e-12)


def test_batch_to_changes_float_dtype_only(cache):
    batch = collate([H5Dataset(cache)[0]])
    moved = batch.to("cpu", dtype=torch.float64)
    assert moved.positions.dtype == torch.float64 and moved.edge_index.dtype == torch.int64
    assert batch.positions.dtype == torch.float32  # the original is not mutated



def test_batch_to_keeps_unit_shifts_and_indices_integer(cache):
    moved = collate([H5Dataset(cache)[k] for k in range(3)]).to("cpu", dtype=torch.float64, non_blocking=True)
    assert moved.unit_shifts.dtype == torch.int32 and moved.n_edge.dtype == torch.int64
    assert moved.structure_index.dtype == torch.int64 and moved.energy.dtype == torch.float64


def test_batch_maps_back_to_cache_records(cache):
    data = H5Dataset(cache)
    picked = [7, 2, 11]
    batch = collate([data[k] for k in picked])
    assert batch.structure_index.tolist() == picked
    assert batch.system_ids == tuple(data[k].system_id for k in picked)
    loose = collate([Structure(numbers=[1, 1], positions=[[0, 0, 0], [0, 0, 0.7]], system_id="h2")])
    assert loose.structure_index.tolist() == [-1] and loose.system_ids == ("h2",)


def test_structures_without_a_graph_collate_to_a_batch_without_one(cache):
    data = H5Dataset(cache)
    bare = [replace(data[k], edge_index=None, unit_shifts=None) for k in range(4)]
    batch = collate(bare)
    assert not batch.has_graph
    assert batch.edge_index is None and batch.unit_shifts is None and batch.n_edge is None
    assert batch.positions.shape == (sum(s.n_atoms for s in bare), 3)
    assert collate([data[0]]).has_graph


def test_collate_names_the_record_that_cannot_join_the_batch(cache):
    data = H5Dataset(cache)
    good = data[0]
    cases = [
        (replace(data[1], edge_index=None, unit_shifts=None, system_id="no-graph"), "no-graph.*no graph"),
        (replace(data[1], energy=None, system_id="no-energy"), "no-energy.*no energy"),
        (replace(data[1], targets={"gap": 1.0}, system_id="odd-targets"), "odd-targets.*targets"),
    ]
    for odd, message in cases:
        with pytest.raises(MoldenInputError, match=message):
            collate([good, odd])
    with pytest.raises(MoldenInputError, match="no structures"):
        collate([])


def test_pin_memory_follows_the_dataloader_protocol(cache, monkeypatch):
    # DataLoader(pin_memory=True) calls `batch.pin_memory()` on whatever collate returns;
    # without an accelerator torch cannot pin, so stand in a pin that marks each tensor.
    pinned = set()

    def fake_pin(t):
        out = t.clone()
        pinned.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = collate([H5Dataset(cache)[k] for k in range(3)])
    result = pin_memory(batch)
    assert isinstance(result, Batch)
    tensors = [getattr(result, f.name) for f in fields(result)]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert tensors and all(id(t) in pinned for t in tensors)
    assert result.system_ids == batch.system_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to pin memory")
def test_pinned_batch_moves_to_cuda_without_blocking(cache):
    batch = collate([H5Dataset(cache)[k] for k in range(3)]).pin_memory()
    assert batch.positions.is_pinned() and batch.edge_index.is_pinned()
    moved = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert moved.positions.is_cuda and torch.equal(moved.edge_index.cpu(), batch.edge_index)


def test_structures_of_a_batch_equal_the_batch_of_those_structures():
    """`Batch.structures(a, b)` (the relax provider's runs of structures) is exactly the batch
    collated from structures a..b: every per-atom, per-structure and per-edge field, indices
    renumbered from zero."""
    import dataclasses

    from ase.build import fcc111, molecule

    from molden.data.ase_convert import structure_from_atoms
    from molden.objectives.noise import with_positions

    systems = [molecule("H2O"), fcc111("Cu", (2, 2, 3), vacuum=5.0), molecule("CH4"), fcc111("Pt", (2, 2, 2), vacuum=4.0)]
    for atoms in systems:
        atoms.set_tags(np.arange(len(atoms)) % 3)
        atoms.set_array("forces", np.random.default_rng(len(atoms)).normal(size=(len(atoms), 3)))
    structures = [structure_from_atoms(a, system_id=f"s{k}") for k, a in enumerate(systems)]

    def graphed(batch):
        return with_positions(batch, batch.positions, cutoff_angstrom=4.0)

    whole = graphed(collate(structures))
    for start, stop in [(0, 1), (1, 3), (2, 4), (0, 4)]:
        part = whole.structures(start, stop)
        expected = graphed(collate(structures[start:stop]))
        for field in dataclasses.fields(expected):
            got, want = getattr(part, field.name), getattr(expected, field.name)
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want), field.name
            else:
                assert got == want, field.name
