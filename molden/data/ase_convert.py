"""Conversion between `ase.Atoms` and `Structure`, the one place that knows ASE's conventions.

Tags come from `atoms.arrays["tags"]`, fixed atoms from `FixAtoms` constraints, energy and
forces from the attached (single-point) calculator or, failing that, from `atoms.info` /
`atoms.arrays` under the usual extxyz keys.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from molden.data.structure import Structure

ENERGY_KEYS = ("energy", "free_energy", "REF_energy", "y")
FORCES_KEYS = ("forces", "force", "REF_forces")


def _fixed_mask(atoms: Atoms) -> np.ndarray:
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
    return fixed


def _energy_and_forces(atoms: Atoms) -> tuple[float | None, np.ndarray | None]:
    energy = forces = None
    calc = atoms.calc
    if calc is not None:
        results = getattr(calc, "results", {})
        if "energy" in results:
            energy = float(results["energy"])
        elif "free_energy" in results:
            energy = float(results["free_energy"])
        if "forces" in results:
            forces = np.asarray(results["forces"], dtype=np.float64)
    if energy is None:
        energy = next((float(atoms.info[k]) for k in ENERGY_KEYS if k in atoms.info), None)
    if forces is None:
        forces = next((np.asarray(atoms.arrays[k], dtype=np.float64) for k in FORCES_KEYS if k in atoms.arrays), None)
    return energy, forces


def structure_from_atoms(atoms: Atoms, *, system_id: str = "", frame: int = 0, **extra) -> Structure:
    """A `Structure` from an `ase.Atoms`; `extra` sets further fields (split, targets ...)."""
    energy, forces = _energy_and_forces(atoms)
    tags = atoms.arrays["tags"] if "tags" in atoms.arrays else None
    fields = dict(
        numbers=atoms.numbers,
        positions=atoms.positions,
        cell=atoms.cell.array,
        pbc=atoms.pbc,
        tags=tags,
        fixed=_fixed_mask(atoms),
        energy=energy,
        forces=forces,
        system_id=system_id,
        frame=frame,
    )
    fields.update(extra)
    return Structure(**fields)


def atoms_from_structure(structure: Structure) -> Atoms:
    """An `ase.Atoms` carrying tags, fixed atoms, energy and forces (for export to extxyz/traj)."""
    atoms = Atoms(
        numbers=structure.numbers,
        positions=structure.positions,
        cell=structure.cell,
        pbc=structure.pbc,
        tags=structure.tags,
    )
    if structure.fixed is not None and structure.fixed.any():
        atoms.set_constraint(FixAtoms(indices=np.flatnonzero(structure.fixed)))
    if structure.energy is not None or structure.forces is not None:
        results = {}
        if structure.energy is not None:
            results["energy"] = structure.energy
        if structure.forces is not None:
            results["forces"] = structure.forces
        atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["system_id"] = structure.system_id
    atoms.info["frame"] = structure.frame
    for name, value in structure.targets.items():
        atoms.info[name] = value
    return atoms
