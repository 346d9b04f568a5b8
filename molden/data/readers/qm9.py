"""QM9 (Ramakrishnan et al. 2014): 130,831 small organic molecules with 12 DFT properties.

Two sources give the same records:
- the `qm9pack` package's CSV files (`pip install molden[qm9]`), read without importing
  `qm9pack` (its import needs `pkg_resources`);
- the original `dsgdb9nsd_*.xyz` files, as a folder or a `.tar`/`.tar.gz`/`.tar.bz2` archive.

Targets stay in their source units (table `QM9_TARGETS`); conversion to eV/meV happens once,
in `molden.objectives.units`. `Structure.energy` stays None: U0 is a target, not a force-field energy.
Every record has system_id "gdb_<index>" (the GDB9 index, 1..133,885 with gaps where the
3,054 uncharacterised molecules were removed) and frame 0.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from molden.data.readers.element_symbols import numbers_from_symbols
from molden.data.readers.text_decoding import decode_utf8, not_utf8
from molden.data.structure import Structure
from molden.errors import MoldenInputError

QM9_PACK_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
XYZ_NAME = re.compile(r"dsgdb9nsd_\d+\.xyz$")


class QM9Target(NamedTuple):
    """Where one QM9 property lives in each source, and its unit."""

    unit: str
    csv_column: str  # column in qm9pack's CSV files
    xyz_field: int  # whitespace-separated field on line 2 of a dsgdb9nsd xyz ("gdb" is 0)


# The 12 standard targets (Ramakrishnan et al. 2014, Table 2), in source units.
QM9_TARGETS: dict[str, QM9Target] = {
    "mu": QM9Target("D", "Dipole_debye", 5),  # dipole moment
    "alpha": QM9Target("bohr^3", "Polarizability_bohr3", 6),  # isotropic polarisability
    "homo": QM9Target("Ha", "HOMO_au", 7),
    "lumo": QM9Target("Ha", "LUMO_au", 8),
    "gap": QM9Target("Ha", "HOMO_LUMO_gap_au", 9),
    "r2": QM9Target("bohr^2", "R2_bohr2", 10),  # electronic spatial extent
    "zpve": QM9Target("Ha", "ZPVE_au", 11),  # zero-point vibrational energy
    "U0": QM9Target("Ha", "InternalEnergy_0K_au", 12),
    "U": QM9Target("Ha", "InternalEnergy_298K_au", 13),
    "H": QM9Target("Ha", "Enthalphy_298K_au", 14),  # (sic) qm9pack's spelling
    "G": QM9Target("Ha", "GibbsFreeEnergy_298K_au", 15),
    "Cv": QM9Target("cal/(mol K)", "Heatcapacity_Cv_cal_mol_K", 16),  # heat capacity, 298 K
}
N_QM9 = 130_831


def _qm9pack_files(where: str) -> list[Path]:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or spec.origin is None:
        raise MoldenInputError(
            where, "qm9pack is not installed: `pip install molden[qm9]`, or give the dsgdb9nsd folder or archive"
        )
    files = [Path(spec.origin).parent / "data" / name for name in QM9_PACK_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MoldenInputError(where, f"qm9pack is installed but its data file is missing: {missing[0]}")
    return files


def _gdb_float(text: str) -> float:
    # GDB9 files were written by Mathematica: "1.2*^-5" means 1.2e-5.
    return float(text.replace("*^", "e"))


def _read_qm9pack_csv(path: Path) -> Iterator[Structure]:
    try:
        yield from _read_qm9pack_rows(path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _read_qm9pack_rows(path: Path) -> Iterator[Structure]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None:
            raise MoldenInputError(path, "empty file, expected a qm9pack CSV header")
        column = {name: i for i, name in enumerate(header)}
        needed = ["Index", "Elements", "XYZ_Ang"] + [t.csv_column for t in QM9_TARGETS.values()]
        for name in needed:
            if name not in column:
                raise MoldenInputError(path, f"missing column {name!r}", "header")
        i_index, i_el, i_xyz = column["Index"], column["Elements"], column["XYZ_Ang"]
        i_targets = [(name, column[t.csv_column]) for name, t in QM9_TARGETS.items()]
        for row in rows:
            record = f"line {rows.line_num}"
            try:
                record = f"gdb_{int(row[i_index])} (line {rows.line_num})"
                # "['C','H']" and "[[x,y,z],...]": plain splitting is ~10x faster than literal_eval.
                symbols = row[i_el].strip("[]").replace("'", "").replace(" ", "").split(",")
                numbers = numbers_from_symbols(symbols, path, record)
                xyz = row[i_xyz].replace("[", "").replace("]", "").split(",")
                positions = np.array(xyz, dtype=np.float64).reshape(len(numbers), 3)
                targets = {name: float(row[i]) for name, i in i_targets}
            except (ValueError, IndexError) as error:
                raise MoldenInputError(path, f"garbled record: {error}", record) from None
            structure = Structure(
                numbers=numbers, positions=positions, targets=targets, system_id=f"gdb_{int(row[i_index])}"
            )
            structure.validate(path, record)
            yield structure


def parse_gdb9_xyz(text: str, where: str | Path, name: str) -> Structure:
    """One molecule from the text of an original `dsgdb9nsd_NNNNNN.xyz` file.

    Layout: atom count; "gdb idx A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv"; one
    "El x y z mulliken_charge" line per atom (Å, e); frequencies (cm⁻¹); SMILES; InChI.
    """
    lines = text.splitlines()

    def fail(message: str, line: int) -> MoldenInputError:
        return MoldenInputError(where, f"{message} (line {line})", name)

    try:
        n_atoms = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise fail(f"first line must be the atom count, got {lines[0] if lines else ''!r}", 1) from None
    if len(lines) < n_atoms + 5:
        raise fail(f"truncated record: {n_atoms} atoms need {n_atoms + 5} lines, found {len(lines)}", len(lines))
    fields = lines[1].split()
    if len(fields) < 17 or fields[0] != "gdb":
        raise fail(f"property line must read 'gdb idx A B C mu ... Cv' (17 fields), got {len(fields)} fields", 2)
    try:
        index = int(fields[1])
        targets = {name: _gdb_float(fields[t.xyz_field]) for name, t in QM9_TARGETS.items()}
    except ValueError as error:
        raise fail(f"garbled property: {error}", 2) from None
    symbols, positions = [], np.empty((n_atoms, 3))
    for i in range(n_atoms):
        atom = lines[2 + i].split()
        if len(atom) < 4:
            raise fail(f"atom line needs 'El x y z charge', got {lines[2 + i]!r}", 3 + i)
        symbols.append(atom[0])
        try:
            positions[i] = [_gdb_float(v) for v in atom[1:4]]
        except ValueError as error:
            raise fail(f"garbled coordinate: {error}", 3 + i) from None
    numbers = numbers_from_symbols(symbols, where, name, first_line=3)
    structure = Structure(numbers=numbers, positions=positions, targets=targets, system_id=f"gdb_{index}")
    structure.validate(where, name)
    return structure


def _read_xyz_folder(folder: Path) -> Iterator[Structure]:
    files = sorted(p for p in folder.iterdir() if XYZ_NAME.match(p.name))  # zero-padded: index order
    if not files:
        raise MoldenInputError(folder, "no dsgdb9nsd_*.xyz files in this folder")
    for file in files:
        yield parse_gdb9_xyz(decode_utf8(file.read_bytes(), folder, file.name), folder, file.name)


def _read_xyz_archive(archive: Path) -> Iterator[Structure]:
    # Stream mode ("r|*") decompresses once, front to back: members come in archive order.
    try:
        with tarfile.open(archive, "r|*") as tar:
            found = False
            for member in tar:
                if not (member.isfile() and XYZ_NAME.search(member.name)):
                    continue
                found = True
                handle = tar.extractfile(member)
                name = Path(member.name).name
                text = decode_utf8(handle.read(), archive, name) if handle is not None else ""
                yield parse_gdb9_xyz(text, archive, name)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise MoldenInputError(archive, f"cannot read archive: {error}") from None
    if not found:
        raise MoldenInputError(archive, "no dsgdb9nsd_*.xyz files in this archive")


def read_qm9(path: str | Path | None = None, *, limit: int | None = None) -> Iterator[Structure]:
    """Stream QM9 molecules (positions Å, targets in `QM9_TARGETS` units).

    Order: GDB9 index order for qm9pack and folders, member order for archives.

    `path`: None for qm9pack's data, a folder of `dsgdb9nsd_*.xyz` files, or a tar archive of them.
    `limit`: stop after this many molecules.
    """
    if limit is not None and limit <= 0:
        return
    if path is None:
        source: Iterator[Structure] = (s for f in _qm9pack_files("qm9pack") for s in _read_qm9pack_csv(f))
    else:
        path = Path(path)
        if path.is_dir():
            source = _read_xyz_folder(path)
        elif path.is_file() and ".tar" in "".join(path.suffixes[-2:]):
            source = _read_xyz_archive(path)
        elif path.is_file() and XYZ_NAME.match(path.name):
            source = iter([parse_gdb9_xyz(decode_utf8(path.read_bytes(), path, path.name), path, path.name)])
        elif path.is_file() and path.suffix == ".csv":
            source = _read_qm9pack_csv(path)
        elif not path.exists():
            raise MoldenInputError(path, "no such file or folder")
        else:
            expected = "a dsgdb9nsd folder, a .tar/.tar.gz/.tar.bz2 archive or a qm9pack CSV"
            raise MoldenInputError(path, f"expected {expected}")
    for count, structure in enumerate(source, start=1):
        yield structure
        if limit is not None and count >= limit:
            return


def count_qm9(path: str | Path | None = None) -> int | None:
    """Number of molecules `read_qm9(path)` yields, or None where only a full read would tell."""
    if path is None:
        return N_QM9 if importlib.util.find_spec("qm9pack") is not None else None
    path = Path(path)
    if path.is_dir():
        return sum(1 for p in path.iterdir() if XYZ_NAME.match(p.name))
    if path.is_file() and XYZ_NAME.match(path.name):
        return 1
    return None  # an archive would have to be decompressed to list it
