"""OC20 (Chanussot et al. 2021) in its raw download formats, read with ASE.

- IS2RS/IS2RE trajectories: one ASE `.traj` per system, file name = system id
  (`random1234.traj`). Every yielded frame carries `relaxed_positions`/`relaxed_energy`
  from the trajectory's last frame, which pairs an initial structure with its relaxed one.
  The energies are DFT totals; OC20's IS2RE target is the adsorption energy, the relaxed
  energy less the system's reference (clean slab + gas-phase adsorbate), which OC20 ships
  apart as `oc20_ref.pkl` (system id → eV). Given `references` (`read_reference_energies`),
  every frame also carries `targets["reference_energy"]` and `targets["adsorption_energy"]`
  = relaxed energy − reference (eV), the EMT caches' column of the same name.
- S2EF: `N.extxyz` or `N.extxyz.xz` frames with a metadata file `N.txt` (or `N.txt.xz`) of
  the same stem, one line `random<sid>,frame<fid>,<reference energy eV>` per frame, in order.
  The extxyz energy is the raw DFT total energy (eV) and stays in `energy`; the line's reference
  energy goes to `targets["reference_energy"]` (eV), so `energy - reference_energy` is the
  S2EF target (training subtracts it with `S2EFConfig.energy_reference`). A missing metadata
  file is an error: without it there is no system id, frame index or reference; extxyz files
  that carry no OC20 metadata are read by `molden preprocess ase` (`read_ase` in Python).

Every frame must have tags (0 sub-surface, 1 surface, 2 adsorbate), energy and forces; fixed
atoms come from FixAtoms (traj) or extxyz `move_mask` (fixed = not movable).
"""

from __future__ import annotations

import json
import lzma
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, TextIO

import ase.io
from ase import Atoms
from ase.io.trajectory import Trajectory
import numpy as np

from molden.data.ase_convert import structure_from_atoms
from molden.data.readers.text_decoding import not_utf8
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError

Frames = Literal["all", "initial", "final"]
S2EF_SUFFIXES = (".extxyz", ".extxyz.xz")


def _natural_key(path: Path) -> tuple:
    # "2.extxyz" before "10.extxyz", as OC20 numbers its S2EF chunks.
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".extxyz.xz", ".extxyz", ".traj"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _structure(atoms: Atoms, where: Path, record: str, **fields) -> Structure:
    """A validated `Structure`; tags, energy and forces are required for OC20."""
    structure = structure_from_atoms(atoms, **fields)
    for key in ("tags", "energy", "forces"):
        if getattr(structure, key) is None:
            raise MoldenInputError(where, f"missing required key {key!r}", record)
    tags = structure.tags
    if not np.isin(tags, (0, 1, 2)).all():
        raise MoldenInputError(where, f"tags must be 0, 1 or 2 (OC20), found {sorted(set(tags.tolist()))}", record)
    if not (tags > 0).any():
        # OC20 always tags surface (1) and adsorbate (2) atoms; all zeros means the tags were lost.
        raise MoldenInputError(where, "all atoms are tagged 0: surface and adsorbate tags are missing", record)
    structure.validate(where, record)
    return structure


