"""Conversion between `ase.Atoms` and `Structure`, the one place that knows ASE's conventions.

Reading: tags come from `atoms.arrays["tags"]`, fixed atoms from `FixAtoms` constraints, energy
and forces from the attached (single-point) calculator or, failing that, from `atoms.info` /
`atoms.arrays` under the usual extxyz keys. Frames that molden exported carry a JSON dict
`atoms.info["molden"]` (`EXPORT_KEY`) naming where every other field went; those are read back
exactly, so cache → extxyz → cache keeps every field (docs/EXPORT.md).

Writing (`atoms_from_structure`): energy and forces go to a `SinglePointCalculator` under the
keys "energy"/"forces" (ASE's convention), or raw into `atoms.info[energy_key]` /
`atoms.arrays[forces_key]` for any other key: raw values are never touched by constraints,
whereas `atoms.get_forces()` returns zero on every FixAtoms atom.
"""

from __future__ import annotations

import dataclasses
import re
from urllib.parse import quote, unquote

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from molden.data.structure import Structure
from molden.errors import MoldenConfigError

ENERGY_KEYS = ("energy", "free_energy", "REF_energy", "y")
FORCES_KEYS = ("forces", "force", "REF_forces")

# The info key of molden's own record: a dict (JSON in extxyz) of system id, frame, split,
# target names, where energy and forces went and which further fields were written.
EXPORT_KEY = "molden"
# Keys ASE reserves for itself in extxyz comment lines and arrays; a target or raw key named
# like one of them would be swallowed or misread.
_RESERVED_KEYS = {
    EXPORT_KEY, "energy", "free_energy", "forces", "stress", "magmom", "magmoms", "charges", "dipole",
    "Lattice", "Properties", "pbc", "positions", "pos", "numbers", "species", "Z", "tags", "move_mask",
    "masses", "momenta", "initial_charges", "initial_magmoms",
}
# Fields `atoms_from_structure` writes in a way of its own (Atoms itself, calculator, the
# export record) or that belong to the cache, not to the data (graph, position in the cache).
_HANDLED_FIELDS = {
    "numbers", "positions", "cell", "pbc", "tags", "fixed", "energy", "forces",
    "system_id", "frame", "targets", "split", "edge_index", "unit_shifts", "cache_index",
}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
# Target names become extxyz keys: ASE's comment-line parser mangles quotes, backslashes,
# '=' and spaces, so only these characters are allowed.
_TARGET_NAME = re.compile(r"[A-Za-z0-9_.+\-]+$")


def _encode(text: str) -> str:
    # Strings in the export record are percent-encoded: ASE's extxyz writer does not escape the
    # backslashes of JSON ("\u00e9", "\""), and its reader drops them.
    return quote(text, safe="")


def extra_fields() -> list[str]:
    """Structure fields exported as plain `info` (per structure) or `arrays` (per atom) entries
    under their own name: relaxed_positions, relaxed_energy, and any field added later."""
    return [f.name for f in dataclasses.fields(Structure) if f.name not in _HANDLED_FIELDS]


def check_export_keys(energy_key: str, forces_key: str, target_names: list[str] = ()) -> None:
    """Raise `MoldenConfigError` if the keys cannot be written and read back unambiguously."""
    for what, key, ase_key in (("energy", energy_key, "energy"), ("forces", forces_key, "forces")):
        if not _KEY.match(key):
            raise MoldenConfigError(f"{what} key {key!r} must be a name of letters, digits and '_'")
        if key != ase_key and (key in _RESERVED_KEYS or key in extra_fields()):
            raise MoldenConfigError(f"{what} key {key!r} is reserved by ASE or molden; e.g. REF_{what}")
    if energy_key == forces_key:
        raise MoldenConfigError(f"energy and forces keys must differ, both are {energy_key!r}")
    taken = _RESERVED_KEYS | set(extra_fields()) | {energy_key}
    clash = [name for name in target_names if name in taken]
    if clash:
        raise MoldenConfigError(f"target {clash[0]!r} has the name of a key ASE or molden writes; it cannot be exported")
    odd = [name for name in target_names if not _TARGET_NAME.match(name)]
    if odd:
        raise MoldenConfigError(f"target {odd[0]!r} cannot be an extxyz key: use letters, digits and _ . + - only")


