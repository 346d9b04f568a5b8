"""`molden benchmark` (issue 16): the quick run writes every suite's rows, a chart per suite and
the machine it ran on, every peer agreeing with molden; earlier results are never overwritten
without --overwrite; bad options and a missing QM9 cache say so in one line. No timing asserted."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import typer
from typer.testing import CliRunner

from molden.bench import suites
from molden.bench.cache_read import run_cache_read_benchmark
from molden.bench.radius_graph import benchmark_cases
from molden.bench.train_step import QM9_CPU_PRESETS
from molden.cli import benchmark as benchmark_cli

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def _invoke(*args):
    app = typer.Typer()
    app.command()(benchmark_cli.benchmark)
    app.command(name="unused")(lambda: None)  # two commands: typer keeps the subcommand name
    return runner.invoke(app, ["benchmark", *(str(a) for a in args)])


@pytest.mark.slow
def test_quick_benchmark_writes_every_row_every_chart_and_the_machine(qm9_cache, tmp_path):
    out = tmp_path / "bench"
    result = _invoke("--quick", "--threads", "1", "--cache", qm9_cache, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "benchmark.json").read_text())
    machine = report["machine"]
    assert machine["torch_threads"] == 1 and machine["cpu"] and machine["versions"]["torch"]
    assert set(report["suites"]) == {"radius", "train", "io", "relax"}
    for name in ("radius", "train", "io", "relax"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)

    radius = report["suites"]["radius"]["rows"]
    cases = {(c.name, c.cutoff) for c in benchmark_cases(quick=True)}
    for peer in ("vesin", "ase"):  # installed wherever the tests run
        assert {(r["case"], r["cutoff_angstrom"]) for r in radius if r["peer"] == peer} == cases
    assert radius and all(r["agree"] is True for r in radius)
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in radius)

    train = report["suites"]["train"]["rows"]
    assert [r["preset"] for r in train] == list(QM9_CPU_PRESETS)
    assert all(0 < r["data_graph_percent"] < 100 and r["structures_per_second"] > 0 for r in train)

    io = report["suites"]["io"]
    consumed = max(r["structures_per_second"] for r in train)
    assert io["setup"]["consumer_structures_per_second"] == consumed
    assert len(io["rows"]) == 6 and all(r["headroom"] == pytest.approx(r["structures_per_second"] / consumed)
                                        for r in io["rows"])
    relax = report["suites"]["relax"]["rows"]
    for method in ("lbfgs", "fire"):
        assert {r["tool"] for r in relax if r["method"] == method and r["case"] == "fixed steps"} >= {"molden", "ase"}
    # every row on ASE's path, but nvalchemi's own L-BFGS (another algorithm, noted, not compared)
    assert all(r["agree"] is True for r in relax if r["case"] == "fixed steps" and not r.get("note"))
    assert any(note.startswith("force calls to fmax") and "molden lbfgs (scaled)" in note
               for note in report["suites"]["relax"]["notes"])
    assert [r["direct_speedup"] > 0 for r in relax if r["method"] == "direct"] == [True]
    verlet = report["suites"]["relax"]["setup"]["verlet"]
    assert [(r["tool"], r["skin_angstrom"]) for r in verlet] == [("molden", 0.0), ("molden", 0.5), ("ase NeighborList", 0.5)]
    assert all(r["agree"] for r in verlet)
    assert any("Verlet lists (skin 0.5 Å)" in note and "ASE's NeighborList at the same skin takes" in note
               for note in report["suites"]["relax"]["notes"])
    per_step = report["suites"]["relax"]["setup"]["optimizer_step"]
    assert {r["tool"] for r in per_step if r["method"] == "lbfgs" and not r.get("skipped")} >= {"molden"}
    assert any(note.startswith("lbfgs alone: molden") and "1.0 host reads per step" in note
               for note in report["suites"]["relax"]["notes"])
    # the tables name every suite and the files written
    assert "Radius graph" in result.output and "Training step" in result.output and "benchmark.json" in result.output


def test_earlier_results_are_refused_before_any_work_unless_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text("{}")
    ran = []
    monkeypatch.setitem(suites.SUITES, "radius", lambda shared: ran.append(1))
    result = _invoke("--quick", "--suite", "radius", "--out", out)
    assert result.exit_code == 1 and not ran
    assert "pass --overwrite" in result.output and len(result.output.strip().splitlines()) == 1
    assert (out / "benchmark.json").read_text() == "{}"


def test_overwrite_replaces_the_report_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    row = {"mode": "random reads, in memory", "structures_per_second": 100.0, "headroom": 2.0}
    monkeypatch.setitem(suites.SUITES, "io", lambda shared: suites.SuiteResult("io", "io", [row], []))
    result = _invoke("--suite", "io", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "benchmark.json").read_text())["suites"]["io"]["rows"] == [row]
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "io.png", "notes.txt"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "radius,speed"], "--suite"),
        (["--suite", ","], "at least one suite"),
        (["--threads", "0"], "--threads"),
        (["--cache", "missing.h5"], "no such file"),
    ],
)
def test_bad_options_give_one_line(args, message, tmp_path):
    result = _invoke(*args, "--out", tmp_path / "bench")
    assert result.exit_code == 1, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "bench").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
                    reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    result = _invoke("--device", "cuda", "--out", tmp_path / "bench")
    assert result.exit_code == 1 and "no CUDA device" in result.output


def test_without_qm9_the_data_suites_are_skipped_with_the_install_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "qm9pack" else real(name, *a))
    config = suites.BenchmarkConfig(suites=["train", "io"], quick=True, out=tmp_path / "bench")
    report = suites.run_benchmark(config)
    for result in report.suites:
        assert result.rows == [] and result.notes == [suites.NO_QM9]
    assert "pip install 'molden[qm9]'" in suites.NO_QM9


def test_cache_read_through_the_training_loader_reads_every_structure_once(qm9_cache):
    rows = run_cache_read_benchmark(qm9_cache, n_reads=64, batch_size=16, workers=1)
    modes = [r["mode"] for r in rows]
    assert modes[-1] == "shuffled batches of 16, training DataLoader, 1 workers"
    assert all(r["structures_per_second"] > 0 for r in rows)


def test_ctrl_c_writes_nothing_and_says_so(tmp_path, monkeypatch):
    def interrupted(shared):
        raise KeyboardInterrupt

    monkeypatch.setitem(suites.SUITES, "radius", interrupted)
    out = tmp_path / "bench"
    result = _invoke("--suite", "radius", "--out", out)
    assert result.exit_code == 130
    assert "nothing was written" in result.output and not out.exists()
