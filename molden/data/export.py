"""Export a cache back to extxyz or an ASE trajectory, so no data is locked in (docs/EXPORT.md).

Every field travels: tags, fixed atoms (FixAtoms → extxyz `move_mask`), energy (eV), forces
(eV/Å), system id, frame, split, targets, relaxed positions (Å) and energy (eV), and any other
field of `Structure` (`molden.data.ase_convert`). Reading the file back with
`molden preprocess ase` (or `read_ase`) gives the same structures.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ase.io
import numpy as np

from molden.data import h5_schema as S
from molden.data.ase_convert import atoms_from_structure, check_export_keys, extra_fields
from molden.data.h5_dataset import H5Dataset
from molden.errors import MoldenConfigError, MoldenInputError

# Format name → file endings. extxyz keeps every field; an ASE trajectory keeps no per-atom
# arrays of its own (relaxed_positions, raw forces keys), so those caches are refused there.
EXPORT_FORMATS: dict[str, tuple[str, ...]] = {
    "extxyz": (".extxyz", ".xyz", ".extxyz.gz", ".xyz.gz", ".extxyz.bz2", ".xyz.bz2", ".extxyz.xz", ".xyz.xz"),
    "traj": (".traj",),
}


@dataclass(frozen=True)
class ExportSummary:
    """What `export_cache` wrote."""

    path: Path
    format: str
    n_structures: int
    fixed_atoms_with_forces: int  # ASE's get_forces() reads these back as zero
    forces_key: str


def supported_formats() -> str:
    """One line naming each export format and its file endings."""
    return "; ".join(f"{name} ({', '.join(ends)})" for name, ends in EXPORT_FORMATS.items())


def export_format(out: str | Path, format: str | None = None) -> str:
    """The export format of `out` (from `format`, else from its ending), or `MoldenConfigError`."""
    if format is not None:
        if format not in EXPORT_FORMATS:
            raise MoldenConfigError(f"unknown export format {format!r}; supported: {supported_formats()}")
        return format
    name = Path(out).name.lower()
    for fmt, ends in EXPORT_FORMATS.items():
        if name.endswith(ends):
            return fmt
    raise MoldenConfigError(f"cannot export to {Path(out).name!r}: unknown file ending; supported: {supported_formats()}")


def check_export_target(path: str | Path, out: str | Path, *, overwrite: bool = False) -> None:
    """Refuse an `out` that is the input cache, a folder, or (without `overwrite`) an existing file."""
    path, out = Path(path), Path(out)
    if out.exists() and path.exists() and os.path.samefile(path, out):
        raise MoldenConfigError(f"--out {out} is the cache being exported; choose another file")
    if out.is_dir():
        raise MoldenConfigError(f"--out {out} is a folder; give a file name such as {out / 'export.extxyz'}")
    if out.exists() and not overwrite:
        raise MoldenConfigError(f"--out {out} exists; pass --overwrite to replace it")


def _partial_name(out: Path) -> Path:
    # Keep the ending (".extxyz.gz") last: ASE picks the compression from it.
    match = re.search(r"(\.[A-Za-z0-9]+)+$", out.name)
    stem, ends = (out.name[: match.start()], match.group(0)) if match else (out.name, "")
    return out.with_name(f"{stem}.partial{ends}")


def export_cache(
    path: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    format: str | None = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write the structures of `path` (optionally one split) to `out`.

    `energy_key`/`forces_key`: "energy"/"forces" store them as ASE calculator results (read
    by `atoms.get_forces()`, which zeroes fixed atoms); any other key (e.g. "REF_energy",
    "REF_forces", what MACE reads) stores them raw in `atoms.info`/`atoms.arrays`.
    Everything is checked before any work; the file is written under a temporary name and
    renamed when done, and never onto `path`.
    """
    fmt = export_format(out, format)
    check_export_target(path, out, overwrite=overwrite)
    dataset = H5Dataset(path, split, in_memory_bytes=0)
    check_export_keys(energy_key, forces_key, dataset.target_names)
    if fmt == "traj":
        per_atom = [n for n in dataset.optional_fields if n in extra_fields() and n not in S.PER_STRUCTURE]
        if forces_key != "forces" and "forces" in dataset.optional_fields:
            per_atom.append(f"forces under {forces_key!r}")
        if per_atom:
            raise MoldenInputError(path, f"an ASE trajectory cannot hold {per_atom[0]}; export to .extxyz instead")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(out)
    fixed_with_forces = 0
    try:
        def frames():
            nonlocal fixed_with_forces
            for k in range(len(dataset)):
                if progress and k % 1000 == 0:
                    progress(k, len(dataset))
                structure = dataset[k]
                if structure.forces is not None:
                    fixed_with_forces += int(np.count_nonzero(structure.fixed))
                yield atoms_from_structure(structure, energy_key=energy_key, forces_key=forces_key)

        ase.io.write(tmp, frames(), format=fmt)  # streams: one frame in memory at a time
        if progress:
            progress(len(dataset), len(dataset))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        dataset.close()
    return ExportSummary(out, fmt, len(dataset), fixed_with_forces, forces_key)

