"""Shared fixtures: small structure files written with ASE, so tests need no downloads."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
import ase.io


def _frames(n: int, seed: int = 0) -> list[Atoms]:
    """A mix of periodic bulk, slabs and molecules with EMT energies and forces."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        kind = k % 3
        if kind == 0:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        elif kind == 1:
            atoms = fcc111("Pt", (2, 2, 3), vacuum=6.0)
            atoms.set_constraint(FixAtoms(indices=list(range(4))))
        else:
            atoms = molecule("CH4")
            atoms.center(vacuum=4.0)
            atoms.pbc = False
        # Every frame carries tags (zeros where ASE built none): a cache keeps only the fields
        # of its first structure, and refuses later structures that have more.
        atoms.set_tags(atoms.get_tags())
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    return frames


@pytest.fixture
def mixed_extxyz(tmp_path):
    """An extxyz file of 30 frames (bulk, slabs, molecules) with energies and forces."""
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, _frames(30))
    return path
