"""PaiNN, the equivariant backbone: O(3) symmetry (rotations and reflections, polar vectors),
translations, permutations, DeNS force encoding, periodic images and choice of unit cell,
conservative forces; every symmetry test in float32 and float64 with per-dtype tolerances."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import torch

from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import Batch, collate
from molden.errors import MoldenConfigError
from molden.models import GraphScalarHead, Model, NodeVectorHead, keys
from molden.models.painn import PRESETS, PaiNNConfig, build_painn, count_parameters, painn_cpu, painn_paper
from molden.objectives.noise import with_positions
from molden.pipeline.structure_graphs import build_graphs
from tiny_models import assert_forces_are_energy_gradients
from symmetry import (
    TOLERANCE,
    example_atoms,
    example_batch,
    permutation_within_graphs,
    permuted,
    random_rotation,
    rotated,
    translated,
)

CUTOFF = 5.0
FEATURES = 16
# Two unshared layers applied twice: block iteration with two decoded entries.
TINY = PaiNNConfig(features=FEATURES, n_radial=8, cutoff_angstrom=CUTOFF, block_size=2, block_iterations=2)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@lru_cache(maxsize=None)
def _batch(kinds: tuple[str, ...], dtype: torch.dtype) -> Batch:
    return example_batch(kinds, cutoff=CUTOFF, dtype=dtype)


def _model(dtype: torch.dtype, config: PaiNNConfig = TINY) -> Model:
    """Energy (conservative forces) and an equivariant node-vector head on a tiny PaiNN."""
    torch.manual_seed(0)
    backbone = build_painn(config)
    heads = {
        keys.ENERGY: GraphScalarHead(config.features),
        keys.NOISE: NodeVectorHead(config.features, vector_dim=backbone.vector_dim),
    }
    return Model(backbone, heads, conservative_forces=True).to(dtype).eval()


def _with_force_inputs(batch: Batch) -> Batch:
    """Force inputs = the EMT forces on every other atom, zero rows (not encoded) elsewhere."""
    keep = (torch.arange(len(batch.positions)) % 2 == 0)[:, None].to(batch.forces.dtype)
    return replace(batch, force_inputs=batch.forces * keep)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal within TOLERANCE[dtype] relative to the outputs' scale (at least one)."""
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual.detach(), expected.detach(), atol=TOLERANCE[dtype] * scale, rtol=0)


def _assert_predictions_close(actual: dict, expected: dict, dtype: torch.dtype, rotation=None) -> None:
    r = None if rotation is None else rotation.to(dtype)
    _assert_close(actual[keys.ENERGY], expected[keys.ENERGY], dtype)
    for name in (keys.NOISE, keys.FORCES, keys.per_block(keys.NOISE)):
        if name in expected:
            _assert_close(actual[name], expected[name] if r is None else expected[name] @ r.T, dtype)


def test_painn_is_an_equivariant_backbone_with_one_latent_entry_per_block_iteration():
    backbone = build_painn(TINY).double()
    batch = _batch(("molecule", "slab", "bulk"), torch.float64)
    latents = backbone(batch, all_blocks=True)
    n = len(batch.positions)
    assert backbone.equivariant and backbone.vector_dim == FEATURES and backbone.scalar_dim == FEATURES
    assert latents.n_blocks == TINY.block_iterations
    assert [tuple(v.shape) for v in latents.vectors] == [(n, 3, FEATURES)] * TINY.block_iterations
    assert [tuple(s.shape) for s in latents.scalars] == [(n, FEATURES)] * TINY.block_iterations
    assert latents.vector_frame is None
    last = backbone(batch)
    assert last.n_blocks == 1
    torch.testing.assert_close(last.vectors[0], latents.vectors[-1])


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_energy_is_invariant_and_vectors_and_forces_are_polar_under_orthogonal_maps(dtype, reflect):
    """PaiNN's vectors are polar: under a reflection, noise and forces flip with positions
    (x → R x with det R = −1), exactly as under a rotation."""
    model = _model(dtype)
    batch = _batch(("molecule", "slab", "bulk"), dtype)
    for seed in range(2):
        r = random_rotation(seed, reflect=reflect)
        out = model(batch, all_blocks=True)
        turned = model(rotated(batch, r), all_blocks=True)
        _assert_predictions_close(turned, out, dtype, rotation=r)


def test_outputs_are_invariant_under_translation(dtype):
    model = _model(dtype)
    batch = _batch(("molecule", "slab", "bulk"), dtype)
    _assert_predictions_close(model(translated(batch, [1.7, -3.2, 0.4])), model(batch), dtype)


