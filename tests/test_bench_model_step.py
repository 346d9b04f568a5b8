"""The model-step benchmark measures what BENCHMARKS.md reports: a row per CPU preset with
finite positive times, a rebuild share that is a fraction of the step, and its JSON carries the
machine (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from molden.bench.model_step import CPU_PRESETS, main, run_model_step_benchmark
from molden.errors import MoldenConfigError
from molden.models.presets import PRESETS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None,  # its import needs pkg_resources
                                reason="qm9pack is not installed (pip install -e '.[qm9]')")
pytestmark = [pytestmark, pytest.mark.usefixtures("keep_torch_threads")]



TIMES = ("clean_step_ms", "noisy_nodes_step_ms", "corrupt_ms", "corrupt_in_step_ms", "corrupt_kept_graph_ms")


def test_cpu_presets_are_every_preset_named_cpu():
    assert set(CPU_PRESETS) == {name for name in PRESETS if name.endswith("_cpu")}
    assert len(CPU_PRESETS) >= 4


def test_model_step_benchmark_has_a_row_per_cpu_preset_with_positive_times_and_shares_below_one():
    result = run_model_step_benchmark(batch_size=8, repeats=1, warmup=1, threads=None)
    rows = result["rows"]
    assert [r["preset"] for r in rows] == list(CPU_PRESETS)
    assert result["batch"]["molecules"] == 8 and result["batch"]["dtype"] == "torch.float32"
    for r in rows:
        for key in TIMES:
            assert math.isfinite(r[key]) and r[key] > 0, (r["preset"], key, r[key])
        assert r["corrupt_in_step_ms"] < r["noisy_nodes_step_ms"]
        assert 0 < r["rebuild_share"] < 1 and 0 <= r["rebuild_only_share"] < 1
        assert r["rebuild_share"] == pytest.approx(r["corrupt_ms"] / r["noisy_nodes_step_ms"])
        assert r["clean_structures_per_second"] == pytest.approx(8e3 / r["clean_step_ms"])
        assert r["noisy_nodes_structures_per_second"] == pytest.approx(8e3 / r["noisy_nodes_step_ms"])
        # The Noisy Nodes model is the clean one plus a noise head.
        assert 0 < r["backbone_parameters"] < r["clean_model_parameters"] < r["noisy_nodes_model_parameters"]


def test_model_step_cli_writes_json_with_the_machine_and_one_row_per_preset_asked(tmp_path, capsys):
    out = tmp_path / "step.json"
    main(["--batch", "4", "--repeats", "1", "--warmup", "0", "--threads", "1", "--presets", "painn_cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["preset"] for r in result["rows"]] == ["painn_cpu"]
    assert result["machine"]["torch_threads"] == 1
    assert {"cpu", "cores", "torch", "date"} <= set(result["machine"])
    assert "painn_cpu" in capsys.readouterr().out


def test_model_step_benchmark_rejects_an_unknown_preset_before_reading_data():
    with pytest.raises(MoldenConfigError, match="unknown model presets"):
        run_model_step_benchmark(batch_size=2, repeats=1, presets=["gns_qm9_gpu"])
