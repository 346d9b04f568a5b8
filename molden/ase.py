"""`MoldenCalculator`: a trained molden model as an ASE calculator, for every ASE optimiser and
molecular-dynamics integrator.

    from molden.ase import MoldenCalculator
    atoms.calc = MoldenCalculator("runs/s2ef/best.pt")
    LBFGS(atoms).run(fmax=0.05)

Energies in eV, forces in eV/Å on every atom (ASE applies `FixAtoms` itself). `atoms.pbc`
is honoured as given: a slab periodic in x and y only gets images in x and y (fairchem #428
ignored it). The radius graph comes from a Verlet list (`skin_angstrom`, `molden.graph.verlet`):
searched again only when an atom has moved half the skin since the last search, or the cell
changed, and filtered to the cutoff at every call, so the pairs are a fresh search's. A model
trained on forces only (ForceNet's energy weight 0) warns once that its energies mean nothing.
A model trained on referenced energies (OC20 S2EF, `energy_reference`) returns those: the total
energy less the system's reference, which is constant along a relaxation, so forces and
relaxations are the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import collate
from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM
from molden.models.checkpoint import load_model
from molden.relax.providers import ModelProvider


class MoldenCalculator(Calculator):
    """An ASE calculator from a molden checkpoint (EMA weights) with energy and forces."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, checkpoint: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float64,
                 skin_angstrom: float = DEFAULT_SKIN_ANGSTROM, **kwargs):
        super().__init__(**kwargs)
        self.provider = ModelProvider(load_model(checkpoint, device=device, dtype=dtype), skin_angstrom=skin_angstrom)
        self._checkpoint, self._warned = checkpoint, False

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        structure = structure_from_atoms(self.atoms, system_id="ase")
        batch = collate([structure], dtype=self.provider.dtype)
        energy, forces = self.provider(batch)
        if not self.provider.energy_trained and not self._warned:
            # ASE's optimisers log the energy, so it cannot be withheld; it must not pass for a result.
            warnings.warn(f"{self._checkpoint}: the model was trained on forces only (energy weight 0): its energies "
                          "are an untrained head's, its forces the model's", stacklevel=2)
            self._warned = True
        self.results = {"energy": float(energy[0]), "free_energy": float(energy[0]),
                        "forces": forces.cpu().double().numpy().astype(np.float64)}
