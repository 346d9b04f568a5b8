"""Atomic radii for ForceNet's edge features (ForceNet §2 (a): p_st uses the radii a_s, a_t).

The paper cites J. C. Slater, "Atomic radii in crystals", J. Chem. Phys. 41, 3199 (1964): the
empirical radii fitted to interatomic distances in crystals and molecules (±0.12 Å). They are
not in ASE (`ase.data.covalent_radii` holds Cordero et al., Dalton Trans. 2008, 2832:
different numbers, e.g. H 0.31 vs Slater's 0.25, Cu 1.32 vs 1.35), so they are written here as
one array. Values are Slater's Table; He, Ne and Ar, which Slater does not give, carry the
values of the table ForceNet's released code ships (fairchem `ATOMIC_RADII`: 1.20, 1.60,
0.71 Å), so the paper's model sees the same numbers. Where neither gives a radius (Kr, Xe,
At, Rn, Fr, Z ≥ 96) the Cordero covalent radius from ASE fills the gap rather than a NaN that
would poison every edge of the atom.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from ase.data import covalent_radii

_NAN = np.nan

# Å, index = atomic number 1 … 100 (index 0 is a placeholder). Ten per row: Z = 1–10, 11–20, …
SLATER_RADII_ANGSTROM: np.ndarray = np.array([_NAN] + [
    0.25, 1.20, 1.45, 1.05, 0.85, 0.70, 0.65, 0.60, 0.50, 1.60,
    1.80, 1.50, 1.25, 1.10, 1.00, 1.00, 1.00, 0.71, 2.20, 1.80,
    1.60, 1.40, 1.35, 1.40, 1.40, 1.40, 1.35, 1.35, 1.35, 1.35,
    1.30, 1.25, 1.15, 1.15, 1.15, _NAN, 2.35, 2.00, 1.80, 1.55,
    1.45, 1.45, 1.35, 1.30, 1.35, 1.40, 1.60, 1.55, 1.55, 1.45,
    1.45, 1.40, 1.40, _NAN, 2.60, 2.15, 1.95, 1.85, 1.85, 1.85,
    1.85, 1.85, 1.85, 1.80, 1.75, 1.75, 1.75, 1.75, 1.75, 1.75,
    1.75, 1.55, 1.45, 1.35, 1.35, 1.30, 1.35, 1.35, 1.35, 1.50,
    1.90, 1.80, 1.60, 1.90, _NAN, _NAN, _NAN, 2.15, 1.95, 1.80,
    1.80, 1.75, 1.75, 1.75, 1.75, _NAN, _NAN, _NAN, _NAN, _NAN,
])
"""[101] Slater (1964) empirical atomic radii, Å (He, Ne, Ar from fairchem's table); NaN where
no value is given."""

RadiiSource = Literal["slater", "covalent"]


def atomic_radii_angstrom(source: RadiiSource = "slater") -> np.ndarray:
    """[119] radius per atomic number, Å; index 0 (the masked-atom token) is 0, so a masked
    atom's edge features do not reveal its element.

    "slater": the paper's radii (gaps filled with ASE's covalent radii, see the module
    docstring); "covalent": Cordero's covalent radii from `ase.data.covalent_radii`.
    """
    covalent = np.asarray(covalent_radii[:119], dtype=np.float64).copy()
    if source == "covalent":
        radii = covalent
    elif source == "slater":
        radii = covalent.copy()
        known = ~np.isnan(SLATER_RADII_ANGSTROM)
        radii[: len(SLATER_RADII_ANGSTROM)][known] = SLATER_RADII_ANGSTROM[known]
    else:
        raise ValueError(f"unknown radii source {source!r}")
    radii[0] = 0.0
    return radii
