"""H/C/N/O adsorbates for the EMT catalysis data: geometry, placement, references, anomalies.

Geometries are ASE's G2 gas-phase molecules (`ase.build.molecule`), turned so that the binding
atom sits at the origin and the rest of the molecule points up (+z), as OC20 places its
adsorbates binding-atom-down (Chanussot et al. 2021).

Adsorption energies follow OC20's gas-phase references (Chanussot et al. 2021):

    E_H = ½ E(H2),  E_O = E(H2O) − E(H2),  E_N = ½ E(N2),  E_C = E(CO) − E(H2O) + E(H2),

each molecule relaxed with EMT in vacuum (fmax 0.01 eV/Å), so references and slabs share one
potential.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.data import covalent_radii
from ase.geometry import get_distances
from ase.optimize import LBFGS

from molden.data.structure import TAG_ADSORBATE

ADSORBATE_ELEMENTS: frozenset[str] = frozenset({"H", "C", "N", "O"})
MAX_TILT_DEG = 30.0  # OC20 places adsorbates upright with a small random tilt

# OC20-style name (the bound species, binding atom first) -> (G2 molecule, binding element).
ADSORBATES: dict[str, tuple[str, str]] = {
    "H": ("H", "H"),
    "O": ("O", "O"),
    "N": ("N", "N"),
    "C": ("C", "C"),
    "OH": ("OH", "O"),
    "CH": ("CH", "C"),
    "NH": ("NH", "N"),
    "CO": ("CO", "C"),
    "NO": ("NO", "N"),
    "CN": ("CN", "C"),
    "CH2": ("CH2_s3B1d", "C"),
    "NH2": ("NH2", "N"),
    "OH2": ("H2O", "O"),
    "CH3": ("CH3", "C"),
    "NH3": ("NH3", "N"),
    "CHO": ("HCO", "C"),
    "OCH3": ("CH3O", "O"),
}

# The adsorbates EMT keeps intact on its metals. EMT binds H to metal far more strongly than to
# C, N or O, so H-bearing molecules mostly dissociate: over 42 relaxations each (7 metals × 3
# facets × 2 placements) OH survived 19 %, CH 29 %, NH 17 %, CH2/CHO 2 %, NH2/OH2/CH3/NH3 0 %,
# against 98–100 % for the atoms and 74 % for CO and NO (CN: 71 % of 14). They stay selectable;
# `molden.data.emt` retries and then skips the systems where they fall apart.
EMT_STABLE_ADSORBATES: tuple[str, ...] = ("H", "O", "N", "C", "CO", "NO", "CN")


def _rotation_taking(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[3, 3] rotation matrix R with R @ a ∥ b (Rodrigues), for unit vectors a, b."""
    v, c = np.cross(a, b), float(np.dot(a, b))
    if c < -1 + 1e-9:  # antiparallel: a half turn about x (a and b are ±z-like here)
        return np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


@lru_cache(maxsize=None)
def _oriented(name: str) -> Atoms:
    g2_name, binding = ADSORBATES[name]
    mol = molecule(g2_name)
    first = mol.get_chemical_symbols().index(binding)
    order = [first] + [i for i in range(len(mol)) if i != first]
    mol = mol[order]  # binding atom first, so callers know which atom binds
    mol.positions -= mol.positions[0]
    if len(mol) > 1:
        up = mol.positions[1:].mean(axis=0)
        if np.linalg.norm(up) > 1e-6:
            up = up / np.linalg.norm(up)
            mol.positions = mol.positions @ _rotation_taking(up, np.array([0.0, 0.0, 1.0])).T
    return mol


def adsorbate_atoms(name: str) -> Atoms:
    """The adsorbate `name` with its binding atom (index 0) at the origin and the rest above it (Å)."""
    return _oriented(name).copy()


def _relaxed_gas_energy(g2_name: str) -> float:
    mol = molecule(g2_name)
    mol.calc = EMT()
    LBFGS(mol, logfile=None).run(fmax=0.01, steps=500)
    return float(mol.get_potential_energy())


@lru_cache(maxsize=None)
def _gas_molecule_energies() -> tuple[float, float, float, float]:
    return tuple(_relaxed_gas_energy(m) for m in ("H2", "H2O", "CO", "N2"))  # type: ignore[return-value]


