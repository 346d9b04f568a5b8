"""The scripts in examples/ run end to end (in-process, in a temporary folder) and say what
they claim; examples/README.md lists every one of them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_read_batch_example_rebuilds_the_cached_graph(tmp_path, capsys):
    example = _load("build_read_batch")
    result = example.main(tmp_path / "work")
    assert result["same_graph"] and result["n_structures"] == 12
    assert 0 < result["max_edge_length"] <= example.CUTOFF_ANGSTROM + 1e-9
    assert result["n_edges"] > 0
    assert "on-the-fly graph equals the cached one: True" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["frames.extxyz", "frames.h5"]


def test_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    for script in EXAMPLES.glob("*.py"):
        assert f"`{script.name}`" in readme, script.name
