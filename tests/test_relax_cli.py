"""`molden relax` end to end (issue 15): EMT relaxations of a cache's systems reproduce the
cache's own reference relaxations; relaxed structures keep tags and fixed atoms; direct
prediction from a trained position head; bad options in one line."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from molden.cli import relax as relax_cli
from molden.cli import train as train_cli

runner = CliRunner()


def _invoke(*args):
    app = typer.Typer()
    app.command()(relax_cli.relax)
    app.command()(train_cli.finetune)
    return runner.invoke(app, [str(a) for a in args])


def _split(cache):
    from molden.data import H5Dataset

    return next(n for n in H5Dataset(cache).split_names if len(H5Dataset(cache, n)))


def test_emt_lbfgs_reproduces_the_caches_reference_relaxations(emt_cache, tmp_path):
    out = tmp_path / "relaxed.extxyz"
    result = _invoke("relax", emt_cache, "--split", _split(emt_cache), "--method", "lbfgs", "--method", "fire",
                     "--model", "emt", "--out", out)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    # The cache's relaxations are ASE L-BFGS with EMT: molden's batched L-BFGS lands on them.
    assert rows["lbfgs"]["adwt"] == 1.0 and rows["lbfgs"]["energy_mae_mev"] < 1.0
    assert rows["fire"]["converged_fraction"] == 1.0
    # An EMT cache: FbT/AFbT from EMT's forces at the relaxed structures. EMT relaxations that
    # converged to 0.05 eV/Å all pass FbT's 0.05 eV/Å.
    assert summary["forces_check"] == "emt"
    assert rows["lbfgs"]["fbt"] == rows["lbfgs"]["converged_fraction"] == 1.0
    assert 0.0 < rows["fire"]["afbt"] < 1.0  # the lowest thresholds (0.01 eV/Å) are below fmax
    assert "FbT" in result.output and "AFbT" in result.output
    frames = ase.io.read(tmp_path / "relaxed_lbfgs.extxyz", ":")
    assert len(frames) == rows["lbfgs"]["structures"]
    assert all(len(a.constraints) == 1 and a.get_tags().max() == 2 for a in frames)
    again = _invoke("relax", emt_cache, "--split", _split(emt_cache), "--out", out, "--method", "lbfgs",
                    "--method", "fire")
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_the_scaled_lbfgs_guess_relaxes_the_caches_systems_in_fewer_steps(emt_cache, tmp_path):
    """`--lbfgs-guess scaled` converges every system with fewer steps than ASE's fixed guess,
    and the results JSON says which settings ran."""
    split = _split(emt_cache)
    rows = {}
    for guess in ("fixed", "scaled"):
        out = tmp_path / f"{guess}.extxyz"
        result = _invoke("relax", emt_cache, "--split", split, "--model", "emt", "--lbfgs-guess", guess, "--out", out)
        assert result.exit_code == 0, result.output
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["settings"]["lbfgs_guess"] == guess and summary["settings"]["preset"] == "ase"
        rows[guess] = summary["rows"][0]
    assert rows["scaled"]["converged_fraction"] == 1.0
    assert rows["scaled"]["mean_steps"] < rows["fixed"]["mean_steps"]
    assert "L-BFGS guess scaled" in result.output


@pytest.fixture(scope="module")
def is2rs_checkpoint(emt_cache, tmp_path_factory):
    """A position head trained for a few steps: direct prediction runs, not a good one."""
    run = tmp_path_factory.mktemp("runs") / "is2rs"
    trained = _invoke("finetune", "--data", emt_cache, "--out", run, "--task", "is2rs", "--model", "painn_cpu",
                      "--steps", "4", "--max-graphs", "8", "--val-split", "val_id", "--eval-every", "4")
    assert trained.exit_code == 0, trained.output
    return run / "best.pt"


@pytest.mark.slow
def test_direct_prediction_from_a_trained_position_head_beside_lbfgs(emt_cache, is2rs_checkpoint, tmp_path):
    out = tmp_path / "r.extxyz"
    result = _invoke("relax", emt_cache, "--split", _split(emt_cache), "--method", "all", "--direct-model",
                     is2rs_checkpoint, "--out", out, "--limit", "3")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"direct", "lbfgs", "fire"}
    assert 0.0 <= rows["direct"]["adwt"] <= 1.0 and rows["direct"]["mean_steps"] == 0
    # EMT's forces at the predicted structures (an EMT cache), for every method
    assert all(0.0 <= rows[m]["fbt"] <= 1.0 and 0.0 <= rows[m]["afbt"] <= 1.0 for m in rows)
    assert "faster than L-BFGS" in result.output


@pytest.mark.parametrize("args, message", [
    (("--method", "direct"), "needs --direct-model"),
    (("--method", "lbfgs", "--fmax", "-1"), "invalid --fmax"),
    (("--method", "newton"), "invalid --method"),
    (("--method", "lbfgs", "--skin", "-0.1"), "invalid --skin"),
    (("--method", "lbfgs", "--direct-passes", "0"), "invalid --direct-passes"),
    (("--method", "lbfgs", "--forces-check", "dft"), "invalid --forces-check"),
    (("--method", "lbfgs", "--lbfgs-guess", "newton"), "invalid --lbfgs-guess"),
])
def test_bad_relax_options_are_one_line(emt_cache, tmp_path, args, message):
    result = _invoke("relax", emt_cache, "--out", tmp_path / "x.extxyz", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_missing_input_is_one_line(tmp_path):
    result = _invoke("relax", tmp_path / "none.traj", "--out", tmp_path / "x.extxyz")
    assert result.exit_code == 1 and "none.traj" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_refinement_passes_start_from_the_last_passes_positions(emt_cache, is2rs_checkpoint, tmp_path):
    from dataclasses import replace

    from molden.relax.run import RelaxConfig, direct_prediction, read_inputs

    structures = read_inputs(RelaxConfig(input=emt_cache, split=_split(emt_cache), limit=4, out=tmp_path / "x.extxyz"))
    once, _ = direct_prediction(structures, is2rs_checkpoint, batch_size=3)
    again, _ = direct_prediction([replace(s, positions=p) for s, p in zip(structures, once)], is2rs_checkpoint, batch_size=3)
    twice, _ = direct_prediction(structures, is2rs_checkpoint, batch_size=3, passes=2)
    for a, b, s in zip(again, twice, structures):
        np.testing.assert_array_equal(a, b)
        assert np.abs(b - s.positions).max() > 0
    out = tmp_path / "r.extxyz"
    result = _invoke("relax", emt_cache, "--split", _split(emt_cache), "--method", "direct", "--direct-model",
                     is2rs_checkpoint, "--direct-passes", "3", "--forces-check", "none", "--out", out, "--limit", "2")
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["forces_check"] is None and "fbt" not in summary["rows"][0]


@pytest.mark.slow
def test_a_structure_whose_direct_prediction_goes_non_finite_ends_as_nan_and_the_others_refine(
        emt_cache, is2rs_checkpoint, tmp_path, monkeypatch):
    import torch

    from molden.models import checkpoint, keys
    from molden.relax.run import RelaxConfig, direct_prediction, read_inputs

    real = checkpoint.load_model

    def poisoned(*args, **kwargs):
        loaded = real(*args, **kwargs)
        model = loaded.model

        class FirstStructureBlowsUp(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, batch):
                out = dict(self.inner(batch))
                delta = out[keys.POSITION_DELTA].clone()
                delta[batch.batch == 0] = float("inf")
                out[keys.POSITION_DELTA] = delta
                return out

        loaded.model = FirstStructureBlowsUp()
        return loaded

    structures = read_inputs(RelaxConfig(input=emt_cache, split=_split(emt_cache), limit=3, out=tmp_path / "x.extxyz"))
    clean, _ = direct_prediction(structures, is2rs_checkpoint, passes=2)
    monkeypatch.setattr(checkpoint, "load_model", poisoned)
    positions, _ = direct_prediction(structures, is2rs_checkpoint, passes=2)
    assert np.isnan(positions[0]).all()
    for a, b in zip(positions[1:], clean[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # float32 sums: other runs of structures


@pytest.mark.slow
def test_a_force_only_model_relaxes_without_reporting_its_untrained_energies(emt_cache, tmp_path):
    """ForceNet's training (λ_E = 0) leaves the energy head untrained: relaxation with it reports
    no energy MAE and writes no energies, where a model trained on energy reports both."""
    rows = {}
    for coefficient in ("0", "1"):
        run = tmp_path / f"s2ef_{coefficient}"
        trained = _invoke("finetune", "--data", emt_cache, "--out", run, "--task", "s2ef", "--model", "painn_cpu",
                          "--energy-coefficient", coefficient, "--steps", "2", "--max-graphs", "8",
                          "--val-split", "val_id", "--eval-every", "2")
        assert trained.exit_code == 0, trained.output
        out = tmp_path / f"r{coefficient}.extxyz"
        result = _invoke("relax", emt_cache, "--split", _split(emt_cache), "--method", "fire", "--model",
                         run / "best.pt", "--steps", "3", "--out", out, "--limit", "2")
        assert result.exit_code == 0, result.output
        rows[coefficient] = json.loads(out.with_suffix(".json").read_text())["rows"][0]
        energies = [a.calc.results.get("energy") if a.calc else a.info.get("energy") for a in ase.io.read(out, ":")]
        assert (all(e is None for e in energies) if coefficient == "0" else all(e is not None for e in energies))
    assert "energy_mae_mev" not in rows["0"] and "energy_mae_mev" in rows["1"]
    assert rows["0"]["failed"] == 0 and rows["0"]["structures"] == 2
