"""Unit conversions of targets, in one place: from the units a source stores (docs/FORMAT.md,
"Units of targets") to the units papers report errors in.

The Hartree is ASE's (`ase.units.Hartree`, CODATA 2014 in ASE 3.x), so molden's eV agree with
every ASE-based tool. QM9 errors are reported as in Noisy Nodes Table 2 / §5.2 (and SchNet,
DimeNet): energies in meV, the other targets in their source units.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from ase.units import Hartree

HARTREE_TO_EV: Final[float] = float(Hartree)
"""eV per Hartree (ASE's CODATA value)."""

EV_TO_MEV: Final[float] = 1000.0

HARTREE_TO_MEV: Final[float] = HARTREE_TO_EV * EV_TO_MEV


class ReportUnit(NamedTuple):
    """How a target's errors are reported: value_in_report_unit = factor × value_in_source_unit."""

    factor: float
    unit: str


# Source units from molden/data/readers (QM9_TARGETS) and docs/FORMAT.md.
TARGET_REPORT_UNITS: Final[dict[str, ReportUnit]] = {
    "mu": ReportUnit(1.0, "D"),
    "alpha": ReportUnit(1.0, "bohr3"),
    "homo": ReportUnit(HARTREE_TO_MEV, "meV"),
    "lumo": ReportUnit(HARTREE_TO_MEV, "meV"),
    "gap": ReportUnit(HARTREE_TO_MEV, "meV"),
    "r2": ReportUnit(1.0, "bohr2"),
    "zpve": ReportUnit(HARTREE_TO_MEV, "meV"),
    "U0": ReportUnit(HARTREE_TO_MEV, "meV"),
    "U": ReportUnit(HARTREE_TO_MEV, "meV"),
    "H": ReportUnit(HARTREE_TO_MEV, "meV"),
    "G": ReportUnit(HARTREE_TO_MEV, "meV"),
    "Cv": ReportUnit(1.0, "cal_per_mol_K"),
    "reference_energy": ReportUnit(EV_TO_MEV, "meV"),  # OC20, eV in the cache
    "adsorption_energy": ReportUnit(EV_TO_MEV, "meV"),  # EMT, eV in the cache
    "homolumogap": ReportUnit(EV_TO_MEV, "meV"),  # PCQM4Mv2, eV in the cache
}

QM9_ENERGY_TARGETS: Final[tuple[str, ...]] = ("U0", "U", "H", "G")
"""QM9 targets that are total energies: per-element reference energies are subtracted before
standardising (Noisy Nodes §5.2 "a fixed per atom energy ... from linear regression")."""


def report_unit(name: str) -> ReportUnit:
    """The unit `name`'s errors are reported in; unknown targets keep their source unit."""
    return TARGET_REPORT_UNITS.get(name, ReportUnit(1.0, "source_unit"))
