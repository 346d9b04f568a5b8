"""Writing the HDF5 graph cache: atomic (temporary file, then rename) and resumable.

Structures are appended in blocks to `OUT.h5.partial`. After each block the counts of
structures, atoms and edges are committed as attributes and the file is flushed, so an
interrupted run re-opens the partial file, truncates it to the last committed block and
goes on from there. `finalize` writes splits and statistics, marks the file complete and
renames it into place; `abort` removes the partial file (used for bad input, so nothing
half-written is left behind).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from molden import __version__
from molden.data import h5_schema as S
from molden.data.statistics import write_statistics
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError

# fletcher32 stores a checksum per chunk, so corruption fails the read instead of returning
# garbage; every dataset carries it (HDF5 builds always include the filter) except the
# variable-length system ids, which HDF5 cannot filter.
CHECKSUM = dict(fletcher32=True)
COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True, **CHECKSUM)

SplitAssigner = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Maps (system ids [S] str, structure indices [S]) to split names [S] for structures without one."""


def fingerprint(record: dict) -> str:
    """A provenance (or settings) record as the canonical JSON stored in, and compared with,
    the file's `provenance` (`settings`) attribute."""
    return json.dumps(record, sort_keys=True, default=str)


class CacheWriter:
    """Append `Structure`s that carry graphs to a cache file; see docs/FORMAT.md."""

    def __init__(
        self,
        path: str | Path,
        provenance: dict,
        *,
        resume: bool = True,
        overwrite: bool = False,
        settings: dict | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        """Open `path`.partial: resume it when its provenance matches, else start a new one.

        A partial file that holds committed structures from other settings is never discarded
        silently: it raises `MoldenConfigError` unless `overwrite` (or `resume=False`) says to.
        `settings` are stored beside the provenance (as the `settings` attribute) without
        deciding a resume (the split, say: it is assigned at `finalize`). `notify` receives
        one-line notes about what happened to an existing partial file.
        """
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.provenance = provenance
        self._fingerprint = fingerprint(provenance)
        self._notify = notify or (lambda message: None)
        self._file: h5py.File | None = None
        self.resumed_from = 0
        if self.partial.exists():
            if resume:
                self._try_resume(overwrite)
            else:
                self._notify(f"{self.partial}: discarded an interrupted run (--no-resume)")
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.partial, "w")
            self._init_attrs()
            # Flushed at once, so a run killed before its first block leaves a readable file.
            self._file.flush()
        self._file.attrs["settings"] = fingerprint(settings or {})

    # ---------------------------------------------------------------- state
    @property
    def n_structures(self) -> int:
        return int(self._file.attrs["n_structures"])

    @property
    def n_atoms(self) -> int:
        return int(self._file.attrs["n_atoms"])

    @property
    def n_edges(self) -> int:
        return int(self._file.attrs["n_edges"])

    def _init_attrs(self) -> None:
        a = self._file.attrs
        a["format"] = S.FORMAT_NAME
        a["schema_version"] = S.SCHEMA_VERSION
        a["molden_version"] = __version__
        a["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        a["provenance"] = self._fingerprint
        a["units"] = json.dumps(S.UNITS, ensure_ascii=False)
        a["complete"] = False
        a["n_structures"] = a["n_atoms"] = a["n_edges"] = 0
        for key in ("source", "cutoff_angstrom", "max_num_neighbors"):
            value = self.provenance.get(key)
            a[key] = -1 if value is None else value

    def _try_resume(self, overwrite: bool) -> None:
        try:
            f = h5py.File(self.partial, "r+")
        except OSError:  # a partial file killed mid-write can be unreadable: start over
            self._notify(f"{self.partial}: unreadable (killed mid-write?), starting over")
            self.partial.unlink()
            return
        if f.attrs.get("provenance") != self._fingerprint or f.attrs.get("schema_version") != S.SCHEMA_VERSION:
            committed = int(f.attrs.get("n_structures", 0))
            stored = f.attrs.get("provenance", "{}")
            f.close()
            if committed and not overwrite:
                raise MoldenConfigError(
                    f"{self.partial} holds {committed:,} structures of an interrupted run with other settings "
                    f"({describe_differences(stored, self._fingerprint)}): rerun with those settings to resume, "
                    "or pass --overwrite (or --no-resume) to discard it"
                )
            if committed:
                self._notify(f"{self.partial}: discarded {committed:,} structures written with other settings (--overwrite)")
            self.partial.unlink()
            return
        self._file = f
        counts = {"structure": self.n_structures, "atom": self.n_atoms, "edge": self.n_edges}
        # Drop whatever was written after the last committed block.
        for name, obj in _datasets(f):
            if name.startswith("structures/"):
                rows = counts["structure"] + (1 if name in (S.ATOM_OFFSETS, S.EDGE_OFFSETS) else 0)
            elif name.startswith("atoms/"):
                rows = counts["atom"]
            elif name.startswith("edges/"):
                rows = counts["edge"]
            else:
                continue
            obj.resize(rows, axis=0)
        self.resumed_from = self.n_structures

    def last_committed(self) -> tuple[str, int] | None:
        """(system id, frame) of the last committed structure of a resumed file, else None."""
        if not self.resumed_from:
            return None
        k = self.resumed_from - 1
        return self._file[S.SYSTEM_ID].asstr()[k], int(self._file[S.FRAME][k])

    # ---------------------------------------------------------------- writing
    def _create_layout(self, first: Structure) -> None:
        f = self._file
        optional = [name for name in S.OPTIONAL if getattr(first, name) is not None]
        f.attrs["optional_fields"] = json.dumps(optional)
        f.attrs["target_names"] = json.dumps(list(first.targets))
        f.attrs["split_names"] = json.dumps([])
        for column in list(S.REQUIRED) + [S.OPTIONAL[name] for name in optional]:
            f.create_dataset(
                column.path, shape=(0, *column.shape), maxshape=(None, *column.shape),
                dtype=column.dtype, chunks=(column.chunk_rows, *column.shape), **COMPRESSION,
            )
        for path in (S.ATOM_OFFSETS, S.EDGE_OFFSETS):
            f.create_dataset(path, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(S.STRUCTURE_CHUNK,), **COMPRESSION)
        f.create_dataset(S.SYSTEM_ID, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(S.STRUCTURE_CHUNK,))
        n_targets = len(first.targets)
        if n_targets:
            f.create_dataset(S.TARGETS, shape=(0, n_targets), maxshape=(None, n_targets), dtype=np.float64,
                             chunks=(S.STRUCTURE_CHUNK, n_targets), **COMPRESSION)

    def write(self, structures: Sequence[Structure], where: str | None = None) -> None:
        """Append a block of structures (each with `edge_index`/`unit_shifts`) and commit it."""
        if not structures:
            return
        f = self._file
        if "optional_fields" not in f.attrs:
            self._create_layout(structures[0])
        optional = json.loads(f.attrs["optional_fields"])
        target_names = json.loads(f.attrs["target_names"])
        split_names: list[str] = json.loads(f.attrs["split_names"])
        first_index = self.n_structures
        for k, s in enumerate(structures):
            record = s.system_id or first_index + k
            if s.edge_index is None:
                raise MoldenInputError(where, "has no graph (edge_index): build one before writing", record)
            missing = [name for name in optional if getattr(s, name) is None]
            if missing:
                raise MoldenInputError(where, f"has no {missing[0]} although earlier structures have", record)
            # The first structure decides the cache's fields: a field it lacks would be dropped
            # silently from every later structure.
            extra = [name for name in S.OPTIONAL if name not in optional and getattr(s, name) is not None]
            if extra:
                raise MoldenInputError(
                    where,
                    f"has {extra[0]} although the first structure has none; every structure needs the same "
                    "fields (drop or complete the structures without it)",
                    record,
                )
            if list(s.targets) != target_names:
                raise MoldenInputError(where, f"targets {list(s.targets)} differ from earlier {target_names}", record)
            if s.unit_shifts.size and np.abs(s.unit_shifts).max() > np.iinfo(np.int16).max:
                raise MoldenInputError(where, "periodic image offset beyond ±32767 cells", record)
            if s.split is not None and s.split not in split_names:
                split_names.append(s.split)

        n_node = np.array([s.n_atoms for s in structures], np.int64)
        n_edge = np.array([s.n_edges for s in structures], np.int64)
        columns = {
            S.CELL: np.stack([s.cell for s in structures]),
            S.PBC: np.stack([s.pbc for s in structures]),
            S.FRAME: np.array([s.frame for s in structures], np.int32),
            S.SPLIT_CODE: np.array(
                [S.UNASSIGNED_SPLIT if s.split is None else split_names.index(s.split) for s in structures], np.int8
            ),
            S.SYSTEM_ID: np.array([s.system_id for s in structures], dtype=object),
            S.NUMBERS: np.concatenate([s.numbers for s in structures]),
            S.POSITIONS: np.concatenate([s.positions for s in structures]),
            S.FIXED: np.concatenate([s.fixed for s in structures]),
            S.EDGE_INDEX: np.concatenate([s.edge_index.T for s in structures]),
            S.UNIT_SHIFTS: np.concatenate([s.unit_shifts for s in structures]),
            S.ATOM_OFFSETS: self.n_atoms + np.cumsum(n_node),
            S.EDGE_OFFSETS: self.n_edges + np.cumsum(n_edge),
        }
        for name in optional:
            column = S.OPTIONAL[name]
            values = [getattr(s, name) for s in structures]
            columns[column.path] = np.array(values) if name in S.PER_STRUCTURE else np.concatenate(values)
        if target_names:
            columns[S.TARGETS] = np.array([[s.targets[k] for k in target_names] for s in structures])
        for path, values in columns.items():
            _append(f[path], values)
        # Commit: counts are written last, so a crash before this line is rolled back on resume.
        f.attrs["split_names"] = json.dumps(split_names)
        f.attrs["n_atoms"] = self.n_atoms + int(n_node.sum())
        f.attrs["n_edges"] = self.n_edges + int(n_edge.sum())
        f.attrs["n_structures"] = first_index + len(structures)
        f.flush()

    # ---------------------------------------------------------------- closing
    @property
    def all_structures_written(self) -> bool:
        """True for a resumed file whose every structure was written (a finalize failed or was
        interrupted): only `finalize` is left to run, nothing needs reading again."""
        return bool(self._file.attrs.get("all_structures_written", False))

    def finalize(self, assign_splits: SplitAssigner, extra_stats: dict | None = None) -> Path:
        """Write splits and statistics, mark complete and rename into place.

        If `assign_splits` raises, the file is left as it was (every structure written), so a
        writer resuming it can finalize with other split settings without reading anything.
        """
        f = self._file
        if "optional_fields" not in f.attrs:
            raise MoldenInputError(self.provenance.get("inputs") or self.provenance.get("source"), "no structures to write")
        if "source_split_names" not in f.attrs:
            # Splits named by the source, before any assignment: a finalize run again (other
            # split settings after a failed or interrupted one) re-assigns everything else,
            # with the statistics of the run that read the structures.
            f.attrs["source_split_names"] = f.attrs["split_names"]
            f.attrs["pending_stats"] = json.dumps(extra_stats or {}, default=lambda v: v.item())
            f.attrs["all_structures_written"] = True
            f.flush()
        extra_stats = json.loads(f.attrs["pending_stats"])
        names: list[str] = json.loads(f.attrs["source_split_names"])
        codes = f[S.SPLIT_CODE][:]
        unassigned = (codes == S.UNASSIGNED_SPLIT) | (codes >= len(names))
        if unassigned.any():
            system_ids = f[S.SYSTEM_ID].asstr()[:]
            assigned = assign_splits(system_ids[unassigned], np.flatnonzero(unassigned))
            for name in dict.fromkeys(assigned.tolist()):
                if name not in names:
                    names.append(name)
            codes[unassigned] = np.array([names.index(n) for n in assigned], np.int8)
            f[S.SPLIT_CODE][:] = codes
        f.attrs["split_names"] = json.dumps(names)
        if S.SPLITS in f:
            del f[S.SPLITS]
        group = f.create_group(S.SPLITS)
        for code, name in enumerate(names):
            group.create_dataset(name, data=np.flatnonzero(codes == code).astype(np.int64), **CHECKSUM)
        write_statistics(f, extra_stats)
        from molden.data.cache_verify import write_system_id_digest  # system ids cannot carry fletcher32
        write_system_id_digest(f)
        for key in ("source_split_names", "pending_stats", "all_structures_written"):  # only for a rerun
            del f.attrs[key]
        f.attrs["complete"] = True
        f.close()
        self._file = None
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file."""
        self.close()
        self.partial.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def describe_differences(old: str | dict, new: str | dict, limit: int = 3) -> str:
    """The first `limit` settings that differ between two provenance records (JSON or dicts),
    as `key old → new`; for messages that say why a file was not reused."""

    def flat(value, prefix: str = "") -> dict:
        if isinstance(value, str) and not prefix:
            try:
                value = json.loads(value)
            except ValueError:
                value = {"provenance": value}
        if not isinstance(value, dict):
            return {prefix: value}
        out: dict = {}
        for key, item in value.items():
            out.update(flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out

    a, b = flat(old), flat(new)
    changed = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    # "config.cutoff_angstrom" repeats a change of the top-level "cutoff_angstrom": name it once.
    changed = [k for k in changed if not (k.startswith("config.") and k[len("config."):] in changed)]
    parts = [f"{k} {a.get(k)} → {b.get(k)}" for k in changed[:limit]]
    if len(changed) > limit:
        parts.append(f"{len(changed) - limit} more")
    return ", ".join(parts) or "schema version"


def _datasets(group: h5py.Group):
    found = []
    group.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return found


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values
