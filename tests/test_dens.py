"""Specifications of DeNS (DeNS §3.2, Algorithm 2): partial corruption of free atoms, p_DeNS
per structure, force encoding, which atoms predict noise and which forces, the paper preset."""

from __future__ import annotations

from dataclasses import replace

from dataclasses import fields

import pytest
import torch

from molden.graph import neighbor_list
from molden.models import keys
from molden.objectives import Objective
from molden.objectives.dens import (DENS_ATOMS, DENS_STRUCTURES, DeNS, DeNSConfig, dens_cpu, dens_md17_paper,
                                    dens_oc20_2m_paper, dens_oc20_all_md_paper, encoded_forces)
from molden.objectives.supervised import S2EFConfig, S2EFLoss
from symmetry import example_batch

CONFIG = DeNSConfig(probability=0.5, corruption_ratio=0.5, coefficient=10.0, sigma_angstrom=0.1,
                    s2ef=S2EFConfig(energy_coefficient=2.0, force_coefficient=100.0, fixed_atom_weight=0.0),
                    rebuild_graph=False)


@pytest.fixture(scope="module")
def batch():
    return example_batch(("molecule", "slab", "bulk"))


def _perfect(targets):
    return {keys.ENERGY: targets[keys.ENERGY], keys.FORCES: targets[keys.FORCES], keys.NOISE: targets[keys.NOISE]}


def test_paper_preset_is_table_7_for_oc20_s2ef_2m():
    c = dens_oc20_2m_paper()
    assert (c.probability, c.coefficient, c.sigma_angstrom, c.corruption_ratio) == (0.5, 10.0, 0.1, 0.5)
    assert (c.s2ef.energy_coefficient, c.s2ef.force_coefficient, c.s2ef.fixed_atom_weight) == (2.0, 100.0, 0.0)
    # Eq. 1's σ_E of OC20's S2EF labels, energy − reference_energy; the CPU preset trains EMT's totals
    assert (c.s2ef.energy_scale, c.s2ef.energy_reference) == ("energy_std", "reference_energy")
    all_md = dens_oc20_all_md_paper().s2ef  # Table 7, S2EF-All+MD: λ_E 4, the rest as S2EF-2M
    assert (all_md.energy_coefficient, all_md.force_coefficient, all_md.energy_scale, all_md.energy_reference) == (
        4.0, 100.0, "energy_std", "reference_energy")
    assert (dens_cpu().s2ef.energy_scale, dens_cpu().s2ef.energy_reference) == ("energy_std", None)
    assert isinstance(DeNS(c), Objective)


def test_corruption_moves_only_free_atoms_of_dens_structures(batch):
    noisy, targets = DeNS(CONFIG.model_copy(update={"probability": 1.0, "corruption_ratio": 1.0})).corrupt(
        batch, torch.Generator().manual_seed(0))
    moved = (noisy.positions != batch.positions).any(dim=1)
    assert torch.equal(moved, ~batch.fixed)  # p = r = 1: every free atom, never a fixed one
    assert torch.equal(targets[DENS_ATOMS], ~batch.fixed)
    torch.testing.assert_close(noisy.positions - batch.positions, targets[keys.NOISE] * 0.1, rtol=0, atol=1e-12)
    assert targets[keys.NOISE].shape == (len(batch.positions), 3) and targets[DENS_STRUCTURES].shape == (3,)


def test_force_inputs_are_the_original_forces_of_corrupted_atoms_and_zero_elsewhere(batch):
    noisy, targets = DeNS(CONFIG).corrupt(batch, torch.Generator().manual_seed(4))
    corrupted = targets[DENS_ATOMS]
    assert corrupted.any() and not corrupted.all()
    scale = CONFIG.s2ef.force_scale_ev_per_angstrom
    torch.testing.assert_close(noisy.force_inputs[corrupted], encoded_forces(batch.forces[corrupted], scale))
    assert torch.all(noisy.force_inputs[~corrupted] == 0)
    assert torch.equal(targets[keys.FORCES], batch.forces) and torch.equal(targets[keys.ENERGY], batch.energy)
    assert torch.all(noisy.positions[~corrupted] == batch.positions[~corrupted])


