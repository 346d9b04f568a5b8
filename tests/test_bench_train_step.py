"""The training-step benchmark measures what BENCHMARKS.md reports (issue 14's speed figures,
issue 16's train suite): a row per preset with positive times that add up to the step, shares
that are fractions of the step, FLOPs counted on every timed step, and JSON that carries the
machine and the setup (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from molden.bench.train_step import (QM9_CPU_PRESETS, build_qm9_cache, graph_after_noise, main, matmul_peak_flops,
                                     run_train_step_benchmark)
from molden.errors import MoldenConfigError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None,  # its import needs pkg_resources
                                reason="qm9pack is not installed (pip install -e '.[qm9]')")
pytestmark = [pytestmark, pytest.mark.usefixtures("keep_torch_threads")]




def test_qm9_cpu_presets_are_the_cpu_presets_that_fit_5_angstrom_graphs():
    assert set(QM9_CPU_PRESETS) == {"gns_qm9_cpu", "gns_tat_cpu", "forcenet_cpu", "painn_cpu"}


def test_train_step_benchmark_row_has_times_that_add_up_shares_below_one_and_positive_flops(qm9_cache):
    steps = 2
    result = run_train_step_benchmark(qm9_cache, steps=steps, warmup=1, presets=["painn_cpu"], threads=1,
                                      max_graphs=32, peak_size=256)
    assert [r["preset"] for r in result["rows"]] == ["painn_cpu"]
    (row,) = result["rows"]
    for key in ("step_ms", "data_ms", "corrupt_ms", "compute_ms", "structures_per_second", "gflop_per_step",
                "achieved_gflops", "peak_fraction"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    times = row["times_s"]
    assert all(len(v) == steps for v in times.values())
    for step, data, corrupt, compute in zip(times["step"], times["data"], times["corrupt"], times["compute"]):
        assert data + corrupt + compute == pytest.approx(step)
    for key in ("data_share", "corrupt_share", "data_graph_share"):
        assert 0 < row[key] < 1, (key, row[key])
    assert len(row["flops"]) == steps and all(f > 0 for f in row["flops"])
    assert row["structures_per_step"] <= 32 and row["train_structures"] == 300  # 400 − 60 val − 40 test
    assert row["skipped_steps"] == 0
    assert result["peak"]["gflops"] == max(result["peak"]["gflops_before"], result["peak"]["gflops_after"]) > 0
    assert row["peak_fraction"] == pytest.approx(row["achieved_gflops"] / result["peak"]["gflops"])
    assert result["setup"]["cache"] == str(qm9_cache) and result["setup"]["noisy_nodes_sigma_angstrom"] == 0.02
    assert result["setup"]["graph_after_noise"] == "searched (the cache's graphs stop at 5 Å)"


def test_the_benchmark_says_when_the_graph_after_noise_is_filtered_from_a_wider_cache(tmp_path):
    if importlib.util.find_spec("qm9pack") is None:  # importing it needs pkg_resources: only locate it
        pytest.skip("qm9pack is not installed")
    wide = build_qm9_cache(tmp_path / "wide.h5", 50)
    assert graph_after_noise(wide, ["painn_cpu", "gns_qm9_cpu"]) == (
        "filtered from the cache's 5.5 Å graphs (moves below 0.25 Å)")


def test_train_step_cli_writes_json_with_the_machine_and_one_row_per_preset_asked(qm9_cache, tmp_path, capsys):
    out = tmp_path / "train_step.json"
    main(["--cache", str(qm9_cache), "--steps", "1", "--warmup", "0", "--threads", "1", "--max-graphs", "8",
          "--presets", "painn_cpu", "forcenet_cpu", "--peak-size", "128", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["preset"] for r in result["rows"]] == ["painn_cpu", "forcenet_cpu"]
    # Presets trained side by side read the same batches (same seed, same data order).
    assert result["rows"][0]["flops"] != result["rows"][1]["flops"]
    assert result["rows"][0]["atoms_per_step"] == result["rows"][1]["atoms_per_step"]
    assert result["machine"]["torch_threads"] == 1 and result["peak"]["matmul_size"] == 128
    assert {"cpu", "cores", "torch", "date"} <= set(result["machine"])
    printed = capsys.readouterr().out
    assert "painn_cpu" in printed and "forcenet_cpu" in printed


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak_flops(size=64, repeats=1) > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"presets": ["gns_qm9_gpu"]}, "unknown model presets"),
    ({"presets": []}, "at least one model preset"),
    ({"steps": 0}, "--steps >= 1"),
])
def test_train_step_benchmark_rejects_bad_options_before_reading_data(tmp_path, kwargs, message):
    with pytest.raises(MoldenConfigError, match=message):
        run_train_step_benchmark(tmp_path / "missing.h5", **kwargs)


def test_train_step_benchmark_rejects_a_missing_cache(tmp_path):
    with pytest.raises(MoldenConfigError, match="no such file"):
        run_train_step_benchmark(tmp_path / "missing.h5")
