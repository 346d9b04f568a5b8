"""`--out` never destroys what it should not: inputs, directories, foreign files, caches of other
settings and partial files holding committed work (issue 12, items 5, 6 and 19)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from molden.cli.app import app
from molden.data import h5_writer
from molden.data.h5_writer import CacheWriter
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError
from molden.pipeline import preprocess as pp
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _refused(result, *words: str) -> str:
    """The run failed with exit 1 and one line naming each of `words`, without a traceback."""
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in result.output
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def _config(src, out, **kw) -> PreprocessConfig:
    return PreprocessConfig(source="ase", inputs=[src], out=out, **({"cutoff_angstrom": 4.0} | kw))


def _interrupted_after(n: int, config: PreprocessConfig) -> None:
    def interrupt(done, total):
        if done >= n:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_preprocess(config, progress=interrupt)


# ------------------------------------------------------------------ item 5: --out
def test_out_equal_to_an_input_is_refused_and_the_input_kept(mixed_extxyz, tmp_path):
    same = tmp_path / "self.extxyz"
    shutil.copy(mixed_extxyz, same)
    before = same.read_bytes()
    _refused(_run("preprocess", "ase", same, "--out", same), "self.extxyz", "input")
    assert same.read_bytes() == before
    # The same file reached through another spelling of its path.
    _refused(_run("preprocess", "ase", same, "--out", tmp_path / "." / "self.extxyz"), "input")
    assert same.read_bytes() == before
    assert not list(tmp_path.glob("*.partial"))


def test_out_inside_an_input_folder_is_allowed(mixed_extxyz, tmp_path):
    out = mixed_extxyz.parent / "cache.h5"
    summary = run_preprocess(_config(mixed_extxyz, out))
    assert summary.path == out and out.exists()


def test_out_that_is_a_file_but_not_a_cache_is_refused_even_with_overwrite(mixed_extxyz, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        _refused(_run("preprocess", "ase", mixed_extxyz, "--out", notes, *extra), "notes.txt", "not a molden cache")
        assert notes.read_text() == "my notes\n"
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    _refused(_run("preprocess", "ase", mixed_extxyz, "--out", foreign), "not a molden cache")
    with h5py.File(foreign) as f:
        assert list(f) == ["x"]


def test_out_that_is_a_directory_is_refused_before_any_work(mixed_extxyz, tmp_path, monkeypatch):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    monkeypatch.setattr(pp, "build_graphs", lambda *a, **k: pytest.fail("work started"))
    _refused(_run("preprocess", "ase", mixed_extxyz, "--out", folder), "somewhere", "directory")
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.partial"))


def test_a_complete_cache_of_the_same_settings_is_reused_without_work(mixed_extxyz, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    first = run_preprocess(_config(mixed_extxyz, out))
    stamp = out.stat().st_mtime_ns
    monkeypatch.setattr(pp, "build_graphs", lambda *a, **k: pytest.fail("work redone"))
    notes: list[str] = []
    again = run_preprocess(_config(mixed_extxyz, out), notify=notes.append)
    assert again.reused and out.stat().st_mtime_ns == stamp
    assert (again.n_structures, again.n_atoms, again.n_edges, again.splits) == (
        first.n_structures, first.n_atoms, first.n_edges, first.splits,
    )
    assert len(notes) == 1 and "already complete" in notes[0]
    result = _run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 4.0)
    assert result.exit_code == 0, result.output
    assert "already complete" in result.output


def test_a_complete_cache_of_other_settings_needs_overwrite(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    stamp = out.stat().st_mtime_ns
    message = _refused(_run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 3.0), "--overwrite")
    assert "cutoff" in message and "4.0" in message and "3.0" in message
    assert out.stat().st_mtime_ns == stamp
    result = _run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 3.0, "--overwrite")
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert float(f.attrs["cutoff_angstrom"]) == 3.0


def test_a_different_split_is_not_a_reuse(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    result = _run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 4.0, "--val", 0.3)
    _refused(result, "--overwrite", "split")


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_complete(mixed_extxyz, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    before = out.read_bytes()

    def failing(*args, **kwargs):
        raise MoldenInputError("test", "stopped halfway")

    monkeypatch.setattr(pp, "build_graphs", failing)
    with pytest.raises(MoldenInputError, match="halfway"):
        run_preprocess(_config(mixed_extxyz, out, cutoff_angstrom=3.0, overwrite=True))
    assert out.read_bytes() == before
    assert not (tmp_path / "c.h5.partial").exists()


def test_overwrite_is_not_part_of_the_provenance(mixed_extxyz, tmp_path):
    assert pp.provenance(_config(mixed_extxyz, tmp_path / "c.h5", overwrite=True)) == pp.provenance(
        _config(mixed_extxyz, tmp_path / "c.h5")
    )


# ------------------------------------------------------------------ item 6: partial files
def test_a_partial_file_of_other_settings_is_kept_and_named(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 7)
    out = tmp_path / "c.h5"
    partial = tmp_path / "c.h5.partial"
    _interrupted_after(7, _config(mixed_extxyz, out))
    before = partial.read_bytes()
    message = _refused(_run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 3.0), "c.h5.partial", "--overwrite")
    assert "7 structures" in message and "cutoff" in message
    assert partial.read_bytes() == before
    # The original settings still resume it.
    assert run_preprocess(_config(mixed_extxyz, out)).resumed_from == 7


@pytest.mark.parametrize("flag", ["--overwrite", "--no-resume"])
def test_overwrite_or_no_resume_discards_a_partial_file_and_says_so(flag, mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 7)
    out = tmp_path / "c.h5"
    _interrupted_after(7, _config(mixed_extxyz, out))
    result = _run("preprocess", "ase", mixed_extxyz, "--out", out, "--cutoff", 3.0, flag)
    assert result.exit_code == 0, result.output
    assert "discarded" in result.stderr and "c.h5.partial" in result.stderr
    with h5py.File(out) as f:
        assert float(f.attrs["cutoff_angstrom"]) == 3.0 and int(f.attrs["n_structures"]) == 30


def test_an_unreadable_partial_file_is_replaced_and_reported(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    (tmp_path / "c.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(88))  # 96 bytes, as a kill leaves it
    notes: list[str] = []
    summary = run_preprocess(_config(mixed_extxyz, out), notify=notes.append)
    assert summary.n_structures == 30 and summary.resumed_from == 0
    assert any("unreadable" in note for note in notes) and summary.notes == notes


def test_a_partial_file_is_readable_from_its_creation(tmp_path):
    writer = CacheWriter(tmp_path / "c.h5", {"source": "test"})
    try:
        copy = tmp_path / "copy.h5"
        shutil.copy(writer.partial, copy)  # what a kill -9 right now would leave behind
        with h5py.File(copy, "r") as f:
            assert int(f.attrs["n_structures"]) == 0
    finally:
        writer.abort()


def test_an_interrupt_before_anything_is_committed_leaves_no_partial_file(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    _interrupted_after(0, _config(mixed_extxyz, out))
    assert list(tmp_path.glob("c.h5*")) == []


# ------------------------------------------------------------------ item 19: writer errors
def test_writing_a_structure_without_a_graph_names_the_file_and_record(tmp_path):
    s = Structure(numbers=np.array([1, 1]), positions=np.array([[0.0, 0, 0], [0, 0, 0.74]]), system_id="h2")
    writer = CacheWriter(tmp_path / "c.h5", {"source": "test"})
    try:
        with pytest.raises(MoldenInputError, match=r"input\.xyz, record h2: has no graph"):
            writer.write([s], "input.xyz")
    finally:
        writer.abort()


def test_describe_differences_names_each_changed_setting_once():
    old = {"cutoff_angstrom": 6.0, "config": {"cutoff_angstrom": 6.0, "limit": None}}
    new = {"cutoff_angstrom": 5.0, "config": {"cutoff_angstrom": 5.0, "limit": 10}}
    assert h5_writer.describe_differences(old, new) == "cutoff_angstrom 6.0 → 5.0, config.limit None → 10"


def test_a_partial_file_of_other_settings_raises_a_config_error_in_the_library(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 7)
    out = tmp_path / "c.h5"
    _interrupted_after(7, _config(mixed_extxyz, out))
    with pytest.raises(MoldenConfigError, match="7 structures"):
        run_preprocess(_config(mixed_extxyz, out, cutoff_angstrom=3.0))


# ------------------------------------------------------------------ found in review
def test_a_later_structure_with_a_field_the_first_lacks_is_refused_not_dropped(mixed_extxyz, tmp_path):
    import ase.io
    from ase.build import bulk

    bare = bulk("Cu", "fcc", a=3.6, cubic=True)
    src = tmp_path / "bare_first.extxyz"
    ase.io.write(src, [bare] + ase.io.read(mixed_extxyz, ":3"))
    message = _refused(_run("preprocess", "ase", src, "--out", tmp_path / "x.h5"), "bare_first.extxyz", "first structure")
    assert "has" in message
    assert list(tmp_path.glob("x.h5*")) == []


def test_a_cache_is_not_reused_after_its_input_file_changed(mixed_extxyz, tmp_path):
    import ase.io

    src = tmp_path / "in.extxyz"
    shutil.copy(mixed_extxyz, src)
    out = tmp_path / "in.h5"
    first = run_preprocess(_config(src, out))
    ase.io.write(src, ase.io.read(mixed_extxyz, ":6"))
    with pytest.raises(MoldenConfigError, match="overwrite"):
        run_preprocess(_config(src, out))
    again = run_preprocess(_config(src, out, overwrite=True))
    assert first.n_structures == 30 and again.n_structures == 6


def test_a_file_added_to_an_input_folder_changes_the_provenance(mixed_extxyz, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    shutil.copy(mixed_extxyz, folder / "a.extxyz")
    before = pp.provenance(_config(folder, tmp_path / "x.h5"))
    shutil.copy(mixed_extxyz, folder / "b.extxyz")
    assert pp.provenance(_config(folder, tmp_path / "x.h5")) != before
