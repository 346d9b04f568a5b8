"""docs/FORMAT.md is checked against real caches: its plain-h5py example runs and agrees with
molden, refuses an incomplete file, and its statement of what is compressed is what the writer
does."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase.build import molecule

from molden.data.batch import collate
from molden.data.h5_dataset import H5Dataset
from molden.graph import edge_vectors
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


def section(title: str) -> str:
    text = FORMAT_MD.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def reading_example() -> str:
    match = re.search(r"```python\n(.*?)```", section("Reading with plain h5py"), re.S)
    assert match, "FORMAT.md lost its plain-h5py example"
    return match.group(1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A folder holding `qm9.h5`, the file name the example opens: 50 small molecules."""
    folder = tmp_path_factory.mktemp("format_doc")
    rng = np.random.default_rng(0)
    frames = []
    for k in range(50):
        atoms = molecule(["H2O", "CH4", "NH3", "C2H6"][k % 4])
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(atoms)
    frames[42].cell, frames[42].pbc = np.eye(3) * 3.0, True  # the example's s = 42: with images
    ase.io.write(folder / "frames.extxyz", frames)
    run_preprocess(PreprocessConfig(source="ase", inputs=[folder / "frames.extxyz"], out=folder / "qm9.h5",
                                    cutoff_angstrom=2.5))
    return folder


def test_reading_example_runs_and_agrees_with_molden(cache_dir, monkeypatch):
    monkeypatch.chdir(cache_dir)
    names: dict = {}
    exec(compile(reading_example(), "FORMAT.md", "exec"), names)
    dataset = H5Dataset(cache_dir / "qm9.h5")
    s = names["s"]
    structure = dataset[s]
    assert (np.abs(structure.unit_shifts).sum(axis=1) > 0).any()  # periodic images are exercised
    expected = edge_vectors(collate([structure], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(names["d"], expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(names["z"], structure.numbers)
    assert isinstance(names["system_id"], str) and names["system_id"] == structure.system_id
    assert names["split"] == structure.split
    np.testing.assert_array_equal(names["train"], H5Dataset(cache_dir / "qm9.h5", "train").indices)


def test_reading_example_refuses_an_incomplete_file(cache_dir, tmp_path, monkeypatch):
    shutil.copy(cache_dir / "qm9.h5", tmp_path / "qm9.h5")
    with h5py.File(tmp_path / "qm9.h5", "r+") as f:
        f.attrs["complete"] = False  # what a .partial holds
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="incomplete"):
        exec(compile(reading_example(), "FORMAT.md", "exec"), {})


def test_format_md_says_which_arrays_are_compressed(cache_dir):
    line = re.search(r"Not compressed: (.*?)\.(?:\n\n|\n?$)", section("Layout"), re.S)
    assert line, "FORMAT.md no longer says which arrays are not compressed"
    patterns = re.findall(r"`([^`]+)`", line.group(1))
    with h5py.File(cache_dir / "qm9.h5") as f:
        datasets: dict[str, tuple] = {}
        f.visititems(lambda name, d: datasets.setdefault(name, (d.chunks, d.compression, d.compression_opts, d.shuffle))
                     if isinstance(d, h5py.Dataset) else None)
    documented = {name for name in datasets if any(Path(name).match(p) for p in patterns)}
    assert documented == {name for name, d in datasets.items() if d[1] is None}
    for name, (chunks, *compression) in datasets.items():
        if name.split("/")[0] in ("structures", "atoms", "edges"):
            assert chunks is not None, name
            if name not in documented:
                assert compression == ["gzip", 4, True], name
