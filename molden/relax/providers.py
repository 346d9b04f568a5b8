"""Energy/force providers for the batched optimisers: ASE's EMT (the physics reference) and,
through the same call, any calculator ASE knows."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator
from torch import Tensor

from molden.data.batch import Batch


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
