"""The systems of a batched neighbour-list call, as a few small numpy arrays.

Cells, periodicity and atom ranges are a few numbers per system: they are checked and
broadcast once in numpy, whatever the device, because per-call torch overhead cost more than
vesin's whole search on OC20-sized slabs (BENCHMARKS.md). For device tensors they come to the
host in one copy of those few numbers per call (no per-atom array, no scalar read): `n_node`
gives the atom ranges directly; without it `batch` is searched on the device, which takes a
second small copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from molden.errors import MoldenInputError
from molden.graph.periodic import check_periodic_cells


_NUMPY_FLOATS = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}
_last_layout: tuple | None = None


@dataclass(frozen=True)
class SystemLayout:
    """Per system of a batch: atom range, cell (Å, rows) and periodicity.

    offsets: [B + 1] int64, system b holds atoms offsets[b]:offsets[b + 1].
    cells: [B, 3, 3] in the positions' float dtype (the user's cells, not completed).
    pbc: [B, 3] bool.
    position_bound: largest |coordinate| of any atom, Å (sizes the rounding band).
    boxes: [B, 3, 3] float64 cells with the rows of non-periodic axes zeroed.
    cell_bound: largest sum of |cell| entries of any system, Å (sizes the rounding band).
    counts: [B] int64 atoms per system.
    """

    offsets: np.ndarray
    cells: np.ndarray
    pbc: np.ndarray
    position_bound: float
    boxes: np.ndarray
    cell_bound: float
    counts: np.ndarray

    @property
    def n_systems(self) -> int:
        return len(self.offsets) - 1


def system_layout(
    positions: torch.Tensor,
    cell: torch.Tensor | None,
    pbc: torch.Tensor | None,
    batch: torch.Tensor | None,
    n_node: torch.Tensor | Sequence[int] | np.ndarray | None = None,
) -> SystemLayout:
    """Check and broadcast the inputs of `neighbor_list`; raise `MoldenInputError` if wrong.

    `n_node` ([B] atoms per system) takes precedence over `batch`, which is then not read.
    """
    global _last_layout
    if positions.ndim != 2 or positions.shape[-1] != 3:
        raise MoldenInputError("radius_graph", f"positions must be [N, 3], got {tuple(positions.shape)}")
    n_atoms = positions.shape[0]
    if positions.device.type == "cpu":  # numpy views: nothing is copied
        on_host = None
        bound = float(np.abs(positions.numpy(force=positions.requires_grad)).max(initial=0.0))
        cell_values, pbc_values, node_counts = _numpy(cell), _numpy(pbc), _numpy(n_node)
    else:
        on_host = _HostCopy(positions, batch if n_node is None else None, cell, pbc, n_node)
        bound, cell_values, pbc_values, node_counts = on_host.values
    # MD, relaxations and benchmarks search the same systems call after call: the checked
    # per-system arrays of the last call are reused when its inputs repeat (a measurable part
    # of a small system's search). Keyed on values, so a changed cell is always re-checked.
    key = None
    if batch is None or node_counts is not None:
        key = (n_atoms, positions.dtype, _value_key(cell_values), _value_key(pbc_values), _value_key(node_counts))
        last = _last_layout
        if last is not None and last[0] == key:
            a = last[1]
            return SystemLayout(a.offsets, a.cells, a.pbc, bound, a.boxes, a.cell_bound, a.counts)
    if node_counts is not None:
        counts = np.asarray(node_counts).reshape(-1).astype(np.int64)
        if (counts < 0).any() or counts.sum() != n_atoms:
            raise MoldenInputError(
                "radius_graph", f"n_node must be non-negative and sum to the {n_atoms} atoms, got {counts.sum()}"
            )
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    elif batch is None:
        offsets = np.array([0, n_atoms], dtype=np.int64)
    elif on_host is None:
        offsets = _batch_offsets(_numpy(batch), n_atoms)
    else:
        offsets = on_host.batch_offsets(n_atoms)
    n_systems = len(offsets) - 1
    dtype = _NUMPY_FLOATS.get(positions.dtype, np.float32)
    if cell_values is None:
        cells = np.zeros((n_systems, 3, 3), dtype=dtype)
    else:
        cells = np.asarray(cell_values, dtype=dtype)
        if cells.shape == (3, 3):
            cells = np.repeat(cells[None], n_systems, axis=0)
        if cells.shape != (n_systems, 3, 3):
            raise MoldenInputError("radius_graph", f"{cells.shape[0]} cells for {n_systems} systems")
    if pbc_values is None:
        flags = np.zeros((n_systems, 3), dtype=bool)
    else:
        flags = np.asarray(pbc_values, dtype=bool)
        flags = np.repeat(flags[None], n_systems, axis=0) if flags.shape == (3,) else flags
        if flags.shape != (n_systems, 3):
            raise MoldenInputError("radius_graph", f"pbc of shape {flags.shape} for {n_systems} systems")
    check_periodic_cells(cells, flags)
    boxes = cells.astype(np.float64) * flags[..., None]
    cell_bound = float(np.abs(cells).sum(axis=(1, 2)).max(initial=0.0))
    layout = SystemLayout(offsets, cells, flags, bound, boxes, cell_bound, np.diff(offsets))
    if key is not None:
        _last_layout = (key, layout)
    return layout


def _value_key(value) -> tuple | None:
    """A hashable, exact key of a small host array (or list) of per-system numbers."""
    if value is None:
        return None
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    return (array.shape, array.dtype.str, array.tobytes())


class _HostCopy:
    """The per-system numbers of a call on device tensors, brought to the host in one copy
    (one synchronisation instead of one per tensor); CPU values are read as they are."""

    def __init__(self, positions, batch, cell, pbc, n_node) -> None:
        self.positions, self.batch = positions.detach(), batch
        device = positions.device
        parts = [self.positions.abs().amax().reshape(1) if len(positions) else self.positions.new_zeros(1)]
        if batch is not None:
            batch = batch.detach()
            first_last = batch[[0, -1]] if len(batch) else batch.new_zeros(2)
            unsorted = (batch[1:] < batch[:-1]).any().reshape(1) if len(batch) > 1 else batch.new_zeros(1)
            parts += [first_last, unsorted]
        shapes = []
        for value in (cell, pbc, n_node):
            tensor = value if isinstance(value, torch.Tensor) and value.device.type != "cpu" else None
            shapes.append(None if tensor is None else tensor.shape)
            if tensor is not None:
                parts.append(tensor.detach().reshape(-1))
        flat = torch.cat([p.to(device=device, dtype=torch.float64) for p in parts]).cpu().numpy()
        self.values = [float(flat[0])]
        at = 1
        if batch is not None:
            self.batch_stats, at = flat[1:4], 4
        for value, shape in zip((cell, pbc, n_node), shapes):
            if shape is None:
                self.values.append(_numpy(value))
            else:
                size = int(np.prod(shape))
                self.values.append(flat[at : at + size].reshape(tuple(shape)))
                at += size

    def batch_offsets(self, n_atoms: int) -> np.ndarray:
        """[B + 1] atom offsets of the systems of a sorted `batch`."""
        batch = self.batch
        if isinstance(batch, torch.Tensor) and batch.device.type != "cpu":
            first, last, unsorted = self.batch_stats
            if len(batch) != n_atoms:
                raise MoldenInputError("radius_graph", f"batch has {len(batch)} entries for {n_atoms} atoms")
            _check_batch(bool(unsorted), first if n_atoms else 0)
            n_systems = int(last) + 1 if n_atoms else 1
            bounds = torch.arange(n_systems + 1, device=batch.device, dtype=batch.dtype)
            return torch.searchsorted(batch.detach(), bounds).cpu().numpy().astype(np.int64)
        return _batch_offsets(_numpy(batch), n_atoms)


def _batch_offsets(system: np.ndarray, n_atoms: int) -> np.ndarray:
    """[B + 1] atom offsets of the systems of a sorted host `batch` array."""
    if len(system) != n_atoms:
        raise MoldenInputError("radius_graph", f"batch has {len(system)} entries for {n_atoms} atoms")
    _check_batch(len(system) > 1 and bool((system[1:] < system[:-1]).any()), system[0] if len(system) else 0)
    n_systems = int(system[-1]) + 1 if len(system) else 1
    return np.searchsorted(system, np.arange(n_systems + 1)).astype(np.int64)


def _check_batch(unsorted: bool, first) -> None:
    if unsorted:
        raise MoldenInputError("radius_graph", "batch must be sorted (atoms of a system contiguous)")
    if first < 0:
        raise MoldenInputError("radius_graph", "batch indices must be non-negative")


def _numpy(value) -> np.ndarray | None:
    """A numpy view of a CPU tensor (or the value as an array); None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            return value.detach().cpu().numpy()
        return value.detach().numpy() if value.requires_grad else value.numpy()
    return np.asarray(value)
