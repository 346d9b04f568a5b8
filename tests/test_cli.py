"""The command line, in-process: preprocess, inspect, export, demo, and bad input."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from ase.io import read
from typer.testing import CliRunner

from molden.cli.app import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_preprocess_inspect_and_export_round_trip(mixed_extxyz, tmp_path):
    out = tmp_path / "x.h5"
    result = _run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 4.0)
    assert result.exit_code == 0, result.output
    assert out.exists()
    result = _run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_structures"] == 30 and summary["cutoff_angstrom"] == 4.0
    assert summary["element_histogram"]["Cu"] > 0
    result = _run("inspect", out)
    assert result.exit_code == 0 and "edges per atom" in result.stdout
    back = tmp_path / "back.extxyz"
    result = _run("export", out, "--out", back)
    assert result.exit_code == 0, result.output
    original, exported = read(mixed_extxyz, ":"), read(back, ":")
    assert len(original) == len(exported)
    for a, b in zip(original, exported):
        np.testing.assert_allclose(a.positions, b.positions)
        np.testing.assert_allclose(a.get_forces(apply_constraint=False), b.get_forces(apply_constraint=False))
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy())


BAD_INPUTS = {
    "truncated": ("3\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0 0 0\nH 0 0 1\n", "record"),
    "garbled": ("2\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0 0 0\nH 0 zero 1\n", "record"),
    "nan": ("2\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0 0 0\nH 0 nan 1\n", "NaN"),
    "zero_cell": ('2\nLattice="0 0 0 0 0 0 0 0 0" Properties=species:S:1:pos:R:3 pbc="T T T"\nH 0 0 0\nH 0 0 1\n', "cell"),
    "unknown_element": ("2\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0 0 0\nXx 0 0 1\n", "element"),
    "overlap": ("2\nProperties=species:S:1:pos:R:3 pbc=\"F F F\"\nH 0 0 0\nH 0 0 0\n", "overlap"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_one_and_no_output(case, tmp_path):
    text, expected = BAD_INPUTS[case]
    src = tmp_path / f"{case}.extxyz"
    src.write_text(text)
    out = tmp_path / "x.h5"
    result = _run("preprocess", "ase", src, "--out", out)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in result.output
    assert src.name in message and expected.lower() in message.lower(), message
    assert list(tmp_path.glob("x.h5*")) == []


def test_missing_file_is_one_line(tmp_path):
    result = _run("preprocess", "ase", tmp_path / "nope.xyz", "--out", tmp_path / "x.h5")
    assert result.exit_code == 1
    assert "nope.xyz" in result.stderr and "no such file" in result.stderr
    assert list(tmp_path.glob("x.h5*")) == []


def test_empty_file_is_one_line(tmp_path):
    src = tmp_path / "empty.extxyz"
    src.write_text("")
    result = _run("preprocess", "ase", src, "--out", tmp_path / "x.h5")
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "empty.extxyz" in result.stderr
    assert list(tmp_path.glob("x.h5*")) == []


def test_inspect_of_a_non_cache_is_one_line(tmp_path):
    bad = tmp_path / "not.h5"
    bad.write_text("hello")
    result = _run("inspect", bad)
    assert result.exit_code == 1 and "not.h5" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_option_is_one_line(mixed_extxyz, tmp_path):
    result = _run("preprocess", "ase", mixed_extxyz, "--out", tmp_path / "x.h5", "--cutoff", -1)
    assert result.exit_code == 1 and "cutoff" in result.stderr


def test_unknown_source_is_one_line(tmp_path):
    result = _run("preprocess", "nonsense", "--out", tmp_path / "x.h5")
    assert result.exit_code == 1 and "source" in result.stderr


def test_demo_runs_end_to_end_then_reuses_its_cache_and_says_what_next(tmp_path):
    result = _run("demo", "--out-dir", tmp_path, "--emt-systems", 1, "--train-steps", 0)
    assert result.exit_code == 0, result.output
    cache = tmp_path / "emt.h5"
    assert cache.exists()
    assert "edges per atom" in result.stdout
    # What to do next: the commands and the Python snippet, naming this cache.
    assert f"molden inspect {cache}" in result.stdout and f"molden export {cache}" in result.stdout
    assert "H5Dataset(" in result.stdout
    stamp = cache.stat().st_mtime_ns
    # A rerun (also under the old option name) reuses the complete cache instead of redoing it.
    again = _run("demo", "--out-dir", tmp_path, "--systems", 1, "--train-steps", 0)
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output and cache.stat().st_mtime_ns == stamp
    # Other settings are not silently reused, nor silently replaced.
    other = _run("demo", "--out-dir", tmp_path, "--emt-systems", 2, "--train-steps", 0)
    assert other.exit_code == 1 and "--overwrite" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert f"--out-dir {tmp_path}" in " ".join(other.stderr.split()) and "--out " not in other.stderr  # the demo's own option


@pytest.mark.slow
def test_demo_pretrains_finetunes_and_evaluates_then_reuses_the_finished_runs(tmp_path):
    result = _run("demo", "--out-dir", tmp_path, "--emt-systems", 8, "--train-steps", 3)
    assert result.exit_code == 0, result.output
    for run in ("pretrain", "s2ef_dens", "is2re_noisy_nodes"):
        assert (tmp_path / run / "best.pt").is_file() and (tmp_path / run / "summary.json").is_file()
    assert "test metrics" in result.stdout and "forces MAE meV/Å" in result.stdout
    assert "test_id" in result.stdout and "test_ood" in result.stdout
    assert "FbT (EMT)" in result.stdout  # the relax stage's table
    relaxed = json.loads((tmp_path / "relaxed.json").read_text())
    assert relaxed["forces_check"] == "emt" and all("fbt" in r for r in relaxed["rows"])
    stamp = (tmp_path / "s2ef_dens" / "last.pt").stat().st_mtime_ns
    again = _run("demo", "--out-dir", tmp_path, "--emt-systems", 8, "--train-steps", 3)
    assert again.exit_code == 0 and again.output.count("reused") >= 3
    assert (tmp_path / "s2ef_dens" / "last.pt").stat().st_mtime_ns == stamp


def test_demo_builds_a_preprocess_config_for_the_library(tmp_path, monkeypatch):
    import molden.pipeline.preprocess as pp

    seen = []

    def fake_run(config, progress=None, notify=None):
        seen.append(config)
        raise pp.MoldenConfigError("stop here")

    monkeypatch.setattr(pp, "run_preprocess", fake_run)
    result = _run("demo", "--out-dir", tmp_path, "--emt-systems", 3, "--workers", 2)
    assert result.exit_code == 1 and "stop here" in result.stderr
    (config,) = seen
    assert isinstance(config, pp.PreprocessConfig)
    assert (config.source, config.out, config.emt.n_systems, config.workers) == ("emt", tmp_path / "emt.h5", 3, 2)


def test_version_prints_the_package_version():
    from molden import __version__

    result = _run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"molden {__version__}"


def test_help_shows_the_real_defaults_of_val_test_and_emt_systems():
    from molden.cli import preprocess as cli_preprocess
    from molden.data.emt import EMTConfig, EMTMDConfig
    from molden.data.splits import QM9_SPLIT, SplitConfig

    assert EMTConfig().n_systems == cli_preprocess.EMT_SYSTEMS_DEFAULT
    md = EMTMDConfig()
    assert (md.temperature_kelvin, md.frames) == cli_preprocess.EMT_MD_DEFAULTS
    assert md.interval_steps * md.timestep_fs == 5  # "5 fs apart" in --help
    shown = cli_preprocess.HELD_OUT_DEFAULT
    assert f"qm9 {QM9_SPLIT.val:,.0f}" in shown and f"{SplitConfig().val:g}" in shown
    assert QM9_SPLIT.val == QM9_SPLIT.test and SplitConfig().val == SplitConfig().test
    for command, options in (("preprocess", ["--val", "--test", "--emt-systems", "--emt-md-temperature", "--emt-md-frames"]), ("demo", ["--emt-systems"])):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0
        text = " ".join(result.stdout.replace("│", " ").split())  # the help as one line, unwrapped
        for option in options:
            entry = re.search(rf" {option} .*?(?= --[a-z]|$)", text).group(0)
            assert "[default: " in entry, entry
        if command == "demo":
            assert "--systems" not in text  # the old name still works, hidden
    text = " ".join(runner.invoke(app, ["preprocess", "--help"]).stdout.replace("│", " ").split())
    assert f"[default: ({shown})]" in text and f"[default: ({EMTConfig().n_systems})]" in text


def test_emt_refuses_input_files(mixed_extxyz, tmp_path):
    result = _run("preprocess", "emt", mixed_extxyz, "--out", tmp_path / "e.h5")
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "emt" in result.stderr and "mixed.extxyz" in result.stderr
    assert list(tmp_path.glob("e.h5*")) == []


def test_emt_md_writes_an_s2ef_cache_and_leaves_relaxation_caches_as_they_were(tmp_path):
    import h5py

    result = _run("preprocess", "emt", "--emt-systems", 3, "--emt-md-frames", 4, "--out", tmp_path / "md.h5")
    assert result.exit_code == 0, result.output
    relaxed = _run("preprocess", "emt", "--emt-systems", 3, "--out", tmp_path / "relax.h5")
    assert relaxed.exit_code == 0, relaxed.output
    with h5py.File(tmp_path / "md.h5") as f, h5py.File(tmp_path / "relax.h5") as g:
        assert f.attrs["n_structures"] == 4 * len(set(f["structures/system_id"].asstr()[:]))
        assert "structures/relaxed_energy" not in f and "atoms/relaxed_positions" not in f
        assert "atoms/forces" in f and "structures/relaxed_energy" in g
        md = json.loads(f.attrs["provenance"])["config"]["emt"]["md"]
        assert (md["frames"], md["temperature_kelvin"]) == (4, 900.0)
        # A relaxation cache's provenance has no `md` key, as before MD existed, so such caches stay reusable.
        assert "md" not in json.loads(g.attrs["provenance"])["config"]["emt"]
    is2re = _run("finetune", "--data", tmp_path / "md.h5", "--task", "is2re", "--val-split", "val_id",
                 "--steps", 1, "--out", tmp_path / "run")
    assert is2re.exit_code == 1 and "relaxed_energy" in is2re.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--max-neighbors", 0], "invalid --max-neighbors 0"),
        (["--cutoff", -1], "invalid --cutoff -1"),
        (["--workers", 0], "invalid --workers 0"),
        (["--emt-systems", 0], "invalid --emt-systems 0"),
        (["--emt-md-frames", 0], "invalid --emt-md-frames 0"),
        (["--emt-md-temperature", -3], "invalid --emt-md-temperature -3"),
        (["--emt-md-temperature", 300], "--emt-md-temperature / --emt-md-frames are for source emt, not ase"),
    ],
)
def test_bad_option_names_the_command_line_option(args, expected, mixed_extxyz, tmp_path):
    result = _run("preprocess", "ase", mixed_extxyz, "--out", tmp_path / "x.h5", *args)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: " + expected), message
    assert list(tmp_path.glob("x.h5*")) == []


@pytest.mark.parametrize(("env", "prefix"), [({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "error: process 1: "),
                                             ({"RANK": "1"}, "error: ")])
def test_a_torchrun_process_other_than_rank_0_still_reports_its_own_error(tmp_path, env, prefix):
    """Under torchrun only rank 0 draws the display, but no process fails silently; RANK alone
    (a scheduler's variable, no torchrun job) changes nothing."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "molden.cli.app", "inspect", str(tmp_path / "none.h5")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 1
    assert result.stderr.startswith(prefix) and "none.h5" in result.stderr and "process 1" not in result.stderr[len(prefix):]


@pytest.mark.parametrize(("env", "expected"), [
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ""),  # its machine's first process reports it
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "error: process 2: invalid --lr -1.0"),  # another machine's first
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "error: invalid --lr -1.0"),
])
def test_a_bad_option_under_torchrun_is_reported_once_per_machine(tmp_path, env, expected):
    """Every process of a torchrun job meets a bad option alike: one line per machine, from its
    first process (the others exit 1 silently), so no machine fails without a word."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "molden.cli.app", "finetune", "--data", str(tmp_path / "none.h5"),
                             "--out", str(tmp_path / "run"), "--lr", "-1"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 1
    assert result.stderr.strip().startswith(expected) and (expected or not result.stderr.strip()), result.stderr
    assert not (tmp_path / "run").exists()
