"""Energy/force providers for the batched optimisers: ASE's EMT (the physics reference) and,
through the same call, any calculator ASE knows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from torch import Tensor

from molden.data.batch import Batch
from molden.errors import MoldenConfigError, MoldenInputError
from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM, VerletGraph


class ASECalculatorProvider:
    """Energies and forces from an ASE calculator, one structure at a time (EMT by default):
    the reference molden's optimisers are checked against, not a fast path."""

    def __init__(self, make_calculator: Callable[[], Calculator] | None = None):
        if make_calculator is None:
            from ase.calculators.emt import EMT

            make_calculator = EMT
        self.make_calculator = make_calculator
        self._atoms: dict[str, Atoms] = {}

    def _atoms_of(self, key: str, numbers, positions, cell, pbc) -> Atoms:
        """One Atoms with its own calculator per structure (by system id), so the calculator
        updates its neighbour list as the structure moves instead of rebuilding it."""
        atoms = self._atoms.get(key) if key else None
        if atoms is None or len(atoms) != len(numbers) or (atoms.numbers != numbers).any():
            atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
            atoms.calc = self.make_calculator()
            if key:
                self._atoms[key] = atoms
        else:
            atoms.set_cell(cell)
            atoms.pbc = pbc
            atoms.positions = positions
        return atoms

    def forget(self) -> None:
        self._atoms.clear()

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        numbers = batch.numbers.cpu().numpy()
        positions = batch.positions.detach().cpu().double().numpy()
        cells = batch.cell.cpu().double().numpy()
        pbcs = batch.pbc.cpu().numpy()
        bounds = np.r_[0, np.cumsum(batch.n_node.cpu().numpy())]
        energies, forces = np.zeros(batch.num_graphs), np.zeros_like(positions)
        ids = batch.system_ids or ("",) * batch.num_graphs
        for g in range(batch.num_graphs):
            a, b = bounds[g], bounds[g + 1]
            atoms = self._atoms_of(ids[g], numbers[a:b], positions[a:b], cells[g], pbcs[g])
            energies[g] = atoms.get_potential_energy()
            forces[a:b] = atoms.get_forces()
        like = batch.positions
        return torch.as_tensor(energies, dtype=like.dtype, device=like.device), torch.as_tensor(forces, dtype=like.dtype, device=like.device)


CPU_EDGES_PER_CALL = 32_768
"""Edges per model call on a CPU. Past the caches, the per-edge tensors make a CPU forward
slower per structure: gns_oc20_cpu on 64 OC20-sized slabs (242k edges) took 75 ms a slab in
one call against 41 ms in calls of 8 slabs (30k edges), 1 thread (BENCHMARKS.md, relax)."""


class ModelProvider:
    """Energies and forces of a trained molden model (direct force head or −∂E/∂x), with the
    radius graph of the current positions at every call (atoms move; a graph from the starting
    positions would miss neighbours that came closer): searched again at every call, or with
    `skin_angstrom` > 0 filtered from Verlet lists that are searched again only for systems
    whose atoms moved more than half the skin (`molden.graph.verlet`, the same pairs). On a
    CPU the model runs on runs of structures of at most `edges_per_call` edges
    (`CPU_EDGES_PER_CALL`): the same numbers, faster; on a GPU on the whole batch at once."""

    def __init__(self, loaded, *, max_num_neighbors: int | None = None, edges_per_call: int | None | str = "auto",
                 skin_angstrom: float = DEFAULT_SKIN_ANGSTROM):
        from molden.models import keys

        heads = set(loaded.spec.heads)
        if keys.ENERGY not in heads or not (keys.FORCES in heads or loaded.spec.conservative_forces):
            raise MoldenConfigError(f"{loaded.path}: the model predicts {sorted(heads)}; relaxing needs energy and "
                                    "forces (a model trained with molden finetune --task s2ef)")
        self.model = loaded.model
        self.conservative = loaded.spec.conservative_forces
        # A force-only training (λ_E = 0, ForceNet) leaves the energy head untrained: its
        # energies are no result. Checkpoints from before the flag trained energy.
        self.energy_trained = bool(loaded.task.get("energy_trained", True))
        # OC20 S2EF models learn energy − reference_energy: their energies are relative to it.
        self.energy_reference: str | None = loaded.task.get("energy_reference")
        self.cutoff_angstrom = float(loaded.spec.backbone_config().cutoff_angstrom)
        self.graph = VerletGraph(self.cutoff_angstrom, skin_angstrom, max_num_neighbors=max_num_neighbors)
        parameter = next(self.model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self.edges_per_call = default_edges_per_call(self.device) if edges_per_call == "auto" else edges_per_call

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        from molden.models import keys

        if batch.tags is not None and batch.tags.numel() and int(batch.tags.max()) > 2:
            raise MoldenInputError(None, "atom tags above 2 are not OC20 tags (0 sub-surface, 1 surface, 2 adsorbate): "
                                         "ASE layer tags? set atoms.set_tags(...) before relaxing with a molden model")
        batch = batch.to(self.device)
        positions = batch.positions.to(self.dtype)
        batch = replace(batch, cell=batch.cell.to(self.dtype), force_inputs=None)
        batch = self.graph(batch, positions)
        energies, forces = [], []
        context = torch.enable_grad() if self.conservative else torch.no_grad()
        for part in structure_runs(batch, self.edges_per_call):
            with context:
                out = self.model(part)
            energies.append(out[keys.ENERGY].detach())
            forces.append(out[keys.FORCES].detach())
        return torch.cat(energies), torch.cat(forces)


def default_edges_per_call(device: torch.device) -> int | None:
    return CPU_EDGES_PER_CALL if device.type == "cpu" else None


def structure_runs(batch: Batch, edges_per_call: int | None) -> list[Batch]:
    """`batch` (with its graph) as runs of consecutive structures of at most `edges_per_call`
    edges each (a larger structure alone); the whole batch when `edges_per_call` is None."""
    if edges_per_call is None:
        return [batch]
    bounds, edges = [0], 0
    for b, n in enumerate(batch.n_edge.tolist()):
        if b > bounds[-1] and edges + n > edges_per_call:
            bounds.append(b)
            edges = 0
        edges += n
    if len(bounds) == 1:
        return [batch]
    bounds.append(batch.num_graphs)
    return [batch.structures(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def provider_for(model: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 skin_angstrom: float = DEFAULT_SKIN_ANGSTROM):
    """"emt" → ASE's EMT (which keeps its own neighbour lists); otherwise a molden checkpoint's
    model, its radius graph from Verlet lists of `skin_angstrom` (0: searched at every call)."""
    if str(model).lower() == "emt":
        return ASECalculatorProvider()
    from molden.models.checkpoint import load_model

    return ModelProvider(load_model(model, device=device, dtype=dtype), skin_angstrom=skin_angstrom)
