"""ForceNet (ForceNet §2, App. A, D): symmetries, periodic images, forces, force encoding, presets."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from molden.models import Model, keys
from molden.models.forcenet import (
    ForceNetConfig,
    build_forcenet,
    forcenet_cpu,
    forcenet_energy_head,
    forcenet_force_head,
    forcenet_paper,
)
from molden.objectives.noise import with_positions
from symmetry import TOLERANCE, example_batch, permutation_within_graphs, permuted, random_rotation, rotated, translated

CUTOFF = 5.0
ATOL = TOLERANCE[torch.float64]


def _config(**changes) -> ForceNetConfig:
    base = dict(hidden_dim=16, n_layers=2, n_frequencies=8, cutoff_angstrom=CUTOFF)
    return ForceNetConfig(**(base | changes))


def _model(conservative: bool = False, **changes) -> Model:
    torch.manual_seed(0)
    config = _config(**changes)
    heads = {keys.ENERGY: forcenet_energy_head(config)}
    if not conservative:
        heads[keys.FORCES] = forcenet_force_head(config)
    return Model(build_forcenet(config), heads, conservative_forces=conservative).double().eval()


def _assert_same(a: dict, b: dict, names=(keys.ENERGY, keys.FORCES, keys.NODE_LATENTS)) -> None:
    for name in names:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=0)


def test_outputs_are_invariant_to_translation_in_float64():
    model, batch = _model(), example_batch(cutoff=CUTOFF)
    _assert_same(model(batch), model(translated(batch, [1.3, -2.1, 0.7])))


def test_node_outputs_follow_a_permutation_and_graph_outputs_are_invariant():
    model, batch = _model(), example_batch(cutoff=CUTOFF)
    perm = permutation_within_graphs(batch, seed=4)
    out, moved = model(batch), model(permuted(batch, perm))
    torch.testing.assert_close(moved[keys.ENERGY], out[keys.ENERGY], atol=ATOL, rtol=0)
    torch.testing.assert_close(moved[keys.FORCES], out[keys.FORCES][perm], atol=ATOL, rtol=0)
    torch.testing.assert_close(moved[keys.NODE_LATENTS], out[keys.NODE_LATENTS][perm], atol=ATOL, rtol=0)


def test_forcenet_is_not_rotation_equivariant_its_forces_do_not_turn_with_the_input():
    # §2: the basis Y_l≥1(n_st) reads Cartesian directions, so a turned input gives other
    # latents, another energy, and forces that are not the turned forces (the paper trains with
    # rotation augmentation instead).
    model, batch = _model(), example_batch(cutoff=CUTOFF)
    r = random_rotation(5)
    out, turned = model(batch), model(rotated(batch, r))
    mismatch = (turned[keys.FORCES] - out[keys.FORCES] @ r.T).norm()
    assert mismatch > 0.05 * out[keys.FORCES].norm()
    assert (turned[keys.ENERGY] - out[keys.ENERGY]).abs().max() > 1e-4 * out[keys.ENERGY].abs().max()


@pytest.mark.parametrize("reflect", [False, True])
def test_without_directional_harmonics_latents_and_outputs_are_rotation_invariant(reflect):
    # L = 1 keeps only the constant Y_0 ("Only-dist", App. F.2.2): directions are the only way a
    # rotation enters, so latents, energy and even the direct forces stay exactly the same.
    model, batch = _model(n_sph_degrees=1), example_batch(cutoff=CUTOFF)
    _assert_same(model(batch), model(rotated(batch, random_rotation(6, reflect=reflect))))


def _wrapped_atom(batch, atom: int, lattice_vector: int):
    """`batch` with one atom moved by a lattice vector of its cell, graph rebuilt."""
    shift = torch.zeros_like(batch.positions)
    shift[atom] = batch.cell[batch.batch[atom], lattice_vector]
    return with_positions(batch, batch.positions + shift, cutoff_angstrom=CUTOFF)


@pytest.mark.parametrize("kind, atom, lattice_vector", [("bulk", 3, 2), ("slab", 5, 0), ("slab", 12, 1)])
def test_an_atom_moved_by_a_lattice_vector_gives_the_same_outputs(kind, atom, lattice_vector):
    model, batch = _model(), example_batch((kind,), cutoff=CUTOFF)
    moved = _wrapped_atom(batch, atom, lattice_vector)
    assert not torch.equal(moved.unit_shifts, batch.unit_shifts)  # the images really changed
    _assert_same(model(batch), model(moved))


def test_an_equivalent_unit_cell_gives_the_same_outputs():
    model, batch = _model(), example_batch(("bulk", "slab"), cutoff=CUTOFF)
    cell = batch.cell.clone()
    cell[:, 0] = batch.cell[:, 0] + batch.cell[:, 1]  # a unimodular change of basis within the periodic plane
    other = with_positions(replace(batch, cell=cell), batch.positions, cutoff_angstrom=CUTOFF)
    _assert_same(model(batch), model(other))


def test_edges_beyond_the_cutoff_contribute_nothing():
    model = _model()
    near, far = example_batch(cutoff=CUTOFF), example_batch(cutoff=CUTOFF + 1.5)
    assert far.edge_index.shape[1] > near.edge_index.shape[1]
    _assert_same(model(near), model(far))


def test_direct_forces_and_block_latents_have_the_documented_shapes():
    model, batch = _model(n_layers=3), example_batch(cutoff=CUTOFF)
    out = model(batch, all_blocks=True)
    n = len(batch.positions)
    assert out[keys.FORCES].shape == (n, 3)
    assert out[keys.per_block(keys.FORCES)].shape == (3, n, 3)
    assert out[keys.ENERGY].shape == (batch.num_graphs,)
    torch.testing.assert_close(out[keys.per_block(keys.FORCES)][-1], model(batch)[keys.FORCES])


def test_conservative_forces_equal_finite_differences_of_the_energy():
    model, batch = _model(conservative=True), example_batch(("molecule", "slab"), cutoff=CUTOFF)
    forces = model(batch)[keys.FORCES].detach()
    energy = Model(model.backbone, {keys.ENERGY: model.heads[keys.ENERGY]}).eval()  # same weights, no autograd
    h = 1e-5
    with torch.no_grad():
        for atom in (0, 11, 21):  # a molecule atom, a fixed slab atom, the adsorbate
            for axis in range(3):
                step = torch.zeros_like(batch.positions)
                step[atom, axis] = h
                e_plus = energy(replace(batch, positions=batch.positions + step))[keys.ENERGY].sum()
                e_minus = energy(replace(batch, positions=batch.positions - step))[keys.ENERGY].sum()
                assert abs(float(-(e_plus - e_minus) / (2 * h)) - float(forces[atom, axis])) < 1e-6


def test_force_encoding_reads_force_inputs_only_when_enabled():
    batch = example_batch(cutoff=CUTOFF)
    forces = replace(batch, force_inputs=batch.forces)
    zeros = replace(batch, force_inputs=torch.zeros_like(batch.forces))
    plain, encoding = _model(), _model(force_encoding=True)
    _assert_same(plain(batch), plain(forces))  # flag off: force inputs ignored
    _assert_same(encoding(batch), encoding(zeros))  # no force inputs = zero rows (DeNS: atoms not corrupted)
    changed = (encoding(forces)[keys.FORCES] - encoding(batch)[keys.FORCES]).abs().max()
    assert changed > 1e-6


def test_masked_atoms_and_both_node_feature_kinds_give_finite_outputs():
    batch = example_batch(cutoff=CUTOFF)
    masked = replace(batch, numbers=batch.numbers.clone().index_fill_(0, torch.tensor([0, 9]), 0))
    for node_features in ("element_properties", "embedding"):
        out = _model(node_features=node_features)(masked)
        assert torch.isfinite(out[keys.FORCES]).all() and torch.isfinite(out[keys.ENERGY]).all()


def test_batch_norm_trains_and_float32_runs():
    model = _model().float().train()
    out = model(example_batch(cutoff=CUTOFF, dtype=torch.float32))
    (out[keys.FORCES].square().mean() + out[keys.ENERGY].square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_paper_preset_matches_the_published_size_and_the_cpu_preset_is_small():
    # Table 2: ForceNet (512 channels, 5 layers) has 11.3 M parameters (backbone + force decoder).
    paper = forcenet_paper()
    assert (paper.hidden_dim, paper.n_layers, paper.n_frequencies, paper.n_sph_degrees) == (512, 5, 50, 3)
    n_paper = Model(build_forcenet(paper), {keys.FORCES: forcenet_force_head(paper)}).n_parameters()
    assert abs(n_paper - 11.3e6) < 0.05e6
    cpu = forcenet_cpu()
    assert Model(build_forcenet(cpu), {keys.FORCES: forcenet_force_head(cpu)}).n_parameters() < 200_000
