"""Any file ASE can read (extxyz, traj, db, cif, POSCAR, ...), streamed with `ase.io.iread`.

Energies and forces come from the file's calculator results or the usual extxyz keys (eV, eV/Å),
tags and FixAtoms are kept (see `molden.data.ase_convert`). system_id is the file stem; frame is
the frame's index in the file (for a negative or unbounded-from-the-end `index`, the count of
frames read so far). Files written by `molden export` carry their own system id, frame, split,
targets and relaxed_* fields, which win.

A folder is read file by file, in natural name order ("2.xyz" before "10.xyz"), taking the
files whose format ASE recognises from their name or content; the others (and sub-folders) are
skipped and named in one logged warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import ase.db
from ase.io import iread
from ase.io.trajectory import Trajectory
from ase.io.formats import UnknownFileTypeError, filetype, string2index

from molden.data.ase_convert import structure_from_atoms
from molden.data.readers.element_symbols import SYMBOL_TO_NUMBER
from molden.data.readers.text_decoding import not_utf8
from molden.data.structure import Structure
from molden.errors import MoldenInputError


logger = logging.getLogger(__name__)


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


# Endings that ASE maps to a structure format but that in a data folder are almost always
# documents (CASTEP's .md); pass such a file by name to read it.
_DOCUMENT_SUFFIXES = {".md", ".txt", ".rst", ".csv", ".pdf", ".png"}


def ase_files_in(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """(files of `folder` ASE can read, in natural name order; everything else in it)."""
    readable, skipped = [], []
    for path in sorted(Path(folder).iterdir(), key=_natural_key):
        if path.suffix.lower() in _DOCUMENT_SUFFIXES:  # README.md is not a CASTEP .md file
            skipped.append(path)
            continue
        try:
            # guess=False: only formats named by the file's ending or recognised from its
            # content, so notes.txt or a .h5 cache are not taken for xyz.
            ok = path.is_file() and filetype(str(path), read=True, guess=False) is not None
        except (UnknownFileTypeError, OSError, ValueError):
            ok = False
        (readable if ok else skipped).append(path)
    return readable, skipped


def _folder_files(folder: Path) -> list[Path]:
    readable, skipped = ase_files_in(folder)
    if not readable:
        found = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        lacks = f"found only {found}" if skipped else "the folder is empty"
        raise MoldenInputError(folder, f"no file in this folder that ASE can read (extxyz, traj, db, cif, ...): {lacks}")
    if skipped:
        names = ", ".join(p.name for p in skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        logger.warning("note: %s: skipped %d entries that ASE cannot read: %s", folder, len(skipped), names)
    return readable


def _stem(path: Path) -> str:
    name = re.sub(r"\.(gz|bz2|xz)$", "", path.name)  # "frames.extxyz.gz" → "frames"
    return Path(name).stem


def _frame_numbers(index: str | int | slice) -> tuple[int, int]:
    """(first frame, step) when `index` names frames counted from the start, else (0, 1)."""
    if isinstance(index, str):
        index = string2index(index)
    if isinstance(index, int):
        return (index, 1) if index >= 0 else (0, 1)
    start, step = index.start or 0, index.step or 1
    return (start, step) if start >= 0 and step > 0 else (0, 1)


def _explain(error: Exception) -> str:
    # ASE reports an unknown symbol as a bare KeyError('Xx'); say what it means.
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        key = error.args[0]
        if re.fullmatch(r"[A-Za-z]{1,3}", key) and key not in SYMBOL_TO_NUMBER:
            return f"unknown element {key!r}"
    return f"{type(error).__name__}: {error}"


def read_ase(
    path: str | Path, *, limit: int | None = None, index: str | int | slice = ":", format: str | None = None
) -> Iterator[Structure]:
    """Stream the frames of an ASE-readable file as validated `Structure`s (Å, eV, eV/Å).

    `path` is a file or a folder of files (see the module docstring). `index` selects frames
    of each file as in `ase.io.iread` (":" all, "-1" last, "::10" every tenth); `format`
    overrides ASE's guess from the file name.
    """
    path = Path(path)
    if path.is_dir():
        files = _folder_files(path)
        if limit is not None and limit <= 0:
            return
        count = 0
        for file in files:
            for structure in _read_file(file, None if limit is None else limit - count, index, format):
                yield structure
                count += 1
            if limit is not None and count >= limit:
                return
        return
    if not path.is_file():
        raise MoldenInputError(path, "no such file or folder")
    if limit is not None and limit <= 0:
        return
    yield from _read_file(path, limit, index, format)


def _read_file(path: Path, limit: int | None, index: str | int | slice, format: str | None) -> Iterator[Structure]:
    stem = _stem(path)
    first, step = _frame_numbers(index)
    try:
        frames = iread(str(path), index=index, format=format)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except Exception as error:  # e.g. an unknown format is raised before the first frame
        raise MoldenInputError(path, f"cannot read: {_explain(error)}") from None
    count = 0
    while limit is None or count < limit:
        frame = first + count * step
        try:
            atoms = next(frames)
        except StopIteration:
            break
        except UnicodeDecodeError:
            # Text is decoded in buffers ahead of the frame being parsed: name the line instead.
            raise not_utf8(path) from None
        except Exception as error:  # truncated or garbled: ASE's message, our record
            raise MoldenInputError(path, f"cannot read frame ({count} read so far): {_explain(error)}", frame) from None
        structure = structure_from_atoms(atoms, system_id=stem, frame=frame)
        structure.validate(path, frame)
        yield structure
        count += 1


def count_ase(path: str | Path) -> int | None:
    """Frames in an ASE trajectory or database (or a folder of them), read from their index;
    None for other formats."""
    path = Path(path)
    if path.is_dir():
        try:
            counts = [count_ase(file) for file in ase_files_in(path)[0]]
        except OSError:
            return None
        return None if not counts or None in counts else sum(counts)
    try:
        if path.suffix == ".traj":
            with Trajectory(str(path)) as traj:
                return len(traj)
        if path.suffix == ".db":
            return ase.db.connect(str(path)).count()
    except Exception:  # a progress bar can do without a count
        return None
    return None