REFERENCE_SUFFIXES = (".pkl", ".json", ".csv")


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads a pickled dict of names to numbers without running anything the file names:
    numpy scalars are the only objects it rebuilds."""

    ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only names and numbers belong in it")


def read_reference_energies(path: str | Path) -> dict[str, float]:
    """System id → reference energy (eV) for `read_oc20(references=...)`: OC20's `oc20_ref.pkl`
    (a pickled dict, read without running code from the file), a JSON object, or CSV lines
    `system_id,energy_ev` (an optional header line). Refused in one line naming the file (and
    the entry) when unreadable, empty, or holding a value that is not a finite number."""
    path = Path(path)
    if not path.is_file():
        raise MoldenInputError(path, "no such reference-energy file")
    if path.suffix not in REFERENCE_SUFFIXES:
        raise MoldenInputError(path, f"reference energies must be a {', '.join(REFERENCE_SUFFIXES)} file")
    if path.stat().st_size == 0:
        raise MoldenInputError(path, "the reference-energy file is empty")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as handle:
                raw = _DataOnlyUnpickler(handle).load()
        elif path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
        else:
            rows = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if rows and len(rows[0]) == 2 and not _is_number(rows[0][1]):
                rows = rows[1:]  # a header
            bad = next((k for k, row in enumerate(rows) if len(row) != 2), None)
            if bad is not None:
                raise MoldenInputError(path, f"expected 'system_id,energy_ev', got {','.join(rows[bad])!r}", f"row {bad + 1}")
            raw = {sid.strip(): value.strip() for sid, value in rows}
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError, AttributeError, ImportError) as error:
        raise MoldenInputError(path, f"cannot read reference energies: {error}") from None
    if not isinstance(raw, dict) or not raw:
        raise MoldenInputError(path, "expected a mapping of system ids to reference energies (eV), found "
                                     + ("an empty one" if isinstance(raw, dict) else type(raw).__name__))
    out: dict[str, float] = {}
    for sid, value in raw.items():
        number = float(value) if _is_number(value) else float("nan")
        if not np.isfinite(number):
            raise MoldenInputError(path, f"reference energy {value!r} is not a finite number", f"system {sid}")
        out[str(sid)] = number
    return out


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _read_traj(path: Path, frames: Frames, references: Mapping[str, float] | None = None) -> Iterator[Structure]:
    sid = _stem(path)
    try:
        traj = Trajectory(str(path))
    except Exception as error:  # ASE raises many types for a bad file; name the file once
        raise MoldenInputError(path, f"cannot open trajectory: {error}") from None
    with traj:
        n = len(traj)
        if n == 0:
            raise MoldenInputError(path, "trajectory has no frames", sid)

        def load(i: int) -> Atoms:
            try:
                return traj[i]
            except Exception as error:
                raise MoldenInputError(path, f"cannot read frame: {error}", f"{sid} frame {i}") from None

        # Random access to the last frame first keeps memory at two frames per system.
        final = _structure(load(n - 1), path, f"{sid} frame {n - 1}", system_id=sid, frame=n - 1)
        targets: dict[str, float] = {}
        if references is not None:
            if sid not in references:
                raise MoldenInputError(path, "no reference energy for this system in the reference-energy file", sid)
            targets = {"reference_energy": references[sid], "adsorption_energy": final.energy - references[sid]}
        wanted = {"all": range(n), "initial": range(1), "final": range(n - 1, n)}[frames]
        for i in wanted:
            record = f"{sid} frame {i}"
            atoms = load(i)
            if len(atoms) != final.n_atoms:
                raise MoldenInputError(path, f"{len(atoms)} atoms but the final frame has {final.n_atoms}", record)
            yield _structure(
                atoms,
                path,
                record,
                system_id=sid,
                frame=i,
                relaxed_positions=final.positions,
                relaxed_energy=final.energy,
                targets=dict(targets),
            )


def _open_text(path: Path) -> TextIO:
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, encoding="utf-8")


def _metadata_path(path: Path) -> Path:
    stem = _stem(path)
    for candidate in (path.with_name(f"{stem}.txt"), path.with_name(f"{stem}.txt.xz")):
        if candidate.is_file():
            return candidate
    raise MoldenInputError(
        path,
        f"no OC20 metadata file {stem}.txt or {stem}.txt.xz beside it; "
        "extxyz without OC20 metadata is read by `molden preprocess ase` (read_ase in Python)",
    )


def _parse_metadata(line: str, where: Path, line_number: int) -> tuple[str, int, dict[str, float]]:
    """`random<sid>,frame<fid>[,<reference energy eV>]` → (system id, frame, targets)."""
    parts = line.strip().split(",")
    match = re.fullmatch(r"frame(\d+)", parts[1].strip()) if len(parts) >= 2 else None
    if match is None or not parts[0].strip():
        expected = "expected 'random<sid>,frame<fid>,<reference energy>'"
        raise MoldenInputError(where, f"{expected}, got {line.strip()!r}", f"line {line_number}")
    targets = {}
    if len(parts) >= 3 and parts[2].strip():
        try:
            targets["reference_energy"] = float(parts[2])
        except ValueError:
            message = f"garbled reference energy {parts[2].strip()!r}"
            raise MoldenInputError(where, message, f"line {line_number}") from None
    return parts[0].strip(), int(match.group(1)), targets


def _read_s2ef(path: Path) -> Iterator[Structure]:
    meta_path = _metadata_path(path)
    try:
        yield from _read_s2ef_frames(path, meta_path)
    except UnicodeDecodeError:  # ASE's own decoding errors are caught per frame: this is the .txt
        raise not_utf8(meta_path) from None


def _read_s2ef_frames(path: Path, meta_path: Path) -> Iterator[Structure]:
    with _open_text(meta_path) as meta:
        frames = ase.io.iread(str(path), index=":", format="extxyz")
        i = 0
        while True:
            record = f"{path.name} frame {i}"
            try:
                atoms = next(frames)
            except StopIteration:
                break
            except Exception as error:  # truncated or garbled frame: ASE's message, our record
                raise MoldenInputError(path, f"cannot read frame: {type(error).__name__}: {error}", record) from None
            line = meta.readline()
            if not line.strip():
                raise MoldenInputError(meta_path, f"has fewer lines than {path.name} has frames", f"line {i + 1}")
            sid, frame, targets = _parse_metadata(line, meta_path, i + 1)
            yield _structure(atoms, path, f"{record} ({sid} frame{frame})", system_id=sid, frame=frame, targets=targets)
            i += 1
        if meta.readline().strip():
            raise MoldenInputError(meta_path, f"has more lines than the {i} frames of {path.name}", f"line {i + 1}")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = [p for p in path.iterdir() if p.name.endswith((".traj",) + S2EF_SUFFIXES)]
        if not files:
            raise MoldenInputError(path, "no .traj, .extxyz or .extxyz.xz files in this folder")
        return sorted(files, key=_natural_key)
    if not path.exists():
        raise MoldenInputError(path, "no such file or folder")
    if not path.name.endswith((".traj",) + S2EF_SUFFIXES):
        raise MoldenInputError(path, "expected an OC20 .traj, .extxyz or .extxyz.xz file, or a folder of them")
    return [path]


def read_oc20(path: str | Path, *, limit: int | None = None, frames: Frames = "all",
              references: Mapping[str, float] | None = None) -> Iterator[Structure]:
    """Stream OC20 frames (Å, eV, eV/Å) from a `.traj`/`.extxyz[.xz]` file or a folder of them.

    `frames` picks trajectory frames ("initial" for IS2RE inputs, "final" for relaxed ones);
    S2EF extxyz frames are independent samples, so they need `frames="all"`. `references`
    (system id → eV) adds the reference and adsorption energies to trajectory frames; S2EF
    frames take theirs from their metadata files.
    """
    if frames not in ("all", "initial", "final"):
        raise MoldenConfigError(f"frames must be 'all', 'initial' or 'final', got {frames!r}")
    if limit is not None and limit <= 0:
        return
    count = 0
    for file in _files(Path(path)):
        if file.name.endswith(".traj"):
            source = _read_traj(file, frames, references)
        elif references is not None:
            raise MoldenConfigError(f"{file}: reference energies are for .traj trajectories; S2EF extxyz frames take "
                                    "theirs from their .txt metadata")
        elif frames != "all":
            raise MoldenConfigError(f"{file}: S2EF extxyz frames are not trajectories; use frames='all'")
        else:
            source = _read_s2ef(file)
        for structure in source:
            yield structure
            count += 1
            if limit is not None and count >= limit:
                return


def count_oc20(path: str | Path, *, frames: Frames = "all") -> int | None:
    """Frames `read_oc20` yields, from trajectory lengths and metadata line counts; None if unknown."""
    total = 0
    try:
        files = _files(Path(path))
    except MoldenInputError:
        return None
    for file in files:
        if file.name.endswith(".traj"):
            try:
                with Trajectory(str(file)) as traj:
                    total += len(traj) if frames == "all" else 1
            except Exception:
                return None
        else:
            try:
                with _open_text(_metadata_path(file)) as meta:
                    total += sum(1 for line in meta if line.strip())
            except (MoldenInputError, OSError, lzma.LZMAError, UnicodeDecodeError):
                return None
    return total