def test_dens_uses_the_configured_fractions_of_structures_and_free_atoms(batch):
    objective = DeNS(CONFIG.model_copy(update={"probability": 0.3, "corruption_ratio": 0.25}))
    g = torch.Generator().manual_seed(11)
    structures, chosen, candidates = 0, 0, 0
    draws = 300
    free = ~batch.fixed
    for _ in range(draws):
        _, targets = objective.corrupt(batch, g)
        picked = targets[DENS_STRUCTURES]
        structures += int(picked.sum())
        in_dens = picked[batch.batch] & free
        candidates += int(in_dens.sum())
        chosen += int(targets[DENS_ATOMS].sum())
        assert not (targets[DENS_ATOMS] & ~in_dens).any()
    n = draws * batch.num_graphs
    assert abs(structures / n - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert abs(chosen / candidates - 0.25) < 4 * (0.25 * 0.75 / candidates) ** 0.5


def test_loss_is_zero_for_a_perfect_predictor_and_each_atom_answers_for_its_own_task(batch):
    objective = DeNS(CONFIG.model_copy(update={"probability": 1.0}))
    noisy, targets = objective.corrupt(batch, torch.Generator().manual_seed(2))
    corrupted = targets[DENS_ATOMS][:, None]
    perfect = _perfect(targets)
    assert objective.loss(perfect, noisy, targets)["loss"] == 0
    # noise on uncorrupted atoms and forces on corrupted atoms are not trained
    ignored = {**perfect, keys.NOISE: torch.where(corrupted, perfect[keys.NOISE], 5.0),
               keys.FORCES: torch.where(corrupted, 5.0, perfect[keys.FORCES])}
    assert objective.loss(ignored, noisy, targets)["loss"] == 0
    wrong_noise = {**perfect, keys.NOISE: torch.where(corrupted, perfect[keys.NOISE] + 1.0, perfect[keys.NOISE])}
    assert objective.loss(wrong_noise, noisy, targets)["dens_noise_l2mae"] > 0
    # the energy of the original structure is still trained from the corrupted one (Eq. 6)
    wrong_energy = {**perfect, keys.ENERGY: perfect[keys.ENERGY] + 0.1}
    assert float(objective.loss(wrong_energy, noisy, targets)["loss"]) == pytest.approx(2.0 * 0.1)


def test_noise_term_is_weighted_by_lambda_and_divided_by_every_free_atom(batch):
    objective = DeNS(CONFIG.model_copy(update={"probability": 1.0}))
    noisy, targets = objective.corrupt(batch, torch.Generator().manual_seed(2))
    perfect = _perfect(targets)
    off = torch.tensor([0.0, 0.3, 0.4], dtype=torch.float64)  # |off| = 0.5 on every atom
    result = objective.loss({**perfect, keys.NOISE: perfect[keys.NOISE] + off}, noisy, targets)
    n_corrupted, n_free = int(targets[DENS_ATOMS].sum()), int((~batch.fixed).sum())
    assert float(result["loss"]) == pytest.approx(10.0 * 0.5 * n_corrupted / n_free)  # Algorithm 2 line 25


def test_without_dens_structures_the_loss_is_the_s2ef_loss(batch):
    objective = DeNS(CONFIG.model_copy(update={"probability": 0.0}))
    noisy, targets = objective.corrupt(batch, torch.Generator().manual_seed(0))
    assert torch.equal(noisy.positions, batch.positions) and torch.all(noisy.force_inputs == 0)
    predictions = {**_perfect(targets), keys.FORCES: targets[keys.FORCES] + 0.2, keys.ENERGY: targets[keys.ENERGY] - 0.3}
    s2ef = S2EFLoss(CONFIG.s2ef)
    assert torch.equal(objective.loss(predictions, noisy, targets)["loss"], s2ef.loss(predictions, batch, targets)["loss"])


def test_same_seed_same_corruption_and_the_input_batch_is_never_mutated(batch):
    snapshot = {f.name: getattr(batch, f.name).clone() for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
    objective = DeNS(dens_cpu())
    a, ta = objective.corrupt(batch, torch.Generator().manual_seed(5))
    b, tb = objective.corrupt(batch, torch.Generator().manual_seed(5))
    c, _ = objective.corrupt(batch, torch.Generator().manual_seed(6))
    assert torch.equal(a.positions, b.positions) and torch.equal(ta[DENS_ATOMS], tb[DENS_ATOMS])
    assert not torch.equal(a.positions, c.positions)
    objective.loss(_perfect(ta), a, ta)
    for name, value in snapshot.items():
        assert torch.equal(getattr(batch, name), value), name


def test_rebuilt_graph_is_the_radius_graph_of_the_noised_positions(batch):
    objective = DeNS(dens_cpu().model_copy(update={"probability": 1.0, "corruption_ratio": 1.0, "sigma_angstrom": 0.3}))
    noisy, _ = objective.corrupt(batch, torch.Generator().manual_seed(1))
    edge_index, shifts = neighbor_list(noisy.positions, 5.0, cell=noisy.cell, pbc=noisy.pbc, batch=noisy.batch, n_node=noisy.n_node)
    key = lambda ei, s: sorted(zip(ei[0].tolist(), ei[1].tolist(), map(tuple, s.tolist())))  # noqa: E731
    assert key(noisy.edge_index, noisy.unit_shifts) == key(edge_index, shifts)


def test_encoded_forces_keep_direction_and_order_but_stay_below_one():
    forces = torch.tensor([[0.3, 0.0, 0.4], [30.0, 0.0, 40.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    encoded = encoded_forces(forces, 0.5)
    norms = encoded.norm(dim=1)
    torch.testing.assert_close(norms[:2], torch.tensor([0.5, 100 / 101], dtype=torch.float64))  # m/(1+m), m = |f|/σ_F
    torch.testing.assert_close(encoded[1] / norms[1], forces[1] / forces[1].norm())  # same direction
    assert torch.equal(encoded[2], torch.zeros(3, dtype=torch.float64))


def test_painn_stays_finite_with_a_huge_input_force(batch):
    from molden.models import Model, NodeVectorHead, keys as k
    from molden.models.painn import build_painn, painn_cpu

    torch.manual_seed(0)
    backbone = build_painn(painn_cpu())
    model = Model(backbone, {k.FORCES: NodeVectorHead(backbone.scalar_dim, backbone.vector_dim)}).float()
    loud = replace(batch, forces=batch.forces * 0 + 55.0).to(dtype=torch.float32)  # the worst EMT frame's 55 eV/Å
    emt_scale = CONFIG.s2ef.model_copy(update={"force_scale_ev_per_angstrom": 0.24})  # EMT's force rms
    config = CONFIG.model_copy(update={"probability": 1.0, "corruption_ratio": 1.0, "s2ef": emt_scale})
    noisy, _ = DeNS(config).corrupt(loud, torch.Generator().manual_seed(0))
    assert torch.isfinite(model(noisy)[k.FORCES]).all()


def test_md17_preset_is_table_9_with_a_linearly_decaying_coefficient():
    c = dens_md17_paper()
    assert (c.probability, c.coefficient, c.sigma_angstrom, c.corruption_ratio) == (0.25, 5.0, 0.05, 0.25)
    assert (c.s2ef.energy_coefficient, c.s2ef.force_coefficient, c.coefficient_schedule) == (1.0, 80.0, "linear_decay")


@pytest.mark.parametrize(("schedule", "progress", "factor"),
                         [("constant", 0.7, 1.0), ("linear_decay", 0.0, 1.0), ("linear_decay", 0.25, 0.75),
                          ("linear_decay", 1.0, 0.0)])
def test_the_noise_term_weight_follows_the_schedule_over_the_run(batch, schedule, progress, factor):
    objective = DeNS(CONFIG.model_copy(update={"probability": 1.0, "coefficient_schedule": schedule}))
    noisy, targets = objective.corrupt(batch, torch.Generator().manual_seed(2))
    perfect = _perfect(targets)
    off = torch.tensor([0.0, 0.3, 0.4], dtype=torch.float64)
    objective.set_progress(progress)
    result = objective.loss({**perfect, keys.NOISE: perfect[keys.NOISE] + off}, noisy, targets)
    n_corrupted, n_free = int(targets[DENS_ATOMS].sum()), int((~batch.fixed).sum())
    assert float(result["loss"]) == pytest.approx(factor * 10.0 * 0.5 * n_corrupted / n_free)
