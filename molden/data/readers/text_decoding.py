"""UTF-8 decoding that fails as one `MoldenInputError` naming file, record and line.

Text sources (QM9 xyz, SDF, CSV, OC20 metadata) are decoded strictly: a stray byte from a
broken download or another encoding must not become a 45-line `UnicodeDecodeError`.
Streamed files keep Python's fast text mode; only after a failure is the file re-read as bytes
(`first_bad_line`) to say exactly where.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
from pathlib import Path
from typing import BinaryIO

from molden.errors import MoldenInputError


def _describe(data: bytes, error: UnicodeDecodeError) -> tuple[int, str]:
    """(1-based line of the bad byte in `data`, "byte 0x.. at line L, column C")."""
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return line, f"not UTF-8 text: byte 0x{data[error.start]:02x} at line {line}, column {column}"


def decode_utf8(data: bytes, where: str | Path, record: str | int | None = None) -> str:
    """`data` as text, or `MoldenInputError(where, "not UTF-8 text: byte 0x.. at line L ...", record)`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MoldenInputError(where, _describe(data, error)[1], record) from None


def open_binary(path: Path) -> BinaryIO:
    """`path` as bytes, decompressing .gz, .bz2 and .xz."""
    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    return openers.get(path.suffix, open)(path, "rb")


def first_bad_line(path: Path, count_prefix: bytes | None = None) -> tuple[int, str, int]:
    """Where `path` stops being UTF-8: (line number, description, lines before it that start
    with `count_prefix`, e.g. b"$$$$" to count SDF records). Reads the file once, as bytes."""
    counted = 0
    with open_binary(path) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                _, description = _describe(line, error)
                return number, description.replace("line 1,", f"line {number},"), counted
            if count_prefix is not None and line.startswith(count_prefix):
                counted += 1
    return 0, "not UTF-8 text", counted  # a multi-byte character split across lines: rare


def not_utf8(path: Path, record_of=lambda line, counted: f"line {line}", count_prefix: bytes | None = None) -> MoldenInputError:
    """The error for a text file that failed to decode: `record_of(line, counted)` names the record."""
    line, description, counted = first_bad_line(path, count_prefix)
    return MoldenInputError(path, description, record_of(line, counted))
