"""`python -m molden.bench.graph_after_noise`: the graph after noise filtered from a wider cache
against searched, same structures and noise, edges compared at every batch."""

from __future__ import annotations

import json

import pytest

from molden.bench.graph_after_noise import main, run_graph_after_noise_benchmark
from molden.data.splits import SplitConfig
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess


@pytest.fixture(scope="module")
def wider_s2ef_cache(s2ef_cache):
    """The s2ef_cache fixture's frames at 4.5 Å instead of 4 Å (same split settings)."""
    out = s2ef_cache.parent / "s2ef_45.h5"
    if not out.exists():
        run_preprocess(PreprocessConfig(source="ase", inputs=[s2ef_cache.parent / "frames.extxyz"], out=out,
                                        cutoff_angstrom=4.5,
                                        split=SplitConfig(val=0.2, test=0.1, group_by="structure")))
    return out


@pytest.mark.parametrize("objective", ["noisy_nodes", "dens", "denoising"])
def test_every_objective_filters_the_same_edges_it_would_search(s2ef_cache, wider_s2ef_cache, objective):
    result = run_graph_after_noise_benchmark(s2ef_cache, wider_s2ef_cache, objective, batch=8, repeats=4)
    assert result["same_edges"] and result["filtered_batches"] == 4  # σ ≤ 0.05 Å never moves an atom 0.25 Å here
    assert result["searched_ms"] > 0 and result["filtered_ms"] > 0
    assert result["speedup"] == pytest.approx(result["searched_ms"] / result["filtered_ms"])
    assert result["setup"]["cutoff_angstrom"] == 4.0 and result["setup"]["wider_cutoff_angstrom"] == 4.5
    assert result["edges_per_batch"] > 0


def test_caches_that_do_not_fit_the_comparison_are_refused_in_one_line(s2ef_cache, wider_s2ef_cache, emt_cache,
                                                                        capsys, tmp_path):
    for args, message in ((["--searched", wider_s2ef_cache, "--filtered", s2ef_cache], "wider than"),
                          (["--searched", s2ef_cache, "--filtered", emt_cache], "hold different structures"),
                          (["--searched", tmp_path / "none.h5", "--filtered", emt_cache], "none.h5")):
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in args] + ["--repeats", "1"])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    out = tmp_path / "r.json"
    main(["--searched", str(s2ef_cache), "--filtered", str(wider_s2ef_cache), "--objective", "dens", "--batch", "4",
          "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["setup"]["objective"] == "dens"
    assert "same edges in every batch" in capsys.readouterr().out
    for extra, message in (([], "exists: pass --overwrite"), (["--overwrite", "--json", str(s2ef_cache)], "one of the caches")):
        with pytest.raises(SystemExit) as stop:
            main(["--searched", str(s2ef_cache), "--filtered", str(wider_s2ef_cache), "--repeats", "1",
                  "--json", str(out), *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    main(["--searched", str(s2ef_cache), "--filtered", str(wider_s2ef_cache), "--repeats", "1", "--json", str(out),
          "--overwrite"])
    assert json.loads(out.read_text())["setup"]["objective"] == "noisy_nodes" and not list(tmp_path.glob("*.partial"))
