"""QM9 reader: qm9pack CSVs against their raw text, original dsgdb9nsd xyz against qm9pack."""

from __future__ import annotations

import ast
import csv
import importlib.util
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ase.data import atomic_numbers

from molden.data.readers import READERS, count_qm9, read_qm9
from molden.data.readers.qm9 import N_QM9, QM9_PACK_FILES, QM9_TARGETS
from molden.data.structure import Structure
from molden.errors import MoldenInputError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="needs qm9pack")
csv.field_size_limit(1 << 30)

# 1-based positions over the three qm9pack files (43,610 + 43,611 + 43,610 rows).
SAMPLE_POSITIONS = (1, 1000, 50000, 130831)


def _csv_files() -> list[Path]:
    folder = Path(importlib.util.find_spec("qm9pack").origin).parent / "data"
    return [folder / name for name in QM9_PACK_FILES]


def _raw_rows(positions: set[int]) -> dict[int, dict[str, str]]:
    """The qm9pack CSV rows at these 1-based positions, as column → raw text."""
    rows, offset = {}, 0
    for file in _csv_files():
        with open(file, newline="") as handle:
            for i, row in enumerate(csv.DictReader(handle), start=offset + 1):
                if i in positions:
                    rows[i] = row
                offset = i
    return rows


@pytest.fixture(scope="module")
def raw() -> dict[int, dict[str, str]]:
    return _raw_rows(set(SAMPLE_POSITIONS) | {207})  # row 207 (gdb_212) has an "E" exponent


ROWS_PER_FILE = (43_610, 43_611, 43_610)


@pytest.fixture(scope="module")
def molecules(raw) -> dict[int, Structure]:
    """read_qm9's molecule at each sampled position, reading only the CSV that holds it."""
    found, offset = {}, 0
    for file, n in zip(_csv_files(), ROWS_PER_FILE):
        wanted = {p - offset for p in raw if offset < p <= offset + n}
        if wanted:
            source = read_qm9() if offset == 0 else read_qm9(file)  # the default path, where cheap
            for i, s in enumerate(itertools.islice(source, max(wanted)), start=1):
                if i in wanted:
                    found[offset + i] = s
        offset += n
    return found


@pytest.mark.parametrize("position", SAMPLE_POSITIONS)
def test_qm9pack_molecule_matches_raw_csv_text(raw, molecules, position):
    row, s = raw[position], molecules[position]
    assert s.system_id == f"gdb_{row['Index']}" and s.frame == 0
    assert s.numbers.tolist() == [atomic_numbers[e] for e in ast.literal_eval(row["Elements"])]
    np.testing.assert_array_equal(s.positions, np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=float))
    assert s.targets == {name: float(row[t.csv_column]) for name, t in QM9_TARGETS.items()}
    assert s.energy is None and s.forces is None and not s.pbc.any()


def test_qm9_targets_table_has_the_twelve_standard_targets_with_units():
    assert list(QM9_TARGETS) == ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"]
    assert {t.unit for t in QM9_TARGETS.values()} == {"D", "bohr^3", "Ha", "bohr^2", "cal/(mol K)"}


def test_registry_and_count():
    assert READERS["qm9"] is read_qm9
    assert count_qm9() == N_QM9 == 130_831


def test_limit_stops_early():
    assert [s.system_id for s in read_qm9(limit=3)] == ["gdb_1", "gdb_2", "gdb_3"]
    assert list(read_qm9(limit=0)) == []


@pytest.mark.slow
def test_qm9pack_yields_every_molecule_in_index_order():
    indices = np.fromiter((int(s.system_id[4:]) for s in read_qm9()), dtype=np.int64)
    assert len(indices) == 130_831
    assert (np.diff(indices) > 0).all() and indices[0] == 1 and indices[-1] == 133_885


# --- the original GDB9 xyz format -------------------------------------------------------------


def _mathematica(text: str) -> str:
    """A float as GDB9's Mathematica export writes it: "2.1997E-6" → "2.1997*^-6"."""
    return text.replace("E", "*^").replace("e", "*^")


