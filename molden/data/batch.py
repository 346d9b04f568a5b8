"""The one batch type passed between data, models, objectives and training.

A `Batch` is an immutable, typed container of tensors for B graphs with N atoms and E edges
in total (jraph's GraphsTuple, with the fields atomistic models need). Edge vectors are never
stored: `molden.graph.edge_vectors(batch, positions)` recomputes them from positions, cell and
integer shifts, so they can never disagree with the positions they are computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from molden.data.structure import Structure
from molden.errors import MoldenInputError

_GRAPH_FIELDS = ("edge_index", "unit_shifts", "n_edge")
_PER_ATOM = ("positions", "numbers", "batch", "fixed", "tags", "forces", "relaxed_positions", "force_inputs")
_PER_STRUCTURE = ("cell", "pbc", "n_node", "structure_index", "n_edge", "energy", "relaxed_energy", "targets")


@dataclass(frozen=True)
class Batch:
    """B graphs, N atoms, E edges; indices are absolute across the batch.

    Attributes:
        positions: [N, 3] Cartesian positions, Å.
        numbers: [N] int64 atomic numbers; 0 marks an atom whose type is masked (denoising
            pre-training's atom-type masking), never a real element.
        cell: [B, 3, 3] lattice vectors as rows, Å (zeros where there is no cell).
        pbc: [B, 3] bool periodicity.
        batch: [N] int64 graph index of each atom.
        n_node: [B] int64 atoms per graph.
        fixed: [N] bool atoms held fixed in relaxations.
        structure_index: [B] int64 position of each structure in the cache it was read from
            (`Structure.cache_index`), -1 for structures that did not come from a cache.
        edge_index: [2, E] int64 (i, j): the edge vector is pos[j] + shift - pos[i]; None
            when the structures were collated without a graph (build it from positions with
            `molden.graph` before use). `edge_index`, `unit_shifts` and `n_edge` are either
            all None or all set (`has_graph`).
        unit_shifts: [E, 3] int32 integer lattice offsets of each edge (integer always, also
            after `to(dtype=...)`), or None without a graph.
        n_edge: [B] int64 edges per graph, or None without a graph.
        tags: [N] int64 OC20 tags (0 sub-surface, 1 surface, 2 adsorbate), or None.
        energy: [B] total energy, eV, or None.
        forces: [N, 3] forces, eV/Å, or None.
        relaxed_positions: [N, 3] relaxed positions, Å, or None.
        relaxed_energy: [B] relaxed energy, eV, or None.
        targets: [B, T] graph-level targets in the order of `target_names`, or None.
        target_names: names of the columns of `targets`.
        system_ids: the B `Structure.system_id`s, so predictions map back to records.
        force_inputs: [N, 3] forces given to the model as an input, in units of the training
            set's force scale σ_F with magnitudes clipped (DeNS §3.2.2 force encoding: the
            original structure's forces for the atoms being denoised, zero rows elsewhere;
            `molden.objectives.dens.encoded_forces`), or None when no forces are encoded.
        graph_cutoff_angstrom: when set, the graph is the whole radius graph of `positions` at
            this cutoff, Å: every pair closer (periodic images included), no neighbour cap, as
            a cache without `--max-neighbors` stores it. A graph at a smaller cutoff, of atoms
            moved less than half the difference, is then a filter of it, not a search
            (`molden.graph.verlet.graph_from_wider`). None when not known; whatever moves the
            atoms without rebuilding the graph must reset it to None.
    """

    positions: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    batch: Tensor
    n_node: Tensor
    fixed: Tensor
    structure_index: Tensor
    edge_index: Tensor | None = None
    unit_shifts: Tensor | None = None
    n_edge: Tensor | None = None
    tags: Tensor | None = None
    energy: Tensor | None = None
    forces: Tensor | None = None
    relaxed_positions: Tensor | None = None
    relaxed_energy: Tensor | None = None
    targets: Tensor | None = None
    target_names: tuple[str, ...] = ()
    system_ids: tuple[str, ...] = ()
    force_inputs: Tensor | None = None
    graph_cutoff_angstrom: float | None = None

    def __post_init__(self) -> None:
        present = [getattr(self, name) is not None for name in _GRAPH_FIELDS]
        if any(present) and not all(present):  # a half-built graph is a bug, not bad input
            raise ValueError(f"Batch graph fields {_GRAPH_FIELDS} must be all None or all set")

    @property
    def num_graphs(self) -> int:
        return int(self.n_node.shape[0])

    @property
    def has_graph(self) -> bool:
        """True when the batch carries a graph (`edge_index`, `unit_shifts`, `n_edge`)."""
        return self.edge_index is not None

    def structures(self, start: int, stop: int) -> Batch:
        """The batch of structures `start` to `stop` (exclusive), indices renumbered from 0.

        Reads `n_node` and `n_edge` on the host (one small copy on a device)."""
        atoms = torch.cat([self.n_node.new_zeros(1), self.n_node.cumsum(0)]).tolist()
        a0, a1 = atoms[start], atoms[stop]
        changes: dict = {name: getattr(self, name)[a0:a1] for name in _PER_ATOM if getattr(self, name) is not None}
        changes |= {name: getattr(self, name)[start:stop] for name in _PER_STRUCTURE if getattr(self, name) is not None}
        changes["batch"] = changes["batch"] - start
        if self.has_graph:
            edges = torch.cat([self.n_edge.new_zeros(1), self.n_edge.cumsum(0)]).tolist()
            changes["edge_index"] = self.edge_index[:, edges[start]:edges[stop]] - a0
            changes["unit_shifts"] = self.unit_shifts[edges[start]:edges[stop]]
        changes["system_ids"] = self.system_ids[start:stop]
        return replace(self, **changes)

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
        return replace(self, **changes)

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> Batch:
        """A copy on `device`; floating-point fields cast to `dtype` when given.

        Integer and bool fields (indices, `unit_shifts`, `numbers`, `fixed`) keep their dtype.
        `non_blocking=True` overlaps host-to-device copies of a pinned batch with compute.
        """

        def move(t: Tensor) -> Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)

        return self._map_tensors(move)

    def pin_memory(self) -> Batch:
        """A copy in page-locked host memory; `DataLoader(pin_memory=True)` calls this."""
        return self._map_tensors(Tensor.pin_memory)


def _record(s: Structure) -> str | int | None:
    """What names a structure in an error: its system id, else its cache index."""
    return s.system_id if s.system_id else s.cache_index


def _stack_optional(structures: Sequence[Structure], name: str) -> np.ndarray | None:
    values = [getattr(s, name) for s in structures]
    present = np.array([v is not None for v in values])
    if not present.any():
        return None
    if not present.all():
        odd = structures[int(np.argmin(present))]
        raise MoldenInputError(None, f"has no {name} but other structures in the batch do", _record(odd))
    return np.concatenate([np.atleast_1d(np.asarray(v)) for v in values])


def collate(structures: Sequence[Structure], *, dtype: torch.dtype = torch.float32) -> Batch:
    """One `Batch` from structures, with their graph when they carry one.

    Edge indices are offset by the atoms of the preceding graphs; positions, cell, energies,
    forces and targets are cast to `dtype`. Structures without a stored graph (`edge_index`
    None) give a batch without one (`has_graph` False): build it later from the positions.
    Raises `MoldenInputError` naming the record when the structures cannot share a batch
    (some with a graph or an optional field and some without, different target names).
    """
    if not structures:
        raise MoldenInputError(None, "no structures to collate")
    for s in structures:
        if s.edge_index is not None and s.unit_shifts is None:
            raise MoldenInputError(None, "has edges but no unit shifts", _record(s))
    with_graph = np.array([s.edge_index is not None for s in structures])
    if with_graph.any() and not with_graph.all():
        odd = structures[int(np.argmin(with_graph))]
        raise MoldenInputError(None, "has no graph but other structures in the batch do", _record(odd))
    n_node = np.array([s.n_atoms for s in structures], dtype=np.int64)

    def tensor(array: np.ndarray | None, float_: bool = False) -> Tensor | None:
        if array is None:
            return None
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.to(dtype) if float_ else t

    graph: dict[str, Tensor | None] = {}
    if with_graph.all():
        n_edge = np.array([s.n_edges for s in structures], dtype=np.int64)
        atom_offsets = np.cumsum(n_node) - n_node
        edge_index = np.concatenate([s.edge_index for s in structures], axis=1)
        edge_index = edge_index + np.repeat(atom_offsets, n_edge)
        graph = dict(
            edge_index=tensor(edge_index.astype(np.int64)),
            unit_shifts=tensor(np.concatenate([s.unit_shifts for s in structures]).astype(np.int32)),
            n_edge=tensor(n_edge),
        )

    target_names = tuple(structures[0].targets)
    for s in structures:
        if tuple(s.targets) != target_names:
            raise MoldenInputError(
                None, f"targets {list(s.targets)} differ from {list(target_names)} of the batch", _record(s)
            )
    targets = None
    if target_names:
        targets = np.array([[s.targets[k] for k in target_names] for s in structures], dtype=np.float64)
    tags = tensor(_stack_optional(structures, "tags"))

    return Batch(
        positions=tensor(np.concatenate([s.positions for s in structures]), True),
        numbers=tensor(np.concatenate([s.numbers for s in structures])),
        cell=tensor(np.stack([s.cell for s in structures]), True),
        pbc=tensor(np.stack([s.pbc for s in structures])),
        batch=tensor(np.repeat(np.arange(len(structures), dtype=np.int64), n_node)),
        n_node=tensor(n_node),
        fixed=tensor(np.concatenate([s.fixed for s in structures])),
        structure_index=torch.tensor(
            [-1 if s.cache_index is None else s.cache_index for s in structures], dtype=torch.int64
        ),
        **graph,
        tags=None if tags is None else tags.long(),
        energy=tensor(_stack_optional(structures, "energy"), True),
        forces=tensor(_stack_optional(structures, "forces"), True),
        relaxed_positions=tensor(_stack_optional(structures, "relaxed_positions"), True),
        relaxed_energy=tensor(_stack_optional(structures, "relaxed_energy"), True),
        targets=tensor(targets, True),
        target_names=target_names,
        system_ids=tuple(str(s.system_id) for s in structures),
    )
