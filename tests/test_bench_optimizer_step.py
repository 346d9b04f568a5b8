"""`molden.bench.optimizer_step` on a few systems: every tool's rows, molden's L-BFGS launching
as many kernels per step with a full history as with an empty one, and one host read per
step (the driver's convergence check). No timing is asserted."""

from __future__ import annotations

import json

import pytest

from molden.bench import optimizer_step


@pytest.fixture(scope="module")
def rows():
    return optimizer_step.run_optimizer_step_benchmark(n_systems=2, memory=20, steps=40)


def test_rows_cover_every_window_and_tool(rows):
    timed = [r for r in rows if not r.get("skipped")]
    windows = {r["window"] for r in timed}
    assert len(windows) == 3 and [r["history_full"] for r in timed if r["tool"] == "molden"] == [False, False, True] * 2
    for method in ("lbfgs", "fire"):
        molden = [r for r in timed if r["method"] == method and r["tool"] == "molden"]
        assert len(molden) == 3 and all(r["ratio"] == 1.0 and r["ms_per_step"] > 0 for r in molden)
    tools = {r["tool"] for r in rows}
    assert tools == {"molden", "torch-sim", "nvalchemi"} or "skipped" in json.dumps(rows)
    json.dumps(rows)


def test_molden_lbfgs_kernels_do_not_grow_with_the_history_and_it_reads_back_once(rows):
    lbfgs = [r for r in rows if r["method"] == "lbfgs" and r["tool"] == "molden"]
    assert len({r["kernels_per_step"] for r in lbfgs}) == 1
    assert all(r["host_reads_per_step"] == 1.0 for r in lbfgs)


def test_bad_options_are_one_line(capsys, tmp_path):
    existing = tmp_path / "out.json"
    existing.write_text("{}")
    for argv in (["--steps", "5"], ["--systems", "0"], ["--json", str(existing)]):
        with pytest.raises(SystemExit) as exit_info:
            optimizer_step.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "error:" in err[-1]
    assert existing.read_text() == "{}"
