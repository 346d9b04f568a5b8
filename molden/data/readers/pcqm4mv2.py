"""PCQM4Mv2 (OGB-LSC, Hu et al. 2021): DFT HOMO-LUMO gaps of 3.7 M molecules.

Reads the SDF `pcqm4m-v2-train.sdf` (or `.sdf.gz`): V2000 molblocks as RDKit writes them,
separated by `$$$$`, parsed line by line without RDKit, one molecule in memory at a time.
Only positions (Å) and elements are kept; bonds and charges are skipped.

What the data holds, and what molden does not make up:
- The SDF has 3D structures for the training split only (3,378,606 molecules); validation and
  test molecules exist only as SMILES in `data.csv.gz`, and molden does not embed them.
- The SDF omits hydrogens; molden does not add them, so structures are heavy-atom only.

The gap target (eV) is not in the SDF: pass `targets_csv`, OGB's `data.csv.gz` with columns
`idx,smiles,homolumogap`, whose rows match SDF records by order (checked against `idx`).
Numeric SDF data fields (`> <name>`) also go into `targets` under their own names.
system_id is the record index ("0", "1", ...), matching OGB's `idx`.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from molden.data.readers.element_symbols import numbers_from_symbols
from molden.data.readers.text_decoding import not_utf8
from molden.data.structure import Structure
from molden.errors import MoldenInputError

N_PCQM4MV2_TRAIN_3D = 3_378_606


def _open_text(path: Path) -> TextIO:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def parse_molblock(lines: list[str], where: str | Path, record: int, first_line: int) -> Structure:
    """One V2000 molblock (header, counts, atoms, bonds, `M  END`, data fields) as a `Structure`.

    `first_line` is the 1-based file line of `lines[0]`, for error messages.
    """

    def fail(message: str, offset: int) -> MoldenInputError:
        return MoldenInputError(where, f"{message} (line {first_line + offset})", record)

    if len(lines) < 4:
        raise fail("truncated record: no counts line", len(lines))
    counts = lines[3]
    if "V3000" in counts:
        raise fail("V3000 molblocks are not supported, only V2000", 3)
    try:
        n_atoms, n_bonds = int(counts[0:3]), int(counts[3:6])
    except ValueError:
        raise fail(f"garbled counts line {counts!r}", 3) from None
    end = 4 + n_atoms + n_bonds
    if len(lines) <= end:
        raise fail(f"truncated record: {n_atoms} atoms and {n_bonds} bonds need {end + 1} lines", len(lines))
    positions = np.empty((n_atoms, 3))
    symbols = []
    for i in range(n_atoms):
        line = lines[4 + i]
        # V2000 atom line: x, y, z as %10.4f, a space, then the symbol in columns 32-34.
        try:
            positions[i] = (float(line[0:10]), float(line[10:20]), float(line[20:30]))
        except ValueError:
            raise fail(f"garbled coordinate in atom line {line!r}", 4 + i) from None
        symbol = line[31:34].strip()
        if not symbol:
            raise fail(f"atom line has no element symbol: {line!r}", 4 + i)
        symbols.append(symbol)
    numbers = numbers_from_symbols(symbols, where, record, first_line + 4)
    m_end = next((i for i in range(end, len(lines)) if lines[i].startswith("M  END")), None)
    if m_end is None:
        raise fail("truncated record: no 'M  END' line", len(lines))
    targets = _data_fields(lines[m_end + 1 :])
    structure = Structure(numbers=numbers, positions=positions, targets=targets, system_id=str(record))
    structure.validate(where, record)
    return structure


def _data_fields(lines: list[str]) -> dict[str, float]:
    """Numeric `> <name>` fields after `M  END`; text fields (SMILES ...) are skipped."""
    targets: dict[str, float] = {}
    for i, line in enumerate(lines[:-1]):
        start = line.find("<")
        stop = line.find(">", start + 1)
        if line.startswith(">") and 0 < start < stop - 1:
            try:
                targets[line[start + 1 : stop]] = float(lines[i + 1])
            except ValueError:
                pass
    return targets


def _molblocks(path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """(record index, first line number, lines) for each `$$$$`-terminated record."""
    try:
        yield from _molblock_lines(path)
    except UnicodeDecodeError:
        raise not_utf8(path, lambda line, records: records, count_prefix=b"$$$$") from None


def _molblock_lines(path: Path) -> Iterator[tuple[int, int, list[str]]]:
    with _open_text(path) as handle:
        lines: list[str] = []
        first = 1
        record = 0
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.startswith("$$$$"):
                yield record, first, lines
                record, lines, first = record + 1, [], number + 1
            else:
                lines.append(line)
        if any(line.strip() for line in lines):
            last = first + len(lines) - 1
            raise MoldenInputError(path, f"truncated record: file ends without '$$$$' (line {last})", record)


def _gap_rows(targets_csv: Path) -> Iterator[tuple[int, str, int]]:
    """(idx, homolumogap text, line number) from OGB's data.csv(.gz)."""
    if not targets_csv.is_file():
        raise MoldenInputError(targets_csv, "no such targets file")
    try:
        yield from _gap_csv_rows(targets_csv)
    except UnicodeDecodeError:
        raise not_utf8(targets_csv) from None


def _gap_csv_rows(targets_csv: Path) -> Iterator[tuple[int, str, int]]:
    with _open_text(targets_csv) as handle:
        rows = csv.reader(handle)
        header = next(rows, [])
        for key in ("idx", "homolumogap"):
            if key not in header:
                raise MoldenInputError(targets_csv, f"missing column {key!r}", "header")
        i_idx, i_gap = header.index("idx"), header.index("homolumogap")
        for row in rows:
            try:
                yield int(row[i_idx]), row[i_gap].strip(), rows.line_num
            except (ValueError, IndexError):
                raise MoldenInputError(targets_csv, f"garbled row {row!r}", f"line {rows.line_num}") from None


def read_pcqm4mv2(
    path: str | Path, *, limit: int | None = None, targets_csv: str | Path | None = None
) -> Iterator[Structure]:
    """Stream heavy-atom PCQM4Mv2 molecules (Å) with `targets["homolumogap"]` (eV) if given."""
    path = Path(path)
    if not path.is_file():
        raise MoldenInputError(path, "no such file")
    if limit is not None and limit <= 0:
        return
    gaps = _gap_rows(Path(targets_csv)) if targets_csv is not None else None
    for record, first, lines in _molblocks(path):
        structure = parse_molblock(lines, path, record, first)
        if gaps is not None:
            row = next(gaps, None)
            if row is None:
                raise MoldenInputError(targets_csv, "has fewer rows than the SDF has records", record)
            idx, gap, line = row
            if idx != record:
                raise MoldenInputError(targets_csv, f"idx {idx} does not match SDF record {record}", f"line {line}")
            if gap:  # empty for the hidden test splits, which have no 3D anyway
                try:
                    structure.targets["homolumogap"] = float(gap)
                except ValueError:
                    raise MoldenInputError(targets_csv, f"garbled homolumogap {gap!r}", f"line {line}") from None
        yield structure
        if limit is not None and record + 1 >= limit:
            return


def count_pcqm4mv2(path: str | Path) -> int | None:
    """Records in an uncompressed SDF (a byte scan for `$$$$`, ~1 s/GB); None for `.gz`."""
    path = Path(path)
    if not path.is_file() or path.suffix == ".gz":
        return None
    total, carry = 0, b"\n"  # the file's first line may be a terminator too
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            data = carry + chunk
            total += data.count(b"\n$$$$")
            carry = data[-4:]  # a terminator split across chunks is counted once, in the next chunk
    return total
