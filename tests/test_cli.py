"""The command line, in-process: preprocess, inspect, export, demo, and bad input."""

from __future__ import annotations

import json

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


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_emt_set(tmp_path):
    result = _run("demo", "--out-dir", tmp_path, "--systems", 6)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "emt.h5").exists()
    assert "edges per atom" in result.stdout
