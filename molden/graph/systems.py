"""The systems of a batched neighbour-list call, as a few small numpy arrays.

Cells, periodicity and atom ranges are a few numbers per system: they are checked and
broadcast once in numpy, whatever the device, because per-call torch overhead cost more than
vesin's whole search on OC20-sized slabs (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from molden.errors import MoldenInputError
from molden.graph.periodic import check_periodic_cells


_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


@dataclass(frozen=True)
class SystemLayout:
    """Per system of a batch: atom range, cell (Å, rows) and periodicity.

    offsets: [B + 1] int64, system b holds atoms offsets[b]:offsets[b + 1].
    cells: [B, 3, 3] in the positions' float dtype (the user's cells, not completed).
    pbc: [B, 3] bool.
    """

    offsets: np.ndarray
    cells: np.ndarray
    pbc: np.ndarray

    @property
    def n_systems(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def system_layout(
    positions: torch.Tensor, cell: torch.Tensor | None, pbc: torch.Tensor | None, batch: torch.Tensor | None
) -> SystemLayout:
    """Check and broadcast the inputs of `neighbor_list`; raise `MoldenInputError` if wrong."""
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise MoldenInputError("radius_graph", f"positions must be [N, 3], got {tuple(positions.shape)}")
    n_atoms = positions.shape[0]
    if batch is None:
        offsets = np.array([0, n_atoms], dtype=np.int64)
    else:
        system = batch.detach().cpu().numpy()
        if len(system) != n_atoms:
            raise MoldenInputError("radius_graph", f"batch has {len(system)} entries for {n_atoms} atoms")
        if len(system) > 1 and (system[1:] < system[:-1]).any():
            raise MoldenInputError("radius_graph", "batch must be sorted (atoms of a system contiguous)")
        if len(system) and system[0] < 0:
            raise MoldenInputError("radius_graph", "batch indices must be non-negative")
        n_systems = int(system[-1]) + 1 if len(system) else 1
        offsets = np.searchsorted(system, np.arange(n_systems + 1)).astype(np.int64)
    n_systems = len(offsets) - 1
    dtype = _NUMPY_FLOATS.get(positions.dtype, np.float32)
    if cell is None:
        cells = np.zeros((n_systems, 3, 3), dtype=dtype)
    else:
        cells = np.asarray(cell.detach().cpu().numpy() if isinstance(cell, torch.Tensor) else cell, dtype=dtype)
        if cells.shape == (3, 3):
            cells = np.repeat(cells[None], n_systems, axis=0)
        if cells.shape != (n_systems, 3, 3):
            raise MoldenInputError("radius_graph", f"{cells.shape[0]} cells for {n_systems} systems")
    if pbc is None:
        flags = np.zeros((n_systems, 3), dtype=bool)
    else:
        flags = np.asarray(pbc.detach().cpu().numpy() if isinstance(pbc, torch.Tensor) else pbc, dtype=bool)
        flags = np.repeat(flags[None], n_systems, axis=0) if flags.shape == (3,) else flags
        if flags.shape != (n_systems, 3):
            raise MoldenInputError("radius_graph", f"pbc of shape {flags.shape} for {n_systems} systems")
    check_periodic_cells(cells, flags)
    return SystemLayout(offsets, cells, flags)
