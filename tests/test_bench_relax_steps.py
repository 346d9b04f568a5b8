"""`molden.bench.relax_steps` in quick mode: every optimiser relaxes the same EMT systems to
fmax; molden's FIRE takes ASE's steps exactly; the scaled initial inverse Hessian needs fewer
force calls than the fixed one on these systems. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from molden.bench import relax_peers
from molden.bench import relax_steps


@pytest.fixture(scope="module")
def rows():
    return relax_steps.run_relax_steps_benchmark(quick=True)


def _row(rows, tool, method, variant):
    return next(r for r in rows if (r["tool"], r["method"], r["variant"]) == (tool, method, variant))


def test_every_optimiser_converges_every_system(rows):
    assert [(r["tool"], r["method"]) for r in rows] == [
        ("ase", "lbfgs"), ("molden", "lbfgs"), ("molden", "lbfgs"), ("torch-sim", "lbfgs"), ("nvalchemi", "lbfgs"),
        ("ase", "fire"), ("molden", "fire"), ("torch-sim", "fire"), ("nvalchemi", "fire")]
    for r in rows:
        missing = (relax_peers.nvalchemi_missing() if r["tool"] == "nvalchemi"
                   else relax_peers.torch_sim_missing(r["method"]) if r["tool"] == "torch-sim" else None)
        if missing is not None:
            assert r["skipped"] == missing
            continue
        assert r["converged"] == r["n_systems"] == relax_steps.QUICK_SYSTEMS, r
        assert r["force_calls"] == sum(r["steps"]) + r["n_systems"]
        assert all(0 < s < relax_steps.MAX_STEPS for s in r["steps"])
    json.dumps(rows)


def test_molden_fire_takes_ases_steps(rows):
    assert _row(rows, "molden", "fire", "FIRE")["steps"] == _row(rows, "ase", "fire", "FIRE")["steps"]


def test_the_scaled_guess_needs_fewer_force_calls(rows):
    fixed, scaled = _row(rows, "molden", "lbfgs", "fixed 1/α"), _row(rows, "molden", "lbfgs", "scaled")
    assert scaled["force_calls"] < 0.75 * fixed["force_calls"]
    assert scaled["preset"] == fixed["preset"] == "ase"


@pytest.mark.parametrize("args, message", [
    (["--systems", "0"], "--systems 0: at least one system"),
    (["--model", "no_such.pt"], "no such checkpoint"),
    (["--preset", "fast"], "invalid choice"),
])
def test_bad_options_are_one_line_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        relax_steps.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        relax_steps.main(["--model", str(bogus), "--quick"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not a molden checkpoint" in err and "Traceback" not in err


def test_an_existing_json_is_refused_unless_overwrite_and_written_whole(tmp_path, capsys):
    out = tmp_path / "steps.json"
    out.write_text("earlier")
    with pytest.raises(SystemExit):
        relax_steps.main(["--quick", "--json", str(out)])
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "earlier"
    relax_steps.main(["--quick", "--json", str(out), "--overwrite"])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["tool"] == "ase" and not list(tmp_path.glob("*.partial"))