def gdb9_xyz_text(row: dict[str, str]) -> str:
    """A `dsgdb9nsd_NNNNNN.xyz` file, in the layout of the original archive, from a qm9pack row."""
    props = ["RotA_GHz", "RotB_GHz", "RotC_GHz"] + [t.csv_column for t in QM9_TARGETS.values()]
    elements = ast.literal_eval(row["Elements"])
    xyz = row["XYZ_Ang"].strip("[]").split("],[")
    charges = row["Mulliken_pop"].strip("[]").split(",")
    lines = [str(len(elements)), "\t".join([f"gdb {row['Index']}"] + [_mathematica(row[p]) for p in props]) + "\t"]
    for element, coords, charge in zip(elements, xyz, charges):
        lines.append("\t".join([element] + [_mathematica(c) for c in coords.split(",")] + [_mathematica(charge)]))
    lines.append("\t".join(row["Harmonic_Freq_cmi"].strip("[]").split(",")))
    lines.append(f"{row['SMILES']}\t{row['SMILES']}")
    lines.append(f"{row['InChi']}\t{row['InChi']}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def xyz_folder(raw, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dsgdb9nsd")
    for row in raw.values():
        (folder / row["XYZ_file"]).write_text(gdb9_xyz_text(row))
    return folder


def test_fixture_uses_mathematica_exponents(xyz_folder):
    assert "2.1997*^-6" in (xyz_folder / "dsgdb9nsd_000212.xyz").read_text()


def test_xyz_folder_matches_qm9pack(raw, molecules, xyz_folder):
    from_xyz = list(read_qm9(xyz_folder))
    assert [s.system_id for s in from_xyz] == [f"gdb_{i}" for i in sorted(int(r["Index"]) for r in raw.values())]
    assert count_qm9(xyz_folder) == len(raw)
    by_id = {s.system_id: s for s in from_xyz}
    for expected in molecules.values():
        got = by_id[expected.system_id]
        np.testing.assert_array_equal(got.numbers, expected.numbers)
        np.testing.assert_allclose(got.positions, expected.positions, rtol=0, atol=1e-12)
        assert got.targets == pytest.approx(expected.targets, rel=1e-12)
    assert by_id["gdb_212"].positions[0, 0] == pytest.approx(2.1997e-6, rel=1e-12)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.bz2"])
def test_xyz_archive_streams_the_same_molecules(xyz_folder, tmp_path, suffix):
    archive = tmp_path / f"dsgdb9nsd.xyz{suffix}"
    mode = {".tar": "w", ".tar.gz": "w:gz", ".tar.bz2": "w:bz2"}[suffix]
    with tarfile.open(archive, mode) as tar:
        for file in sorted(xyz_folder.iterdir()):
            tar.add(file, arcname=file.name)
    from_tar, from_folder = list(read_qm9(archive)), list(read_qm9(xyz_folder))
    assert [s.system_id for s in from_tar] == [s.system_id for s in from_folder]
    for a, b in zip(from_tar, from_folder):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.targets == b.targets
    assert len(list(read_qm9(archive, limit=2))) == 2


# --- bad input ---------------------------------------------------------------------------------


def _xyz_of(xyz_folder: Path, name: str = "dsgdb9nsd_000001.xyz") -> list[str]:
    return (xyz_folder / name).read_text().splitlines()


def _read_one(tmp_path: Path, lines: list[str]) -> list:
    (tmp_path / "dsgdb9nsd_000001.xyz").write_text("\n".join(lines) + "\n")
    return list(read_qm9(tmp_path))


def test_truncated_xyz_names_file_and_line(xyz_folder, tmp_path):
    with pytest.raises(MoldenInputError, match=r"dsgdb9nsd_000001\.xyz: truncated record.*\(line 4\)"):
        _read_one(tmp_path, _xyz_of(xyz_folder)[:4])


def test_garbled_coordinate_names_line(xyz_folder, tmp_path):
    lines = _xyz_of(xyz_folder)
    fields = lines[3].split("\t")
    lines[3] = "\t".join(fields[:2] + ["0.00-60313176"] + fields[3:])
    with pytest.raises(MoldenInputError, match=r"garbled coordinate.*\(line 4\)"):
        _read_one(tmp_path, lines)


def test_garbled_property_names_line_2(xyz_folder, tmp_path):
    lines = _xyz_of(xyz_folder)
    lines[1] = lines[1].replace("-40.47893", "-40.4789e3.1")
    with pytest.raises(MoldenInputError, match=r"garbled property.*\(line 2\)"):
        _read_one(tmp_path, lines)


