"""The one batch type passed between data, models, objectives and training.

A `Batch` is an immutable, typed container of tensors for B graphs with N atoms and E edges
in total (jraph's GraphsTuple, with the fields atomistic models need). Edge vectors are never
stored: `molden.graph.edge_vectors(batch)` recomputes them from positions, cell and integer
shifts, so noised positions can never disagree with the cached graph.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from molden.data.structure import Structure
from molden.errors import MoldenInputError


@dataclass(frozen=True)
class Batch:
    """B graphs, N atoms, E edges; indices are absolute across the batch.

    Attributes:
        positions: [N, 3] Cartesian positions, Å.
        numbers: [N] int64 atomic numbers.
        cell: [B, 3, 3] lattice vectors as rows, Å (zeros where there is no cell).
        pbc: [B, 3] bool periodicity.
        batch: [N] int64 graph index of each atom.
        n_node: [B] int64 atoms per graph.
        n_edge: [B] int64 edges per graph.
        edge_index: [2, E] int64 (i, j): the edge vector is pos[j] + shift - pos[i].
        unit_shifts: [E, 3] integer lattice offsets of each edge (float dtype of positions
            after `to`, int32 as collated).
        tags: [N] int64 OC20 tags (0 sub-surface, 1 surface, 2 adsorbate), or None.
        fixed: [N] bool atoms held fixed in relaxations.
        energy: [B] total energy, eV, or None.
        forces: [N, 3] forces, eV/Å, or None.
        relaxed_positions: [N, 3] relaxed positions, Å, or None.
        relaxed_energy: [B] relaxed energy, eV, or None.
        targets: [B, T] graph-level targets in the order of `target_names`, or None.
        target_names: names of the columns of `targets`.
    """

    positions: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    batch: Tensor
    n_node: Tensor
    n_edge: Tensor
    edge_index: Tensor
    unit_shifts: Tensor
    fixed: Tensor
    tags: Tensor | None = None
    energy: Tensor | None = None
    forces: Tensor | None = None
    relaxed_positions: Tensor | None = None
    relaxed_energy: Tensor | None = None
    targets: Tensor | None = None
    target_names: tuple[str, ...] = ()

    @property
    def num_graphs(self) -> int:
        return int(self.n_node.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Batch:
        """A copy on `device`; floating-point fields cast to `dtype` when given."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(device=device, dtype=dtype)
                else:
                    value = value.to(device=device)
                changes[f.name] = value
        return replace(self, **changes)


def _stack_optional(values: list, where: str) -> np.ndarray | None:
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        raise MoldenInputError(None, f"some structures in the batch have {where} and others do not")
    return np.concatenate([np.atleast_1d(np.asarray(v)) for v in values])


def _long(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.long()


def collate(structures: Sequence[Structure], *, dtype: torch.dtype = torch.float32) -> Batch:
    """One `Batch` from structures that carry their graph (`edge_index`, `unit_shifts`).

    Edge indices are offset by the atoms of the preceding graphs; positions, cell, energies,
    forces and targets are cast to `dtype`.
    """
    if not structures:
        raise ValueError("collate needs at least one structure")
    for s in structures:
        if s.edge_index is None or s.unit_shifts is None:
            raise ValueError(f"structure {s.system_id!r} has no graph; build it before collating")
    n_node = np.array([s.n_atoms for s in structures], dtype=np.int64)
    n_edge = np.array([s.n_edges for s in structures], dtype=np.int64)
    atom_offsets = np.concatenate([[0], np.cumsum(n_node)[:-1]])
    edge_index = np.concatenate(
        [s.edge_index + off for s, off in zip(structures, atom_offsets)], axis=1
    )

    def tensor(array: np.ndarray | None, float_: bool = False) -> Tensor | None:
        if array is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.to(dtype) if float_ else t

    target_names = tuple(structures[0].targets)
    targets = None
    if target_names:
        if any(tuple(s.targets) != target_names for s in structures):
            raise MoldenInputError(None, "structures in the batch have different target names")
        targets = np.array([[s.targets[k] for k in target_names] for s in structures], dtype=np.float64)

    return Batch(
        positions=tensor(np.concatenate([s.positions for s in structures]), True),
        numbers=tensor(np.concatenate([s.numbers for s in structures])),
        cell=tensor(np.stack([s.cell for s in structures]), True),
        pbc=tensor(np.stack([s.pbc for s in structures])),
        batch=tensor(np.repeat(np.arange(len(structures), dtype=np.int64), n_node)),
        n_node=tensor(n_node),
        n_edge=tensor(n_edge),
        edge_index=tensor(edge_index.astype(np.int64)),
        unit_shifts=tensor(np.concatenate([s.unit_shifts for s in structures]).astype(np.int32)),
        fixed=tensor(np.concatenate([s.fixed for s in structures])),
        tags=_long(tensor(_stack_optional([s.tags for s in structures], "tags"))),
        energy=tensor(_stack_optional([s.energy for s in structures], "energy"), True),
        forces=tensor(_stack_optional([s.forces for s in structures], "forces"), True),
        relaxed_positions=tensor(
            _stack_optional([s.relaxed_positions for s in structures], "relaxed positions"), True
        ),
        relaxed_energy=tensor(
            _stack_optional([s.relaxed_energy for s in structures], "relaxed energy"), True
        ),
        targets=tensor(targets, True),
        target_names=target_names,
    )
