"""Generic ASE reader: extxyz, traj, db and cif round trips, and ASE's errors as one-line messages."""

from __future__ import annotations

from pathlib import Path

import ase.db
import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from molden.data.readers import READERS, count_ase, read_ase
from molden.errors import MoldenInputError


def labelled_frames(n: int = 4) -> list[Atoms]:
    """Water frames with energies (eV), forces (eV/Å), tags and one fixed atom."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        atoms = molecule("H2O")
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.set_tags([2, 2, 2])
        atoms.set_constraint(FixAtoms(indices=[0]))
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0 + 0.1 * i, forces=rng.normal(size=(3, 3)))
        frames.append(atoms)
    return frames


@pytest.mark.parametrize("suffix", [".extxyz", ".traj", ".db", ".extxyz.gz"])
def test_energy_forces_tags_fixed_round_trip(tmp_path, suffix):
    frames = labelled_frames()
    path = tmp_path / f"water{suffix}"
    ase.io.write(path, frames)
    got = list(read_ase(path))
    assert [(s.system_id, s.frame) for s in got] == [("water", i) for i in range(4)]
    for s, atoms in zip(got, frames):
        np.testing.assert_allclose(s.positions, atoms.positions, rtol=0, atol=1e-8)
        assert s.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(s.forces, atoms.get_forces(apply_constraint=False), rtol=0, atol=1e-8)
        assert s.tags.tolist() == [2, 2, 2] and s.fixed.tolist() == [True, False, False]
    assert count_ase(path) == (4 if suffix in (".traj", ".db") else None)
    assert READERS["ase"] is read_ase


def test_index_selects_frames_and_numbers_them_by_position(tmp_path):
    path = tmp_path / "water.extxyz"
    ase.io.write(path, labelled_frames(6))
    assert [s.frame for s in read_ase(path, index="1::2")] == [1, 3, 5]
    assert [s.frame for s in read_ase(path, index=2)] == [2]
    assert [s.frame for s in read_ase(path, limit=2)] == [0, 1]
    assert len(list(read_ase(path, index="-1"))) == 1


def test_cif_keeps_cell_and_pbc(tmp_path):
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # CIF rewrites cells in a standard orientation
    path = tmp_path / "NaCl.cif"
    ase.io.write(path, crystal)
    (s,) = read_ase(path)
    assert s.system_id == "NaCl" and s.pbc.all() and s.energy is None
    np.testing.assert_allclose(s.cell, crystal.cell.array, atol=1e-6)
    np.testing.assert_allclose(
        np.sort(s.positions, axis=0), np.sort(crystal.positions, axis=0), rtol=0, atol=1e-6
    )


def test_ase_db_rows(tmp_path):
    path = tmp_path / "set.db"
    with ase.db.connect(path) as db:
        for atoms in labelled_frames(3):
            db.write(atoms)
    assert [s.energy for s in read_ase(path)] == pytest.approx([-14.0, -13.9, -13.8])


# --- bad input ---------------------------------------------------------------------------------


def _extxyz(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.extxyz"
    path.write_text(text)
    return path


HEADER = 'Properties=species:S:1:pos:R:3 pbc="F F F"'


def test_truncated_extxyz_names_frame(tmp_path):
    path = _extxyz(tmp_path, f"2\n{HEADER}\nH 0 0 0\nH 0 0 0.74\n3\n{HEADER}\nO 0 0 0\n")
    with pytest.raises(MoldenInputError, match=r"bad\.extxyz, record 1: cannot read frame \(1 read so far\)"):
        list(read_ase(path))


def test_nan_positions(tmp_path):
    path = _extxyz(tmp_path, f"2\n{HEADER}\nH 0 0 0\nH 0 nan 0.74\n")
    with pytest.raises(MoldenInputError, match=r"record 0: non-finite positions \(NaN or inf\) at atom 1"):
        list(read_ase(path))


def test_periodic_with_zero_cell(tmp_path):
    path = _extxyz(tmp_path, '2\nProperties=species:S:1:pos:R:3 pbc="T T T"\nH 0 0 0\nH 0 0 0.74\n')
    with pytest.raises(MoldenInputError, match=r"record 0: periodic along axes \[0, 1, 2\] but the cell is zero"):
        list(read_ase(path))


def test_unknown_element(tmp_path):
    path = _extxyz(tmp_path, f"2\n{HEADER}\nH 0 0 0\nXx 0 0 0.74\n")
    with pytest.raises(MoldenInputError, match=r"record 0: cannot read frame \(0 read so far\): unknown element 'Xx'"):
        list(read_ase(path))


def test_garbled_number(tmp_path):
    path = _extxyz(tmp_path, f"2\n{HEADER}\nH 0 0 0\nH 0 0.x 0.74\n")
    with pytest.raises(MoldenInputError, match=r"record 0: cannot read frame .*ValueError"):
        list(read_ase(path))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(MoldenInputError, match=r"missing\.extxyz: no such file or folder"):
        list(read_ase(tmp_path / "missing.extxyz"))
    (tmp_path / "notes.unknownext").write_text("hello\n")
    with pytest.raises(MoldenInputError, match=r"notes\.unknownext.*cannot read"):
        list(read_ase(tmp_path / "notes.unknownext"))


# --- folders -------------------------------------------------------------------------------------


def test_folder_reads_the_files_ase_knows_in_natural_order_and_names_the_rest(tmp_path, caplog):
    frames = labelled_frames(3)
    ase.io.write(tmp_path / "10.extxyz", frames[:1])
    ase.io.write(tmp_path / "2.traj", frames[1:])
    (tmp_path / "notes.txt").write_text("not a structure\n")
    (tmp_path / "sub").mkdir()
    with caplog.at_level("WARNING"):
        got = list(read_ase(tmp_path))
    assert [(s.system_id, s.frame) for s in got] == [("2", 0), ("2", 1), ("10", 0)]
    np.testing.assert_allclose(got[2].positions, frames[0].positions, rtol=0, atol=1e-8)
    assert "skipped 2" in caplog.text and "notes.txt" in caplog.text and "sub" in caplog.text
    assert [s.frame for s in read_ase(tmp_path, limit=2)] == [0, 1]
    assert count_ase(tmp_path) is None  # the extxyz has no index
    (tmp_path / "10.extxyz").unlink()
    assert count_ase(tmp_path) == 2


def test_folder_without_readable_files_says_what_it_lacks(tmp_path):
    with pytest.raises(MoldenInputError, match="no file in this folder that ASE can read.*empty"):
        list(read_ase(tmp_path))
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(MoldenInputError, match="no file in this folder that ASE can read.*found only notes.txt"):
        list(read_ase(tmp_path))


def test_preprocess_ase_of_a_folder_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from molden.cli.app import app

    folder = tmp_path / "frames"
    folder.mkdir()
    ase.io.write(folder / "a.extxyz", labelled_frames(4))
    ase.io.write(folder / "b.extxyz", labelled_frames(4))
    out = tmp_path / "x.h5"
    result = CliRunner().invoke(app, ["preprocess", "ase", str(folder), "--out", str(out), "--val", "1", "--test", "1"])
    assert result.exit_code == 0, result.output
    from molden.data.h5_dataset import H5Dataset

    assert sorted({H5Dataset(out)[k].system_id for k in range(8)}) == ["a", "b"]


def test_bad_bytes_in_an_extxyz_name_the_line_not_frame_zero(tmp_path, mixed_extxyz):
    data = mixed_extxyz.read_bytes().splitlines(keepends=True)
    bad_line = 60  # well past the first frames
    data[bad_line - 1] = data[bad_line - 1].rstrip(b"\n") + b" \xe9\n"
    src = tmp_path / "bad.extxyz"
    src.write_bytes(b"".join(data))
    with pytest.raises(MoldenInputError, match=rf"line {bad_line}\b.*0xe9|0xe9.*line {bad_line}\b"):
        list(read_ase(src))


def test_a_readme_in_a_data_folder_is_skipped(tmp_path, mixed_extxyz):
    import shutil

    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(mixed_extxyz, folder / "frames.extxyz")
    (folder / "README.md").write_text("# notes\n")
    assert len(list(read_ase(folder))) == 30