def test_unknown_element_is_named(xyz_folder, tmp_path):
    lines = _xyz_of(xyz_folder)
    lines[4] = "Xx" + lines[4][1:]
    with pytest.raises(MoldenInputError, match=r"unknown element 'Xx' at atom 2 \(line 5\)"):
        _read_one(tmp_path, lines)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(MoldenInputError, match="no such file or folder"):
        list(read_qm9(tmp_path / "nope"))
    with pytest.raises(MoldenInputError, match="no dsgdb9nsd_"):
        list(read_qm9(tmp_path))


def test_corrupt_archive(tmp_path):
    archive = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    archive.write_bytes(b"BZh91AY&SY" + bytes(100))
    with pytest.raises(MoldenInputError, match="cannot read archive"):
        list(read_qm9(archive))


def test_garbled_csv_row(tmp_path):
    text = _csv_files()[0].open().read(4000).splitlines()[:2]
    text[1] = text[1].replace("-0.0126981359", "-0.01269x81359")
    (tmp_path / "qm9_part1.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(MoldenInputError, match=r"record gdb_1 \(line 2\): garbled record"):
        list(read_qm9(tmp_path / "qm9_part1.csv"))


def test_missing_qm9pack_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoldenInputError, match=r"pip install molden\[qm9\]"):
        list(read_qm9())


# --- bytes that are not UTF-8 (a broken download, another encoding) ------------------------------


def _with_bad_byte(text: str) -> bytes:
    """The file's bytes with a Latin-1 'é' (0xe9, not UTF-8) in the SMILES line."""
    lines = text.encode().split(b"\n")
    lines[-3] = lines[-3] + b"\xe9"
    return b"\n".join(lines)


def test_non_utf8_xyz_in_a_folder_is_one_error_naming_file_and_line(xyz_folder, tmp_path):
    text = (xyz_folder / "dsgdb9nsd_000001.xyz").read_text()
    (tmp_path / "dsgdb9nsd_000001.xyz").write_bytes(_with_bad_byte(text))
    n_lines = len(text.splitlines())
    match = rf"record dsgdb9nsd_000001\.xyz: not UTF-8 text: byte 0xe9 at line {n_lines - 1}"
    with pytest.raises(MoldenInputError, match=match):
        list(read_qm9(tmp_path))
    with pytest.raises(MoldenInputError, match=match):
        list(read_qm9(tmp_path / "dsgdb9nsd_000001.xyz"))


@pytest.mark.parametrize("mode", ["w:bz2", "w"])
def test_non_utf8_xyz_in_an_archive_is_one_error_naming_the_member(xyz_folder, tmp_path, mode):
    bad = tmp_path / "bad"
    bad.mkdir()
    files = sorted(xyz_folder.iterdir())[:3]
    for file in files:
        data = file.read_bytes()
        (bad / file.name).write_bytes(_with_bad_byte(data.decode()) if file == files[1] else data)
    archive = tmp_path / ("dsgdb9nsd.xyz.tar.bz2" if mode == "w:bz2" else "dsgdb9nsd.xyz.tar")
    with tarfile.open(archive, mode) as tar:
        for file in sorted(bad.iterdir()):
            tar.add(file, arcname=file.name)
    with pytest.raises(MoldenInputError, match=rf"record {files[1].name}: not UTF-8 text: byte 0xe9"):
        list(read_qm9(archive))


def test_non_utf8_qm9pack_csv_names_the_line(tmp_path):
    lines = _csv_files()[0].open().read(6000).splitlines()[:3]
    data = "\n".join(lines).encode() + b"\n"
    data = data.replace(lines[2].encode()[:20], lines[2].encode()[:10] + b"\xff" + lines[2].encode()[11:20])
    (tmp_path / "qm9_part1.csv").write_bytes(data)
    with pytest.raises(MoldenInputError, match=r"qm9_part1\.csv, record line 3: not UTF-8 text: byte 0xff at line 3, column 11"):
        list(read_qm9(tmp_path / "qm9_part1.csv"))


def test_non_utf8_xyz_through_the_cli_is_one_line(xyz_folder, tmp_path):
    from typer.testing import CliRunner

    from molden.cli.app import app

    folder = tmp_path / "dsgdb9nsd"
    folder.mkdir()
    (folder / "dsgdb9nsd_000001.xyz").write_bytes(_with_bad_byte((xyz_folder / "dsgdb9nsd_000001.xyz").read_text()))
    out = str(tmp_path / "x.h5")
    result = CliRunner().invoke(app, ["preprocess", "qm9", str(folder), "--out", out, "--val", "0", "--test", "0"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "UnicodeDecodeError" not in result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "dsgdb9nsd_000001.xyz" in message and "not UTF-8" in message
