"""Specifications of the supervised losses (QM9 targets, IS2RE, IS2RS, S2EF) and the target
normaliser: units, shapes, zero loss for a perfect predictor, fixed atoms, rotation augmentation."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import ase.units
import numpy as np
import pytest
import torch

from molden.data.h5_dataset import H5Dataset
from molden.data.h5_writer import CacheWriter
from molden.data.structure import Structure
from molden.graph import edge_vectors
from molden.models import keys
from molden.objectives import Objective
from molden.objectives.supervised import (
    GraphTargetLoss,
    IS2RELoss,
    IS2RSLoss,
    S2EFConfig,
    S2EFLoss,
    TargetNormalizer,
    s2ef_forcenet_paper,
)
from molden.objectives.rotation import random_rotations
from molden.objectives.units import HARTREE_TO_EV, HARTREE_TO_MEV
from symmetry import example_batch

REFERENCE_HA = {1: -0.5, 6: -37.8, 7: -54.5, 8: -75.0}  # Ha per atom of H, C, N, O


def _snapshot(batch):
    return {f.name: getattr(batch, f.name).clone() for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}


def _assert_unchanged(batch, snapshot):
    for name, value in snapshot.items():
        assert torch.equal(getattr(batch, name), value), name


@pytest.fixture(scope="module")
def qm9_cache(tmp_path_factory):
    """A QM9-like cache: U0 = Σ per-element energies + a little noise (Ha), gap in Ha; one
    structure in four is "val" with targets far off, which the statistics must ignore."""
    rng = np.random.default_rng(0)
    structures = []
    for k in range(120):
        numbers = rng.choice(list(REFERENCE_HA), size=rng.integers(3, 10))
        val = k % 4 == 0
        u0 = sum(REFERENCE_HA[z] for z in numbers) + rng.normal(scale=0.01) + (50.0 if val else 0.0)
        structures.append(Structure(
            numbers=numbers, positions=rng.normal(size=(len(numbers), 3)) * 2,
            targets={"gap": 0.25 + 0.05 * rng.normal() + (9.0 if val else 0.0), "U0": u0},
            system_id=f"gdb_{k}", split="val" if val else "train",
            edge_index=np.zeros((2, 0), np.int64), unit_shifts=np.zeros((0, 3), np.int32),
        ))
    path = tmp_path_factory.mktemp("qm9") / "qm9.h5"
    writer = CacheWriter(path, {"source": "test"})
    writer.write(structures)
    writer.finalize(lambda ids, index: np.full(len(ids), "train", dtype=object))
    return path


def _qm9_batch(path, split="train", n=16):
    from molden.data.batch import collate

    dataset = H5Dataset(path, split)
    return collate([dataset[i] for i in range(n)], dtype=torch.float64), dataset


def test_hartree_lives_in_one_place_with_ases_codata_value():
    assert HARTREE_TO_EV == ase.units.Hartree
    assert HARTREE_TO_MEV == pytest.approx(27211.386, abs=1e-3)


def test_normalizer_from_statistics_reproduces_the_cache_statistics(qm9_cache):
    dataset = H5Dataset(qm9_cache)
    stats = dataset.statistics()
    normalizer = TargetNormalizer.from_statistics(stats, dataset.target_names)
    np.testing.assert_array_equal(normalizer.mean.numpy(), stats["targets_mean"])
    np.testing.assert_array_equal(normalizer.std.numpy(), stats["targets_std"])
    fitted = TargetNormalizer.from_cache(qm9_cache, ["gap"])  # no reference: the same numbers
    np.testing.assert_allclose(fitted.mean.numpy(), stats["targets_mean"][[dataset.target_names.index("gap")]], rtol=1e-12)
    np.testing.assert_allclose(fitted.std.numpy(), stats["targets_std"][[dataset.target_names.index("gap")]], rtol=1e-12)


def test_element_references_are_fitted_on_the_train_split_by_linear_regression(qm9_cache):
    normalizer = TargetNormalizer.from_cache(qm9_cache, ["U0", "gap"])
    fitted = normalizer.element_reference[0, list(REFERENCE_HA)].numpy()
    np.testing.assert_allclose(fitted, list(REFERENCE_HA.values()), atol=0.01)  # val's +50 Ha ignored
    assert torch.all(normalizer.element_reference[1] == 0)  # gap is not an energy: no reference
    batch, _ = _qm9_batch(qm9_cache, "train", n=90)
    normalized = normalizer.normalize(batch.targets[:, [1, 0]], batch)
    assert normalized[:, 0].abs().max() < 5  # the references removed the size dependence
    torch.testing.assert_close(normalized.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.3, rtol=0)


def test_normalizer_round_trips(qm9_cache):
    normalizer = TargetNormalizer.from_cache(qm9_cache, ["U0", "gap"])
    batch, _ = _qm9_batch(qm9_cache)
    values = batch.targets[:, [1, 0]]
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(values, batch), batch), values, rtol=0, atol=1e-10)


def test_graph_target_loss_is_zero_for_a_perfect_predictor_and_reports_mev(qm9_cache):
    objective = GraphTargetLoss(TargetNormalizer.from_cache(qm9_cache, ["U0", "gap"]))
    assert isinstance(objective, Objective)
    batch, _ = _qm9_batch(qm9_cache)
    snapshot = _snapshot(batch)
    same, targets = objective.corrupt(batch, torch.Generator().manual_seed(0))
    assert same is batch and targets[keys.TARGETS].shape == (16, 2)
    perfect = objective.loss({keys.TARGETS: targets["targets_normalized"]}, batch, targets)
    assert perfect["loss"] == 0 and perfect["mae_U0_meV"] == 0
    error_ha = 0.001
    off = targets["targets_normalized"] + error_ha / objective.normalizer.std
    result = objective.loss({keys.TARGETS: off}, batch, targets)
    assert result["loss"] > 0
    assert float(result["mae_U0_meV"]) == pytest.approx(error_ha * HARTREE_TO_MEV, rel=1e-9)
    assert float(result["mae_gap_meV"]) == pytest.approx(error_ha * HARTREE_TO_MEV, rel=1e-9)
    _assert_unchanged(batch, snapshot)


def test_is2re_loss_reads_relaxed_energy_in_ev():
    batch = example_batch(("slab", "bulk"))
    batch = replace(batch, relaxed_energy=torch.tensor([1.5, -0.5], dtype=torch.float64))
    objective = IS2RELoss(mean_ev=0.5, std_ev=2.0)
    _, targets = objective.corrupt(batch, torch.Generator())
    perfect = (targets["relaxed_energy"] - 0.5) / 2.0
    assert objective.loss({keys.TARGETS: perfect[:, None]}, batch, targets)["loss"] == 0
    result = objective.loss({keys.TARGETS: perfect[:, None] + 0.05}, batch, targets)
    assert result["loss"] > 0 and float(result["energy_mae_mev"]) == pytest.approx(100.0)


def test_is2rs_targets_are_minimum_image_deltas_and_fixed_atoms_do_not_count():
    batch = example_batch(("slab",))
    step = 0.1 * torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    relaxed = batch.positions + step
    relaxed[-1] = relaxed[-1] + batch.cell[0, 0]  # the relaxer wrapped the adsorbate back in the cell
    batch = replace(batch, relaxed_positions=relaxed)
    objective = IS2RSLoss(delta_std_angstrom=0.5)
    _, targets = objective.corrupt(batch, torch.Generator())
    torch.testing.assert_close(targets[keys.POSITION_DELTA], step, rtol=0, atol=1e-12)
    prediction = targets[keys.POSITION_DELTA] / 0.5
    prediction = torch.where(batch.fixed[:, None], prediction + 10.0, prediction)  # fixed: ignored
    assert objective.loss({keys.POSITION_DELTA: prediction}, batch, targets)["loss"] == 0
    result = objective.loss({keys.POSITION_DELTA: prediction + 0.2}, batch, targets)
    assert result["loss"] > 0
    assert float(result["position_distance_mae_angstrom"]) == pytest.approx(0.1 * 3**0.5)


def test_s2ef_loss_weights_fixed_atoms_by_the_configured_fraction():
    batch = example_batch(("slab",))
    objective = S2EFLoss(S2EFConfig(energy_coefficient=1.0, force_coefficient=1.0, force_loss="mae", fixed_atom_weight=0.05))
    _, targets = objective.corrupt(batch, torch.Generator())
    assert targets[keys.ENERGY].shape == (1,) and targets[keys.FORCES].shape == (len(batch.positions), 3)
    perfect = {keys.ENERGY: targets[keys.ENERGY], keys.FORCES: targets[keys.FORCES]}
    assert objective.loss(perfect, batch, targets)["loss"] == 0
    wrong_fixed = targets[keys.FORCES] + batch.fixed[:, None].to(torch.float64)  # 1 eV/Å on fixed atoms
    result = objective.loss({**perfect, keys.FORCES: wrong_fixed}, batch, targets)
    n_fixed, n_free = int(batch.fixed.sum()), int((~batch.fixed).sum())
    assert float(result["loss"]) == pytest.approx(0.05 * n_fixed / (n_free + 0.05 * n_fixed))
    assert result["forces_mae_mev_per_angstrom"] == 0  # reported on free atoms only
    result = objective.loss({**perfect, keys.ENERGY: targets[keys.ENERGY] + 0.01}, batch, targets)
    assert float(result["energy_mae_mev"]) == pytest.approx(10.0)


def test_s2ef_reports_no_energy_error_for_an_energy_it_does_not_train():
    """ForceNet trains forces only (λ_E = 0): the energy head beside them learns nothing, and an
    energy MAE of it would read as a result. Forces are reported whenever predicted."""
    batch = example_batch(("slab",))
    forces_only = S2EFLoss(S2EFConfig(energy_coefficient=0.0, force_coefficient=1.0, force_loss="mae"))
    _, targets = forces_only.corrupt(batch, torch.Generator())
    predictions = {keys.ENERGY: targets[keys.ENERGY] + 2.0, keys.FORCES: targets[keys.FORCES] + 0.1}
    result = forces_only.loss(predictions, batch, targets)
    assert not any(name.startswith("energy") for name in result)
    assert float(result["forces_mae_mev_per_angstrom"]) == pytest.approx(100.0)
    energy_only = S2EFLoss(S2EFConfig(energy_coefficient=1.0, force_coefficient=0.0))
    result = energy_only.loss(predictions, batch, targets)
    assert float(result["energy_mae_mev"]) == pytest.approx(2000.0)
    assert float(result["forces_mae_mev_per_angstrom"]) == pytest.approx(100.0)
    assert float(result["loss"]) == pytest.approx(2.0 / energy_only.config.energy_scale_ev)


def test_rotation_augmentation_turns_positions_cell_and_forces_together():
    batch = example_batch(("molecule", "slab", "bulk"))
    batch = replace(batch, force_inputs=batch.forces * 0.5)
    snapshot = _snapshot(batch)
    objective = S2EFLoss(S2EFConfig(rotation="any"))
    turned, targets = objective.corrupt(batch, torch.Generator().manual_seed(7))
    rotations = random_rotations(3, torch.Generator().manual_seed(7), "any")
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(3, dtype=torch.float64))
    r = rotations[batch.batch]
    for name in ("positions", "forces", "force_inputs"):
        torch.testing.assert_close(getattr(turned, name), torch.einsum("nij,nj->ni", r, getattr(batch, name)))
    torch.testing.assert_close(targets[keys.FORCES], turned.forces)
    torch.testing.assert_close(targets[keys.ENERGY], batch.energy, rtol=0, atol=0)  # energy unchanged
    torch.testing.assert_close(edge_vectors(turned), torch.einsum("eij,ej->ei", r[batch.edge_index[0]], edge_vectors(batch)))
    _assert_unchanged(batch, snapshot)
    again, _ = objective.corrupt(batch, torch.Generator().manual_seed(7))
    assert torch.equal(again.positions, turned.positions)  # same seed, same rotation


def test_forcenet_rotation_is_about_the_surface_normal():
    config = s2ef_forcenet_paper()
    assert config.rotation == "vertical" and config.fixed_atom_weight == 0.05
    batch = example_batch(("slab",))
    turned, _ = S2EFLoss(config).corrupt(batch, torch.Generator().manual_seed(2))
    torch.testing.assert_close(turned.positions[:, 2], batch.positions[:, 2], rtol=0, atol=1e-12)
    torch.testing.assert_close(turned.forces.norm(dim=1), batch.forces.norm(dim=1))
    assert not torch.allclose(turned.positions, batch.positions)


@pytest.mark.parametrize("stored", [True, False])
def test_dens_energy_scale_is_the_spread_of_the_referenced_energies(s2ef_cache, tmp_path, stored):
    """`energy_scale: energy_std` divides energy errors by the standard deviation of the training
    energies less their per-element references (DeNS Eq. 1's σ_E), read from the cache or, for a
    cache written before it was stored, computed from the file; σ_F stays the force RMS."""
    import shutil

    import h5py

    from molden.data.h5_dataset import H5Dataset
    from molden.train.config import DataConfig, FinetuneConfig, RunConfig
    from molden.train.tasks import finetune_task

    cache = tmp_path / "c.h5"
    shutil.copy(s2ef_cache, cache)
    with h5py.File(cache, "r") as f:
        expected = float(f["stats"].attrs["energy_residual_std_ev"])
        forces_rms = float(f["stats"].attrs["forces_rms_ev_per_angstrom"])
        fit = f["structures/split"][:] == json.loads(f.attrs["split_names"]).index("train")
        reference = np.nan_to_num(f["stats/element_reference_energy_ev"][:])
        energy = f["structures/energy"][:]
        offsets, numbers = f["structures/atom_offsets"][:], f["atoms/numbers"][:]
    residual = np.array([energy[i] - reference[numbers[offsets[i]:offsets[i + 1]]].sum() for i in np.flatnonzero(fit)])
    assert expected == pytest.approx(residual.std(), rel=1e-9) and expected != pytest.approx(forces_rms)
    if not stored:
        with h5py.File(cache, "r+") as f:
            del f["stats"].attrs["energy_residual_std_ev"]
    for scale, energy_scale in (("energy_std", expected), ("force_rms", forces_rms)):
        config = FinetuneConfig(data=DataConfig(path=cache, max_graphs=8), run=RunConfig(out=tmp_path / "r"), task="s2ef",
                                model={"preset": "painn_cpu", "changes": {"cutoff_angstrom": 4.0}}, s2ef={"energy_scale": scale})
        task = finetune_task(config, H5Dataset(cache, split="train"))
        assert task.description["energy_scale_ev"] == pytest.approx(energy_scale, rel=1e-9)
        assert task.description["force_scale_ev_per_angstrom"] == pytest.approx(forces_rms)


@pytest.mark.parametrize("residual_std, expected", [(3.6e-14, 1.0), (float("nan"), 1.0), (0.25, 0.25)])
def test_an_energy_spread_of_rounding_alone_is_not_divided_by(residual_std, expected):
    """As few training compositions as elements: the references fit the energies exactly and
    leave a spread of ~1e-14 eV, which would multiply energy errors by 1e13."""
    from molden.objectives.supervised import S2EFConfig

    scaled = S2EFConfig(energy_scale="energy_std").with_statistics(
        {"forces_rms_ev_per_angstrom": 0.5, "energy_residual_std_ev": residual_std})
    assert scaled.energy_scale_ev == expected and scaled.force_scale_ev_per_angstrom == 0.5
