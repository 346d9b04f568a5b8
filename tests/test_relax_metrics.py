"""Relaxation metrics on hand-computed cases (issue 15), including an atom that crossed the
periodic boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molden.data.batch import collate
from molden.data.structure import Structure
from molden.relax.metrics import (
    adwt, energy_metrics, force_metrics, forces_below_threshold, mean_free_atom_distance,
)


def _batch():
    """Two structures: a 10 Å periodic box with 2 atoms (one fixed), a 3-atom molecule."""
    box = Structure(numbers=np.array([8, 1]), positions=np.array([[0.1, 5.0, 5.0], [5.0, 5.0, 5.0]]),
                    cell=np.eye(3) * 10.0, pbc=np.array([True, True, True]), fixed=np.array([False, True]))
    molecule = Structure(numbers=np.array([6, 8, 1]), positions=np.zeros((3, 3)), fixed=np.zeros(3, bool))
    return collate([box, molecule], dtype=torch.float64)


def test_adwt_uses_the_minimum_image_and_free_atoms_only():
    batch = _batch()
    predicted = batch.positions.clone()
    predicted[0, 0] = 9.95  # crossed the boundary: 0.15 Å from 0.1, not 9.85 Å
    predicted[1, 0] += 3.0  # fixed atom: ignored
    predicted[2:5, 0] += torch.tensor([0.1, 0.2, 0.3])  # molecule: mean 0.2 Å
    distances = mean_free_atom_distance(batch, predicted, batch.positions)
    torch.testing.assert_close(distances, torch.tensor([0.15, 0.2], dtype=torch.float64))
    thresholds = np.arange(0.01, 0.5, 0.001)
    expected = ((0.15 < thresholds).sum() + (0.2 < thresholds).sum()) / (2 * len(thresholds))
    assert adwt(distances) == pytest.approx(expected)
    assert adwt(torch.tensor([0.0, 0.0])) == 1.0 and adwt(torch.tensor([0.6])) == 0.0


def test_energy_mae_and_energy_within_threshold():
    out = energy_metrics(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.01, 2.03, 3.0]))
    assert out["energy_mae_mev"] == pytest.approx(40 / 3)
    assert out["ewt"] == pytest.approx(2 / 3)


def test_a_referenced_energy_model_reports_totals_only_where_the_structure_has_its_reference():
    """OC20 S2EF models learn energy − reference_energy (`energy_reference`): relaxation adds
    each structure's reference back, so its energies and their scores are totals; a structure
    without one gets no energy (not a referenced one passed off as a total); NaN stays NaN."""
    from dataclasses import replace

    from molden.relax.run import _metrics, total_energies

    base = Structure(numbers=np.array([6, 8]), positions=np.zeros((2, 3)), fixed=np.zeros(2, bool))
    structures = [replace(base, relaxed_energy=-100.0, targets={"reference_energy": -99.5}),
                  replace(base, relaxed_energy=-200.0, targets={"reference_energy": -197.0}),
                  replace(base, relaxed_energy=-300.0, targets={}),
                  replace(base, relaxed_energy=-400.0, targets={"reference_energy": -390.0})]
    totals = total_energies([-0.4, -2.0, 5.0, float("nan")], structures, "reference_energy")
    assert totals[:3] == [pytest.approx(-99.9), pytest.approx(-199.0), None] and np.isnan(totals[3])
    metrics = _metrics(structures, [s.positions for s in structures], totals)
    assert metrics["energy_mae_mev"] == pytest.approx((100 + 1000) / 2, rel=1e-4)  # float32 totals
    assert metrics["failed"] == 1.0


def test_force_mae_and_cosine_over_free_atoms():
    batch = _batch()
    reference = torch.zeros(5, 3, dtype=torch.float64)
    reference[:, 0] = 1.0
    predicted = reference.clone()
    predicted[0] = torch.tensor([0.0, 1.0, 0.0])  # free, orthogonal: cosine 0, |ΔF| components (1, 1, 0)
    predicted[1] = torch.tensor([-5.0, 0.0, 0.0])  # fixed: ignored
    out = force_metrics(batch, predicted, reference)
    assert out["forces_mae_mev_per_angstrom"] == pytest.approx(2 / 12 * 1000)
    assert out["forces_cosine"] == pytest.approx(3 / 4)


def test_forces_below_threshold_take_the_largest_free_atom_force():
    batch = _batch()
    forces = torch.zeros(5, 3, dtype=torch.float64)
    forces[1, 2] = 10.0  # fixed atom: ignored
    forces[3, 1] = 0.03  # the molecule's largest: 0.03
    out = forces_below_threshold(batch, forces)
    assert out["fbt"] == 1.0
    thresholds = np.arange(0.01, 0.4, 0.001)
    assert out["afbt"] == pytest.approx(((0.0 < thresholds).sum() + (0.03 < thresholds).sum()) / (2 * len(thresholds)))
