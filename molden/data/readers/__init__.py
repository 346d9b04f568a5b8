"""Readers: one streaming generator per source, each yielding validated `Structure`s.

Every reader is `read_<source>(path, *, limit=None, ...) -> Iterator[Structure]` and raises
`MoldenInputError` naming the file and record for bad input; `count_<source>(path)` gives the
number of records cheaply where it can (None where only a full read would tell).
Units per source: QM9 targets in `qm9.QM9_TARGETS`; everything else Å, eV, eV/Å.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from molden.data.readers.ase_files import count_ase, read_ase
from molden.data.readers.oc20 import count_oc20, read_oc20, read_reference_energies
from molden.data.readers.pcqm4mv2 import count_pcqm4mv2, read_pcqm4mv2
from molden.data.readers.qm9 import QM9_TARGETS, count_qm9, read_qm9
from molden.data.structure import Structure


# Source name → reader, as the CLI's `--source` names them.
READERS: dict[str, Callable[..., Iterator[Structure]]] = {
    "qm9": read_qm9,
    "oc20": read_oc20,
    "pcqm4mv2": read_pcqm4mv2,
    "ase": read_ase,
}
# Source name → cheap record count for progress bars (None where unknown).
COUNTERS: dict[str, Callable[..., int | None]] = {
    "qm9": count_qm9,
    "oc20": count_oc20,
    "pcqm4mv2": count_pcqm4mv2,
    "ase": count_ase,
}

__all__ = [
    "QM9_TARGETS",
    "COUNTERS",
    "READERS",
    "count_ase",
    "count_oc20",
    "count_pcqm4mv2",
    "count_qm9",
    "read_ase",
    "read_oc20",
    "read_reference_energies",
    "read_pcqm4mv2",
    "read_qm9",
]