def test_node_outputs_follow_a_permutation_and_energy_is_invariant(dtype):
    model = _model(dtype)
    batch = _with_force_inputs(_batch(("molecule", "slab", "bulk"), dtype))
    perm = permutation_within_graphs(batch, seed=4)
    out, moved = model(batch), model(permuted(batch, perm))
    _assert_close(moved[keys.ENERGY], out[keys.ENERGY], dtype)
    _assert_close(moved[keys.NOISE], out[keys.NOISE][perm], dtype)
    _assert_close(moved[keys.FORCES], out[keys.FORCES][perm], dtype)


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_force_encoding_is_equivariant(dtype, reflect):
    """DeNS §3.2.2: turning positions, cell and force inputs together turns vector outputs."""
    model = _model(dtype)
    batch = _with_force_inputs(_batch(("molecule", "slab", "bulk"), dtype))
    r = random_rotation(7, reflect=reflect)
    out = model(batch, all_blocks=True)
    _assert_predictions_close(model(rotated(batch, r), all_blocks=True), out, dtype, rotation=r)


def test_encoded_forces_change_the_outputs_and_zero_rows_encode_nothing():
    model = _model(torch.float64)
    batch = _batch(("molecule", "slab", "bulk"), torch.float64)
    plain = model(batch)[keys.NOISE]
    zeros = model(replace(batch, force_inputs=torch.zeros_like(batch.positions)))[keys.NOISE]
    torch.testing.assert_close(zeros, plain, atol=0, rtol=0)
    encoded = model(_with_force_inputs(batch))[keys.NOISE]
    assert (encoded - plain).norm(dim=1).min() > 1e-6  # every atom is within reach of an encoded one


def test_force_inputs_on_a_model_without_force_encoding_are_refused():
    model = _model(torch.float64, TINY.model_copy(update={"force_encoding": False}))
    with pytest.raises(MoldenConfigError, match="force_encoding"):
        model(_with_force_inputs(_batch(("molecule",), torch.float64)))


def test_an_atom_moved_by_a_lattice_vector_gives_the_same_outputs(dtype):
    """Bulk: the atom pushed out of the cell by a₁ − a₃; slab: by a₁ + a₂ (periodic in x, y).
    The graph is rebuilt from the moved positions, as after noise."""
    model = _model(dtype)
    batch = _batch(("slab", "bulk"), dtype)
    slab_atom, bulk_atom = 3, int(batch.n_node[0]) + 5
    moved = batch.positions.clone()
    moved[slab_atom] += batch.cell[0, 0] + batch.cell[0, 1]
    moved[bulk_atom] += batch.cell[1, 0] - batch.cell[1, 2]
    out = model(batch)
    _assert_predictions_close(model(with_positions(batch, moved, cutoff_angstrom=CUTOFF)), out, dtype)


def _batch_in_cell(kind: str, recombination: np.ndarray, dtype: torch.dtype) -> Batch:
    """`kind` in the unit cell `recombination @ cell` (rows: integer combinations of the old
    lattice vectors), atoms wrapped into it; graph from `build_graphs`."""
    atoms = example_atoms(kind)
    atoms.set_cell(recombination @ atoms.cell.array, scale_atoms=False)
    atoms.wrap()
    structures, _ = build_graphs([structure_from_atoms(atoms, system_id=kind)], CUTOFF)
    return collate(structures, dtype=dtype)


@pytest.mark.parametrize(
    "kind, recombination",
    [
        ("bulk", [[1, 0, 0], [1, 1, 0], [-1, 2, 1]]),  # unimodular: det = 1
        ("slab", [[1, 1, 0], [-1, 0, 0], [0, 0, 1]]),  # in-plane only: the vacuum axis stays
    ],
)
def test_an_equivalent_unit_cell_gives_the_same_outputs(dtype, kind, recombination):
    m = np.array(recombination)
    assert round(abs(np.linalg.det(m))) == 1
    model = _model(dtype)
    reference = _batch_in_cell(kind, np.eye(3, dtype=int), dtype)
    other = _batch_in_cell(kind, m, dtype)
    assert not torch.allclose(other.positions, reference.positions)  # wrapping moved atoms
    _assert_predictions_close(model(other), model(reference), dtype)


def test_conservative_forces_equal_finite_differences_of_the_energy():
    model = _model(torch.float64)
    batch = _with_force_inputs(_batch(("molecule", "slab", "bulk"), torch.float64))
    assert_forces_are_energy_gradients(model, batch)


def test_presets_build_and_run():
    batch = _batch(("molecule", "slab"), torch.float32)
    assert set(PRESETS) == {"painn_paper", "painn_cpu"}
    for make in PRESETS.values():
        config = make()
        latents = build_painn(config)(batch, all_blocks=True)
        assert latents.n_blocks == config.block_iterations
        assert latents.vectors[-1].shape == (len(batch.positions), 3, config.features)
    # Snapshot of the sizes in the docs (PaiNN paper: F = 128, 3 layers, about 0.6 M).
    assert count_parameters(painn_paper()) == 584_064
    assert count_parameters(painn_cpu()) == 16_800


def test_a_batch_without_a_graph_is_refused():
    batch = _batch(("molecule",), torch.float64)
    bare = replace(batch, edge_index=None, unit_shifts=None, n_edge=None)
    with pytest.raises(MoldenConfigError, match="graph"):
        build_painn(TINY).double()(bare)
