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


def test_the_reference_row_is_ases_lbfgs(rows):
    reference = rows[0]
    assert reference["calls_ratio"] == 1.0 and reference["max_energy_difference_mev"] == 0.0
    for r in rows:
        if not r.get("skipped"):
            assert r["calls_ratio"] == pytest.approx(reference["force_calls"] / r["force_calls"])


def test_molden_fire_takes_ases_steps(rows):
    assert _row(rows, "molden", "fire", "FIRE")["steps"] == _row(rows, "ase", "fire", "FIRE")["steps"]


def test_the_scaled_guess_needs_fewer_force_calls(rows):
    fixed, scaled = _row(rows, "molden", "lbfgs", "fixed 1/α"), _row(rows, "molden", "lbfgs", "scaled")
    assert scaled["force_calls"] < 0.75 * fixed["force_calls"]
    assert scaled["preset"] == fixed["preset"] == "ase"