def _fixed_mask(atoms: Atoms) -> np.ndarray:
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
    return fixed


def _results(atoms: Atoms) -> dict:
    return getattr(atoms.calc, "results", {}) if atoms.calc is not None else {}


def _energy_and_forces(atoms: Atoms) -> tuple[float | None, np.ndarray | None]:
    energy = forces = None
    results = _results(atoms)
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


def _exported_fields(atoms: Atoms, record: dict) -> dict:
    """The Structure fields of a frame molden exported, from its export record."""
    results = _results(atoms)

    def lookup(key: str | None, per_atom: bool):
        if key is None:
            return None
        if key in results:  # "energy"/"forces" live in the calculator ASE builds on reading
            return results[key]
        return (atoms.arrays if per_atom else atoms.info).get(key)

    split = record.get("split")
    fields = dict(
        system_id=unquote(str(record.get("system_id", ""))),
        frame=int(record.get("frame", 0)),
        split=None if split is None else unquote(str(split)),
        energy=lookup(record.get("energy_key"), False),
        forces=lookup(record.get("forces_key"), True),
        targets={name: float(atoms.info[name]) for name in record.get("targets", [])},
    )
    known = set(extra_fields())
    for name in record.get("fields", []):
        if name in known:  # a field of a newer molden is left out rather than guessed
            value = atoms.arrays.get(name, atoms.info.get(name))
            fields[name] = value.item() if isinstance(value, np.generic) else value
    return fields


def structure_from_atoms(atoms: Atoms, *, system_id: str = "", frame: int = 0, **extra) -> Structure:
    """A `Structure` from an `ase.Atoms`; `extra` sets further fields (split, targets ...).

    `system_id` and `frame` are used unless the frame carries molden's export record, whose
    values (and split, targets, relaxed_* ...) win; `extra` wins over both.
    """
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
    record = atoms.info.get(EXPORT_KEY)
    if isinstance(record, dict):
        fields.update(_exported_fields(atoms, record))
    fields.update(extra)
    return Structure(**fields)


def atoms_from_structure(structure: Structure, *, energy_key: str = "energy", forces_key: str = "forces") -> Atoms:
    """An `ase.Atoms` carrying every field of `structure` (for export to extxyz/traj).

    Tags and fixed atoms (FixAtoms) are ASE's own; energy (eV) and forces (eV/Å) go to a
    SinglePointCalculator when their key is "energy"/"forces", else raw to `info[energy_key]`
    / `arrays[forces_key]`; targets and per-structure fields to `info`, per-atom fields
    (relaxed_positions, Å) to `arrays`, each under its own name; system id, frame, split and
    the key of each field to the export record `info["molden"]`.
    """
    atoms = Atoms(
        numbers=structure.numbers,
        positions=structure.positions,
        cell=structure.cell,
        pbc=structure.pbc,
        tags=structure.tags,
    )
    if structure.fixed is not None and structure.fixed.any():
        atoms.set_constraint(FixAtoms(indices=np.flatnonzero(structure.fixed)))
    results = {}
    split = None if structure.split is None else _encode(structure.split)
    record: dict = {"system_id": _encode(structure.system_id), "frame": int(structure.frame), "split": split,
                    "targets": list(structure.targets), "energy_key": None, "forces_key": None, "fields": []}
    for name, key, value, store in (("energy", energy_key, structure.energy, atoms.info),
                                    ("forces", forces_key, structure.forces, atoms.arrays)):
        if value is None:
            continue
        record[f"{name}_key"] = key
        if key == name:
            results[name] = value
        else:
            store[key] = np.array(value) if name == "forces" else value
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    for name, value in structure.targets.items():
        atoms.info[name] = float(value)
    for name in extra_fields():
        value = getattr(structure, name)
        if value is None:
            continue
        if isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == structure.n_atoms:
            atoms.arrays[name] = value.copy()
        else:
            atoms.info[name] = value.item() if isinstance(value, np.generic) else value
        record["fields"].append(name)
    atoms.info[EXPORT_KEY] = record
    return atoms
