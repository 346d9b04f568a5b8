"""Element symbol → atomic number for the text readers (QM9 xyz/CSV, SDF).

ASE's table also maps the ghost symbol "X" to 0; readers treat that as unknown, since
`Structure` needs a real element for every atom.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from molden.errors import MoldenInputError

SYMBOL_TO_NUMBER: dict[str, int] = {s: z for s, z in atomic_numbers.items() if z > 0}


def numbers_from_symbols(
    symbols: Sequence[str], where: str | Path, record: str | int | None, first_line: int | None = None
) -> np.ndarray:
    """[N] int64 atomic numbers, or `MoldenInputError` "unknown element 'Xx' at atom i".

    `first_line`: the file line of atom 0, when atoms are one per line, to name the bad line.
    """
    try:
        return np.array([SYMBOL_TO_NUMBER[s] for s in symbols], dtype=np.int64)
    except KeyError:
        i = next(i for i, s in enumerate(symbols) if s not in SYMBOL_TO_NUMBER)
        line = "" if first_line is None else f" (line {first_line + i})"
        raise MoldenInputError(where, f"unknown element {symbols[i]!r} at atom {i}{line}", record) from None
