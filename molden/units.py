"""Unit conversions, all in one place.

molden stores data in the units of its source (QM9 energies in Hartree, dipoles in Debye, ...);
models and losses use eV and Å. Every conversion goes through these constants so that a metric
reported in meV can be traced to one line (CODATA 2018 values, as ASE uses).
"""

from __future__ import annotations

from ase import units as _ase_units

HARTREE_TO_EV: float = float(_ase_units.Hartree)  # 27.211386... eV
BOHR_TO_ANGSTROM: float = float(_ase_units.Bohr)  # 0.529177... Å
EV_TO_MEV: float = 1000.0
