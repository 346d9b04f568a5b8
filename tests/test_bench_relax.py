"""The relaxation benchmark (`molden.bench.relax`, issues 15 and 16) in quick mode: every row is
there, molden's batched optimisers take ASE's path with the same model, and a peer that is not
installed is a row saying how to install it. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molden.bench import relax as bench_relax
from molden.bench import relax_peers


@pytest.fixture(scope="module")
def quick_rows():
    return bench_relax.run_relax_benchmark(quick=True)


def test_quick_mode_returns_every_row(quick_rows):
    fixed = {(r["tool"], r["method"]) for r in quick_rows if r["case"] == "fixed steps"}
    assert fixed == {(tool, method) for tool in bench_relax.TOOLS for method in ("lbfgs", "fire")}
    assert [r["method"] for r in quick_rows if r["case"] == "direct vs L-BFGS"] == ["direct"]
    assert {r["n_systems"] for r in quick_rows} == {bench_relax.QUICK_SYSTEMS}
    for row in quick_rows:
        if row["skipped"] is None:
            assert row["time_s"] > 0
    for row in quick_rows:
        if row["case"] == "fixed steps" and row["skipped"] is None:
            assert row["structure_steps_per_s"] == pytest.approx(row["n_systems"] * row["steps"] / row["time_s"])
    json.dumps(quick_rows)  # what `--json` writes


def test_molden_takes_ases_path_with_the_same_model(quick_rows):
    for row in quick_rows:
        if row["case"] == "fixed steps" and row["tool"] in ("molden", "ase"):
            assert row["agree"] is True, row
            assert row["max_deviation_angstrom"] <= bench_relax.AGREE_ANGSTROM


def test_ratios_are_relative_to_molden(quick_rows):
    timed = [r for r in quick_rows if r["case"] == "fixed steps" and r["skipped"] is None]
    for row in timed:
        molden = next(r for r in timed if r["tool"] == "molden" and r["method"] == row["method"])
        assert row["ratio"] == pytest.approx(row["time_s"] / molden["time_s"])


def test_a_missing_peer_is_a_row_with_an_install_hint(monkeypatch):
    monkeypatch.setattr(relax_peers, "torch_sim_version", lambda: None)
    note = relax_peers.torch_sim_missing("fire")
    assert "pip install torch-sim-atomistic" in note
    assert relax_peers.torch_sim_missing("lbfgs") == note


def test_an_old_torch_sim_without_lbfgs_skips_only_lbfgs(monkeypatch):
    """torch-sim 0.3 (the last for Python 3.11) has FIRE only: its L-BFGS row says so."""
    monkeypatch.setattr(relax_peers, "torch_sim_version", lambda: "0.3.0")
    monkeypatch.setattr(relax_peers, "torch_sim_api",
                        lambda: relax_peers.TorchSimAPI("0.3.0", ("fire",), fix_atoms=None, pbc_per_axis=False))
    assert relax_peers.torch_sim_missing("fire") is None
    assert "no L-BFGS" in relax_peers.torch_sim_missing("lbfgs")


def test_torch_sim_rows_run_every_method_it_has(quick_rows):
    api = relax_peers.torch_sim_api()
    rows = {r["method"]: r for r in quick_rows if r["case"] == "fixed steps" and r["tool"] == "torch-sim"}
    assert set(rows) == {"lbfgs", "fire"}  # a row per method, timed or saying why not
    for method, row in rows.items():
        if api is not None and method in api.methods:
            assert row["skipped"] is None and row["agree"] is True, row
            assert row["version"] == api.version
        else:
            assert row["skipped"] is not None


@pytest.mark.parametrize("method", ["lbfgs", "fire"])
def test_torch_sim_takes_ases_path_and_holds_fixed_atoms(method, tmp_path):
    """torch-sim's batched optimiser, with molden's settings, against ASE's loop: positions
    within `AGREE_ANGSTROM` after 5 steps, fixed atoms exactly where they started."""
    api = relax_peers.torch_sim_api()
    if api is None or method not in api.methods:
        pytest.skip(f"torch-sim {api.version if api else 'absent'} has no {method}")
    from molden.models.checkpoint import load_model
    from molden.relax.optimizers import FIRESettings, LBFGSSettings
    from molden.relax.providers import ModelProvider

    models = bench_relax.random_checkpoints(tmp_path, quick=True)
    systems = bench_relax.oc20_like_systems(3, small=True)
    provider = ModelProvider(load_model(models.s2ef))
    lbfgs, fire = LBFGSSettings(curvature_guard=False), FIRESettings()
    reference = relax_peers.ase_relax_loop(systems, models.s2ef, method, 5, lbfgs=lbfgs, fire=fire,
                                           dtype=provider.dtype)
    positions = relax_peers.torch_sim_relax(provider, systems, method, 5, lbfgs=lbfgs, fire=fire, batch_size=2).positions
    assert bench_relax._deviation(positions, reference) <= bench_relax.AGREE_ANGSTROM
    for p, atoms in zip(positions, systems):
        fixed = atoms.constraints[0].index
        np.testing.assert_array_equal(p[fixed], atoms.positions[fixed])
        assert np.abs(p - atoms.positions).max() > 1e-4  # the free atoms did move


def test_nvalchemi_rows_are_timed_and_its_fire2_takes_ases_early_path(quick_rows):
    """nvalchemi-toolkit-ops is in `[test]`: both methods are timed. Its FIRE2 with ASE's
    settings differs from FIRE only on uphill steps and after many downhill ones, so after the
    quick mode's steps it is on ASE's path; its L-BFGS is another algorithm, timed, not compared."""
    rows = {r["method"]: r for r in quick_rows if r["case"] == "fixed steps" and r["tool"] == "nvalchemi"}
    assert set(rows) == {"lbfgs", "fire"}
    if relax_peers.nvalchemi_missing() is not None:
        assert all("pip install nvalchemi-toolkit-ops" in r["skipped"] for r in rows.values())
        return
    assert rows["fire"]["skipped"] is None and rows["fire"]["agree"] is True, rows["fire"]
    assert rows["lbfgs"]["skipped"] is None and rows["lbfgs"]["agree"] is None and "not compared" in rows["lbfgs"]["note"]
    assert rows["lbfgs"]["version"] == relax_peers.nvalchemi_version()


@pytest.mark.parametrize("method", ["lbfgs", "fire"])
def test_nvalchemi_relaxes_emt_slabs_to_ases_minima_holding_fixed_atoms(method):
    """The peer as wired here (forces, not gradients; fixed atoms by zero force; molden's
    settings) reaches fmax 0.05 eV/Å on EMT and a minimum no higher than ASE's L-BFGS finds,
    with the fixed atoms exactly where they started and the step counts it reports."""
    if relax_peers.nvalchemi_missing() is not None:
        pytest.skip(relax_peers.nvalchemi_missing())
    from ase.calculators.emt import EMT
    from ase.optimize import LBFGS

    from molden.relax.optimizers import FIRESettings, LBFGSSettings
    from molden.relax.providers import ASECalculatorProvider

    systems = bench_relax.oc20_like_systems(2, small=True)
    found = relax_peers.nvalchemi_relax(ASECalculatorProvider(), systems, method, 300, lbfgs=LBFGSSettings(),
                                        fire=FIRESettings(), batch_size=2, fmax_ev_per_angstrom=0.05)
    for atoms, positions, steps in zip(systems, found.positions, found.steps):
        fixed = atoms.constraints[0].index
        np.testing.assert_array_equal(positions[fixed], atoms.positions[fixed])
        relaxed = atoms.copy()
        relaxed.calc = EMT()
        relaxed.positions = positions
        free = np.setdiff1d(np.arange(len(atoms)), fixed)
        assert 0 < steps < 300 and np.linalg.norm(relaxed.get_forces()[free], axis=1).max() <= 0.05
        reference = atoms.copy()
        reference.calc = EMT()
        LBFGS(reference, logfile=None).run(fmax=0.05, steps=300)
        assert relaxed.get_potential_energy() <= reference.get_potential_energy() + 2e-3
    capped = relax_peers.nvalchemi_relax(ASECalculatorProvider(), systems, method, 3, lbfgs=LBFGSSettings(),
                                         fire=FIRESettings(), batch_size=1)
    assert capped.steps == [3, 3]  # fmax 0: every system takes exactly the steps asked for


def test_skipped_rows_say_why(quick_rows):
    for row in quick_rows:
        if row["skipped"] is not None:
            assert row["time_s"] is None and row["ratio"] is None and row["agree"] is None
            assert "torch-sim" in row["skipped"] or "pip install" in row["skipped"]


def test_systems_are_oc20_sized_and_reproducible():
    systems = bench_relax.oc20_like_systems(4, seed=3)
    again = bench_relax.oc20_like_systems(4, seed=3)
    assert all(60 <= len(a) <= 80 for a in systems)
    assert all(tuple(a.pbc) == (True, True, False) for a in systems)
    assert all(len(a.constraints[0].index) == 32 for a in systems)  # bottom two of four 4×4 layers
    for a, b in zip(systems, again):
        np.testing.assert_array_equal(a.positions, b.positions)
    other = bench_relax.oc20_like_systems(4, seed=4)
    assert any(len(a) != len(b) or not np.array_equal(a.positions, b.positions) for a, b in zip(systems, other))


def test_the_agreement_check_catches_another_setting(tmp_path):
    """A FIRE with half the time step is a different path: the check must flag it."""
    from molden.data.ase_convert import structure_from_atoms
    from molden.models.checkpoint import load_model
    from molden.relax.optimizers import FIRESettings, LBFGSSettings
    from molden.relax.providers import ModelProvider

    models = bench_relax.random_checkpoints(tmp_path, quick=True)
    systems = bench_relax.oc20_like_systems(2, small=True)
    structures = [structure_from_atoms(a) for a in systems]
    provider = ModelProvider(load_model(models.s2ef))
    reference = relax_peers.ase_relax_loop(systems, models.s2ef, "fire", 3, lbfgs=LBFGSSettings(), fire=FIRESettings(),
                                           dtype=provider.dtype)
    same, other = (bench_relax._molden_runner(structures, provider, "fire", 3, lbfgs=LBFGSSettings(), fire=fire,
                                              device="cpu", batch_size=2)() for fire in (FIRESettings(), FIRESettings(dt=0.05)))
    assert bench_relax._deviation(same, reference) <= bench_relax.AGREE_ANGSTROM
    assert bench_relax._deviation(other, reference) > bench_relax.AGREE_ANGSTROM


def test_the_verlet_benchmark_checks_its_pairs_and_times_every_skin():
    from molden.bench.verlet import run_verlet_benchmark

    rows = run_verlet_benchmark(sizes=(2,), calls=6, skins=(0.5, 1.0), peer_skin=0.5)
    assert [(r["tool"], r["skin_angstrom"]) for r in rows] == [("molden", 0.0), ("molden", 0.5), ("molden", 1.0),
                                                               ("ase NeighborList", 0.5)]
    assert rows[3]["ratio"] == pytest.approx(rows[3]["ms_per_call"] / rows[1]["ms_per_call"])
    assert all(r["agree"] is True and r["ms_per_call"] > 0 and r["n_systems"] == 2 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[0]["searched_per_call"] == 2.0
    assert rows[1]["searched_per_call"] < 2.0


def test_whole_relaxations_with_and_without_verlet_lists_are_timed_alternately():
    from molden.bench.verlet import relax_with_and_without

    ab = relax_with_and_without(0.5, systems=3, steps=1, repeats=2)
    assert len(ab["all_seconds"]["0.0"]) == len(ab["all_seconds"]["0.5"]) == 2
    assert ab["speedup"] == ab["seconds_search_every_step"] / ab["seconds_verlet"] > 0


def test_the_verlet_benchmark_refuses_settings_it_cannot_time():
    from molden.bench.verlet import run_verlet_benchmark

    for bad in ({"calls": 1}, {"sizes": (0,)}, {"skins": (0.0,)}):
        with pytest.raises(ValueError, match="calls >= 2"):
            run_verlet_benchmark(**{"sizes": (1,), "calls": 3, **bad})


def test_without_ase_the_batched_tools_are_compared_with_moldens_path():
    rows = bench_relax.run_relax_benchmark(quick=True, ase=False)
    fixed = [r for r in rows if r["case"] == "fixed steps"]
    assert all(r["path_reference"] == "molden" for r in fixed)
    assert [r["skipped"] for r in fixed if r["tool"] == "ase"] == ["not run (--no-ase)"] * 2
    molden = [r for r in fixed if r["tool"] == "molden"]
    assert [r["max_deviation_angstrom"] for r in molden] == [0.0, 0.0] and all(r["agree"] for r in molden)
