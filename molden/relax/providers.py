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


class ModelProvider:
    """Energies and forces of a trained molden model (direct force head or −∂E/∂x), the
    radius graph rebuilt from the current positions at every call (atoms move; a graph from
    the starting positions would miss neighbours that came closer)."""

    def __init__(self, loaded, *, max_num_neighbors: int | None = None):
        from molden.models import keys

        heads = set(loaded.spec.heads)
        if keys.ENERGY not in heads or not (keys.FORCES in heads or loaded.spec.conservative_forces):
            raise MoldenConfigError(f"{loaded.path}: the model predicts {sorted(heads)}; relaxing needs energy and "
                                    "forces (a model trained with molden finetune --task s2ef)")
        self.model = loaded.model
        self.conservative = loaded.spec.conservative_forces
        self.cutoff_angstrom = float(loaded.spec.backbone_config().cutoff_angstrom)
        self.max_num_neighbors = max_num_neighbors
        parameter = next(self.model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        from molden.models import keys
        from molden.objectives.noise import with_positions

        if batch.tags is not None and batch.tags.numel() and int(batch.tags.max()) > 2:
            raise MoldenInputError(None, "atom tags above 2 are not OC20 tags (0 sub-surface, 1 surface, 2 adsorbate): "
                                         "ASE layer tags? set atoms.set_tags(...) before relaxing with a molden model")
        batch = batch.to(self.device)
        positions = batch.positions.to(self.dtype)
        batch = replace(batch, cell=batch.cell.to(self.dtype), force_inputs=None)
        batch = with_positions(batch, positions, cutoff_angstrom=self.cutoff_angstrom, max_num_neighbors=self.max_num_neighbors)
        context = torch.enable_grad() if self.conservative else torch.no_grad()
        with context:
            out = self.model(batch)
        return out[keys.ENERGY].detach(), out[keys.FORCES].detach()


def provider_for(model: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """"emt" → ASE's EMT; otherwise a molden checkpoint's model."""
    if str(model).lower() == "emt":
        return ASECalculatorProvider()
    from molden.models.checkpoint import load_model

    return ModelProvider(load_model(model, device=device, dtype=dtype))
