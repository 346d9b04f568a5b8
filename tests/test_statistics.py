"""Specifications of the cache statistics (`molden.data.statistics`): fitted on train only."""

from __future__ import annotations

import json
from dataclasses import replace

import h5py
import numpy as np
import pytest

from molden.data.h5_writer import CacheWriter
from molden.data.structure import Structure

# eV per atom of H, C, O: the energies below are these plus a little noise.
REFERENCE_EV = {1: -13.6, 6: -1030.0, 8: -2040.0}


def _structures(n: int, split_of, shift: float = 0.0, seed: int = 0) -> list[Structure]:
    """Small H/C/O molecules of random composition; structures whose split is "val" have
    energies, forces and targets shifted by `shift`. `split_of(k)` names structure k's split."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        split = split_of(k)
        numbers = rng.choice(list(REFERENCE_EV), size=rng.integers(2, 9))
        moved = shift if split == "val" else 0.0
        energy = sum(REFERENCE_EV[z] for z in numbers) + rng.normal(scale=0.1) + moved * len(numbers)
        out.append(Structure(
            numbers=numbers, positions=rng.normal(size=(len(numbers), 3)) * 2, energy=energy,
            forces=rng.normal(size=(len(numbers), 3)) * (1 + moved), targets={"gap": rng.normal() + moved},
            system_id=f"m{k}", split=split,
            edge_index=np.zeros((2, 0), np.int64), unit_shifts=np.zeros((0, 3), np.int32),
        ))
    return out


def _write(path, structures: list[Structure]) -> h5py.File:
    writer = CacheWriter(path, {"source": "test"})
    writer.write(structures)
    writer.finalize(lambda ids, index: np.full(len(ids), "train", dtype=object))
    return h5py.File(path)


def _stats(f: h5py.File) -> dict:
    g = f["stats"]
    return {**{k: v for k, v in g.attrs.items()}, **{k: d[:] for k, d in g.items()}}


FITTED = ("targets_mean", "targets_std", "element_reference_energy_ev", "energy_per_atom_mean_ev",
          "energy_per_atom_std_ev", "forces_rms_ev_per_angstrom", "energy_residual_std_ev")


def test_statistics_do_not_move_when_the_val_split_is_shifted(tmp_path):
    split_of = lambda k: "val" if k % 4 == 0 else "train"  # noqa: E731
    with _write(tmp_path / "a.h5", _structures(80, split_of)) as f, \
            _write(tmp_path / "b.h5", _structures(80, split_of, shift=100.0)) as g:
        a, b = _stats(f), _stats(g)
    for name in FITTED:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12, err_msg=name)
    assert a["fitted_on"] == b["fitted_on"] == "train"
    assert a["n_structures_fitted"] == 60 and a["n_structures"] == 80


def test_statistics_are_those_of_the_train_structures_alone(tmp_path):
    structures = _structures(90, lambda k: ("train", "val", "test")[k % 3], shift=7.0)
    # Nitrogen only in a test structure: the train fit knows nothing about it.
    assert structures[2].split == "test"
    structures[2] = replace(structures[2], numbers=np.append(structures[2].numbers[1:], 7))
    train = [s for s in structures if s.split == "train"]
    with _write(tmp_path / "c.h5", structures) as f:
        stats = _stats(f)
        assert json.loads(f["stats/targets_mean"].attrs["names"]) == ["gap"]
    gaps = np.array([s.targets["gap"] for s in train])
    np.testing.assert_allclose(stats["targets_mean"], [gaps.mean()], rtol=1e-12)
    np.testing.assert_allclose(stats["targets_std"], [gaps.std()], rtol=1e-12)
    per_atom = np.array([s.energy / s.n_atoms for s in train])
    assert stats["energy_per_atom_mean_ev"] == pytest.approx(per_atom.mean(), rel=1e-12)
    forces = np.concatenate([s.forces for s in train])
    assert stats["forces_rms_ev_per_angstrom"] == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-12)
    reference = stats["element_reference_energy_ev"]
    np.testing.assert_allclose(reference[[1, 6, 8]], [REFERENCE_EV[z] for z in (1, 6, 8)], atol=0.1)
    # DeNS's σ_E: the spread of the train energies less their fitted per-element references.
    residual = np.array([s.energy - np.nan_to_num(reference)[s.numbers].sum() for s in train])
    assert stats["energy_residual_std_ev"] == pytest.approx(residual.std(), rel=1e-9)
    assert 0 < stats["energy_residual_std_ev"] < np.array([s.energy for s in train]).std()
    assert np.isnan(reference[7])  # present in the file, absent from train
    assert stats["element_counts"][7] > 0  # counts describe the whole file


def test_a_cache_without_a_train_split_fits_on_all_structures_and_says_so(tmp_path):
    structures = _structures(40, lambda k: "val_id" if k % 2 else "test_id")
    with _write(tmp_path / "d.h5", structures) as f:
        stats = _stats(f)
    assert stats["fitted_on"] == "all" and stats["n_structures_fitted"] == 40
    gaps = np.array([s.targets["gap"] for s in structures])
    np.testing.assert_allclose(stats["targets_mean"], [gaps.mean()], rtol=1e-12)


def test_inspect_says_which_split_the_statistics_were_fitted_on(mixed_extxyz, tmp_path):
    from typer.testing import CliRunner

    from molden.cli.app import app
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    cache = run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=tmp_path / "c.h5")).path
    result = CliRunner().invoke(app, ["inspect", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    assert '"statistics_fitted_on": "train"' in result.stdout
    assert "statistics fitted on" in CliRunner().invoke(app, ["inspect", str(cache)]).stdout