def gas_reference_energies() -> dict[str, float]:
    """EMT reference energy per adsorbate element (eV), by OC20's H2/H2O/CO/N2 scheme."""
    h2, h2o, co, n2 = _gas_molecule_energies()
    return {"H": h2 / 2, "O": h2o - h2, "N": n2 / 2, "C": co - h2o + h2}


def reference_energy(symbols: list[str]) -> float:
    """Σ of the gas-phase references of the given adsorbate atoms, eV."""
    refs = gas_reference_energies()
    return float(sum(refs[s] for s in symbols))


def place_adsorbate(slab: Atoms, name: str, rng: np.random.Generator) -> Atoms:
    """Slab + adsorbate (tag 2) at a random site, bond length and orientation."""
    ads = adsorbate_atoms(name)
    angle, tilt = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(0, MAX_TILT_DEG))
    axis_angle = rng.uniform(0, 2 * np.pi)
    ads.rotate(np.degrees(tilt), (np.cos(axis_angle), np.sin(axis_angle), 0.0))
    ads.rotate(np.degrees(angle), "z")
    bond = (covalent_radii[slab.numbers[0]] + covalent_radii[ads.numbers[0]]) * rng.uniform(0.95, 1.15)
    site = rng.uniform(0, 1, 2) @ slab.cell.array[:2, :2]
    # Lateral distances to every slab atom over the 3×3 periodic images in the surface plane.
    shifts = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]) @ slab.cell.array[:2, :2]
    lateral = np.linalg.norm(slab.positions[None, :, :2] + shifts[:, None] - site, axis=-1).min(axis=0)
    near = lateral < bond + 1.0
    # Sit `bond` away from the closest slab atom; over a wide hollow, at least 0.7 Å above its rim.
    rise = np.sqrt(np.maximum(bond**2 - lateral[near] ** 2, 0.7**2))
    height = float((slab.positions[near, 2] + rise).max()) if near.any() else slab.positions[:, 2].max() + bond
    ads.positions += np.array([site[0], site[1], height])
    ads.set_tags(TAG_ADSORBATE)
    return slab + ads


def relaxation_anomaly(initial: Atoms, final_positions: np.ndarray, energy_change_ev: float,
                       final_forces: np.ndarray, top_layer: np.ndarray) -> str | None:
    """Why a relaxation of `initial` (slab first, then the tag-2 adsorbate) must be rejected.

    Returns "non-finite", "energy rose", "surface reconstructed" (a slab atom moved > 1 Å),
    "dissociated" (an initial adsorbate bond, d < 1.25 × covalent sum, grew past that), "desorbed"
    (no adsorbate atom within 1.5 × covalent sum of a slab atom), "intercalated" (an adsorbate
    atom below the lowest atom of the slab's `top_layer` mask), or None if sound. After OC20's
    checks (fairchem `DetectTrajAnomaly`: desorption at 1.5 × covalent sums as here; bonds at
    1.0 ×, loosened to 1.25 × here because EMT's X–H and C–O bond lengths drift from G2's).
    """
    n_slab = int((initial.get_tags() != TAG_ADSORBATE).sum())
    pos0, pos1 = initial.positions, final_positions
    if not (np.isfinite(pos1).all() and np.isfinite(final_forces).all() and np.isfinite(energy_change_ev)):
        return "non-finite"
    if energy_change_ev > 1e-6:
        return "energy rose"
    if np.linalg.norm(pos1[:n_slab] - pos0[:n_slab], axis=1).max() > 1.0:
        return "surface reconstructed"
    cell, pbc = initial.cell, initial.pbc
    radii = covalent_radii[initial.numbers]
    ads0, ads1, r_ads = pos0[n_slab:], pos1[n_slab:], radii[n_slab:]
    bond_limit = 1.25 * (r_ads[:, None] + r_ads[None, :])
    bonded = np.triu(get_distances(ads0, cell=cell, pbc=pbc)[1] < bond_limit, k=1)
    if (get_distances(ads1, cell=cell, pbc=pbc)[1][bonded] > bond_limit[bonded]).any():
        return "dissociated"
    to_slab = get_distances(ads1, pos1[:n_slab], cell=cell, pbc=pbc)[1]
    if (to_slab > 1.5 * (r_ads[:, None] + radii[None, :n_slab])).all():
        return "desorbed"
    if ads1[:, 2].min() < pos1[:n_slab][top_layer, 2].min():
        return "intercalated"
    return None
