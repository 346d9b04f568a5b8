"""One typed record for one atomic system, as every reader produces and the cache stores.

Arrays are numpy (readers and the HDF5 cache live on the CPU); `molden.data.batch` turns a
list of records into one `Batch` of torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from molden.errors import MoldenInputError

MAX_ATOMIC_NUMBER = 118

# OC20's convention (Chanussot et al. 2021): 0 = sub-surface slab atom, 1 = surface slab atom,
# 2 = adsorbate atom. Molecules have no tags.
TAG_SUBSURFACE, TAG_SURFACE, TAG_ADSORBATE = 0, 1, 2


@dataclass(frozen=True)
class Structure:
    """An atomic system and what is known about it.

    Attributes:
        numbers: [N] int64 atomic numbers.
        positions: [N, 3] float64 Cartesian positions, Å. Unwrapped positions are allowed.
        cell: [3, 3] float64 lattice vectors as rows, Å; zeros where there is no cell.
        pbc: [3] bool, periodicity along each lattice vector.
        tags: [N] int8 OC20 tags (0 sub-surface, 1 surface, 2 adsorbate), or None.
        fixed: [N] bool, True for atoms held fixed during relaxation (ASE FixAtoms).
        energy: total energy, eV, or None.
        forces: [N, 3] float64 forces, eV/Å, or None.
        system_id: identifier of the system (OC20 sid, QM9 index, file name + frame ...).
        frame: index of this frame in its trajectory (0 for single structures).
        relaxed_positions: [N, 3] relaxed positions, Å, for IS2RS pairs, or None.
        relaxed_energy: relaxed energy, eV, for IS2RE pairs, or None.
        converged: whether the system's relaxation reached its force threshold (EMT: the
            last frame's max force on free atoms <= fmax), the same on every frame of the
            system; None when unknown. A flag, not a target.
        targets: graph-level scalar targets by name (QM9 properties, in the units that
            `molden.data.readers` documents per source), or empty.
        split: name of the split this record belongs to when the source defines one
            ("train", "val_id", "test_ood", ...), or None to let the cache assign one.
        edge_index: [2, E] int64 edges (i, j) of the clean structure, or None before
            the graph is built.
        unit_shifts: [E, 3] int32 integer lattice offsets of each edge, such that
            `positions[j] + unit_shifts @ cell - positions[i]` is the edge vector.
        cache_index: position of this structure in the cache it was read from (so
            predictions map back to records), or None when it did not come from a cache.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    tags: np.ndarray | None = None
    fixed: np.ndarray | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    system_id: str = ""
    frame: int = 0
    relaxed_positions: np.ndarray | None = None
    relaxed_energy: float | None = None
    converged: bool | None = None
    targets: dict[str, float] = field(default_factory=dict)
    split: str | None = None
    edge_index: np.ndarray | None = None
    unit_shifts: np.ndarray | None = None
    cache_index: int | None = None

    def __post_init__(self) -> None:
        # Normalise dtypes once here so that readers, the cache and collation agree.
        set_ = object.__setattr__
        set_(self, "numbers", np.asarray(self.numbers, dtype=np.int64).reshape(-1))
        n = len(self.numbers)
        set_(self, "positions", np.asarray(self.positions, dtype=np.float64).reshape(n, 3))
        set_(self, "cell", np.asarray(self.cell, dtype=np.float64).reshape(3, 3))
        set_(self, "pbc", np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy())
        fixed = np.zeros(n, dtype=bool) if self.fixed is None else self.fixed
        set_(self, "fixed", np.asarray(fixed, dtype=bool).reshape(n))
        if self.tags is not None:
            set_(self, "tags", np.asarray(self.tags, dtype=np.int8).reshape(n))
        if self.forces is not None:
            set_(self, "forces", np.asarray(self.forces, dtype=np.float64).reshape(n, 3))
        if self.relaxed_positions is not None:
            rp = np.asarray(self.relaxed_positions, dtype=np.float64).reshape(n, 3)
            set_(self, "relaxed_positions", rp)
        for name in ("energy", "relaxed_energy"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, float(value))
        if self.converged is not None:
            set_(self, "converged", bool(self.converged))
        if self.edge_index is not None:
            set_(self, "edge_index", np.asarray(self.edge_index, dtype=np.int64).reshape(2, -1))
        if self.unit_shifts is not None:
            set_(self, "unit_shifts", np.asarray(self.unit_shifts, dtype=np.int32).reshape(-1, 3))

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def n_edges(self) -> int:
        return 0 if self.edge_index is None else self.edge_index.shape[1]

    def with_graph(self, edge_index: np.ndarray, unit_shifts: np.ndarray) -> Structure:
        """A copy carrying the clean-structure graph."""
        return replace(self, edge_index=edge_index, unit_shifts=unit_shifts)

    def validate(self, where: str | Path | None = None, record: str | int | None = None) -> None:
        """Raise `MoldenInputError` naming `where` and `record` if this system is unusable."""

        def fail(message: str) -> None:
            raise MoldenInputError(where, message, record if record is not None else self.system_id or None)

        n = self.n_atoms
        if n == 0:
            fail("structure has no atoms")
        bad = (self.numbers < 1) | (self.numbers > MAX_ATOMIC_NUMBER)
        if bad.any():
            fail(f"unknown element: atomic number {int(self.numbers[bad][0])} at atom {int(np.argmax(bad))}")
        for name in ("positions", "forces", "relaxed_positions"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                atom = int(np.argmax(~np.isfinite(value).all(axis=1)))
                fail(f"non-finite {name} (NaN or inf) at atom {atom}")
        if not np.isfinite(self.cell).all():
            fail("non-finite cell")
        for name in ("energy", "relaxed_energy"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value):
                fail(f"non-finite {name}")
        if self.pbc.any():
            periodic = self.cell[self.pbc]
            # The periodic lattice vectors must span a non-degenerate lattice.
            if np.linalg.matrix_rank(periodic, tol=1e-6) < len(periodic) or (np.linalg.norm(periodic, axis=1) < 1e-6).any():
                fail(f"periodic along axes {np.flatnonzero(self.pbc).tolist()} but the cell is zero or degenerate there")
