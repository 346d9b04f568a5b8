"""Names, dtypes and units of the HDF5 graph cache; docs/FORMAT.md is the prose version.

Everything the writer and the reader agree on lives here, so a schema change is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "molden-graph-cache"
SCHEMA_VERSION = 1

# Per-structure arrays (length S). Offsets have S + 1 entries.
ATOM_OFFSETS = "structures/atom_offsets"
EDGE_OFFSETS = "structures/edge_offsets"
CELL = "structures/cell"
PBC = "structures/pbc"
SYSTEM_ID = "structures/system_id"
FRAME = "structures/frame"
SPLIT_CODE = "structures/split"
ENERGY = "structures/energy"
RELAXED_ENERGY = "structures/relaxed_energy"
TARGETS = "structures/targets"
CONVERGED = "structures/converged"

# Per-atom arrays (length N, concatenated over structures).
NUMBERS = "atoms/numbers"
POSITIONS = "atoms/positions"
FIXED = "atoms/fixed"
TAGS = "atoms/tags"
FORCES = "atoms/forces"
RELAXED_POSITIONS = "atoms/relaxed_positions"

# Per-edge arrays (length E, concatenated). Atom indices are local to their structure.
EDGE_INDEX = "edges/index"
UNIT_SHIFTS = "edges/unit_shifts"

STATS = "stats"
SPLITS = "splits"

UNASSIGNED_SPLIT = -1

UNITS = {
    "positions": "Å",
    "cell": "Å",
    "relaxed_positions": "Å",
    "energy": "eV",
    "relaxed_energy": "eV",
    "forces": "eV/Å",
    "cutoff": "Å",
}


@dataclass(frozen=True)
class Column:
    """One array of the cache: its HDF5 path, dtype, trailing shape and chunk length."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...] = ()
    chunk_rows: int = 16384


STRUCTURE_CHUNK = 1024
ATOM_CHUNK = 8192
EDGE_CHUNK = 32768

# Always present.
REQUIRED = (
    Column(CELL, np.dtype(np.float64), (3, 3), STRUCTURE_CHUNK),
    Column(PBC, np.dtype(bool), (3,), STRUCTURE_CHUNK),
    Column(FRAME, np.dtype(np.int32), (), STRUCTURE_CHUNK),
    Column(SPLIT_CODE, np.dtype(np.int8), (), STRUCTURE_CHUNK),
    Column(NUMBERS, np.dtype(np.uint8), (), ATOM_CHUNK),
    Column(POSITIONS, np.dtype(np.float64), (3,), ATOM_CHUNK),
    Column(FIXED, np.dtype(bool), (), ATOM_CHUNK),
    Column(EDGE_INDEX, np.dtype(np.int32), (2,), EDGE_CHUNK),
    Column(UNIT_SHIFTS, np.dtype(np.int16), (3,), EDGE_CHUNK),
)

# Present when the first structure written has them; then every structure must.
OPTIONAL = {
    "energy": Column(ENERGY, np.dtype(np.float64), (), STRUCTURE_CHUNK),
    "relaxed_energy": Column(RELAXED_ENERGY, np.dtype(np.float64), (), STRUCTURE_CHUNK),
    "tags": Column(TAGS, np.dtype(np.int8), (), ATOM_CHUNK),
    "forces": Column(FORCES, np.dtype(np.float64), (3,), ATOM_CHUNK),
    "relaxed_positions": Column(RELAXED_POSITIONS, np.dtype(np.float64), (3,), ATOM_CHUNK),
    # A flag of the system's relaxation (EMT: reached fmax), not a target: no mean or std.
    "converged": Column(CONVERGED, np.dtype(bool), (), STRUCTURE_CHUNK),
}

PER_STRUCTURE = {"energy", "relaxed_energy", "converged"}
