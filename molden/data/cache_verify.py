"""Reading every byte of a cache to show it is intact (`molden inspect --verify`).

Every dataset the writer creates carries HDF5's fletcher32 filter: a checksum per chunk, so a
damaged chunk fails its read instead of returning garbage. The variable-length system ids
cannot be filtered, so `CacheWriter.finalize` stores a SHA-256 of them as the attribute
`system_id_sha256` of `structures/system_id` (`write_system_id_digest`). `verify_cache` reads
every chunk of every dataset, compares the digest, checks that lengths and offsets agree and
that edges stay inside their structure, and stops at the first failure, naming the dataset and
the structures it holds. Caches written before checksums still verify: a damaged gzip stream
and inconsistent offsets are still caught, and the report lists the datasets that carry no
checksum.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
from pydantic import BaseModel

from molden.data import h5_schema as S
from molden.data.h5_dataset import damaged_metadata, open_cache
from molden.errors import MoldenInputError

SYSTEM_ID_DIGEST = "system_id_sha256"
# Decompressed bytes read at a time; a failing read is retried chunk by chunk to locate it.
READ_BYTES = 16 << 20

ProgressHook = Callable[[int, int], None]
"""Called with (decompressed bytes read so far, total decompressed bytes)."""


def system_id_digest(ids: Sequence[str]) -> str:
    """SHA-256 (hex) of the UTF-8 JSON list of system ids, `json.dumps(ids, ensure_ascii=False,
    separators=(",", ":"))`: reproducible with the Python standard library alone."""
    text = json.dumps([str(i) for i in ids], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_system_id_digest(f: h5py.File) -> None:
    """Store the digest of `structures/system_id` on that dataset (called by the writer)."""
    f[S.SYSTEM_ID].attrs[SYSTEM_ID_DIGEST] = system_id_digest(f[S.SYSTEM_ID].asstr()[:])


class VerifyReport(BaseModel):
    """What `verify_cache` found: `failure` is one line naming file, dataset and structures."""

    path: Path
    ok: bool
    datasets: int
    bytes_read: int
    not_checksummed: list[str]
    failure: str | None = None


def _row_owner(path: str) -> str | None:
    """Which offsets map rows of this dataset to structures ("atoms", "edges", "structures")."""
    head = path.split("/", 1)[0]
    return head if head in ("structures", "atoms", "edges") else None


def structures_of_rows(path: str, start: int, stop: int, atom_offsets: np.ndarray | None,
                       edge_offsets: np.ndarray | None) -> tuple[int, int] | None:
    """First and last structure holding rows start..stop-1 of dataset `path`, when known."""
    owner = _row_owner(path)
    if owner == "structures":
        n = None if atom_offsets is None else len(atom_offsets) - 1
        last = stop - 1 if n is None else min(stop - 1, n - 1)
        return start, last
    offsets = atom_offsets if owner == "atoms" else edge_offsets if owner == "edges" else None
    if offsets is None:
        return None
    first, last = np.searchsorted(offsets, [start, stop - 1], side="right") - 1
    return int(first), int(last)


def describe_rows(path: str, start: int, stop: int, atom_offsets: np.ndarray | None,
                  edge_offsets: np.ndarray | None) -> str:
    """'atoms/positions rows 8192-16383 (structures 450-901)' for messages."""
    text = f"{path} rows {start}-{stop - 1}"
    found = structures_of_rows(path, start, stop, atom_offsets, edge_offsets)
    if found is not None:
        first, last = found
        text += f" (structure {first})" if first == last else f" (structures {first}-{last})"
    return text


def first_unreadable_rows(dataset: h5py.Dataset, start: int, stop: int) -> tuple[int, int] | None:
    """The first chunk-aligned row range inside start..stop-1 whose read fails, or None."""
    step = dataset.chunks[0] if dataset.chunks else max(1, stop - start)
    edge = (start // step) * step
    while edge < stop:
        a, b = max(edge, start), min(edge + step, stop)
        try:
            dataset[a:b]
        except OSError:
            return a, b
        edge += step
    return None


def _datasets(f: h5py.File) -> list[str]:
    found: list[str] = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    # Offsets first: they map rows of every other dataset to structures in messages.
    first = [p for p in (S.ATOM_OFFSETS, S.EDGE_OFFSETS) if p in found]
    return first + [p for p in found if p not in first]


def verify_cache(path: str | Path, progress: ProgressHook | None = None) -> VerifyReport:
    """Read every dataset of a cache fully and check checksums, digest and offsets.

    Raises `MoldenInputError` only for files that are not a complete molden cache at all;
    damage inside one is reported in `VerifyReport.failure` (the first one found).
    """
    path = Path(path)
    f = open_cache(path)
    try:
        return _verify(f, path, progress)
    except (OSError, KeyError, RuntimeError) as error:  # attributes and layout carry no checksum
        return _failed(path, 0, 0, [], damaged_metadata(path, error))
    finally:
        f.close()


def _verify(f: h5py.File, path: str | Path, progress: ProgressHook | None) -> VerifyReport:
    counts = {"structures": int(f.attrs["n_structures"]), "atoms": int(f.attrs["n_atoms"]),
              "edges": int(f.attrs["n_edges"])}
    try:
        names = _datasets(f)
        sizes = {name: f[name].size * f[name].dtype.itemsize for name in names}
    except (OSError, KeyError, RuntimeError) as error:
        return _failed(path, 0, 0, [], f"unreadable layout ({error})")
    total = sum(sizes.values())
    done = 0
    unchecked: list[str] = []
    atom_offsets = edge_offsets = None
    for name in names:
        dataset = f[name]
        owner = _row_owner(name)
        expected = counts.get(owner) if owner else None
        if expected is not None and name in (S.ATOM_OFFSETS, S.EDGE_OFFSETS):
            expected = counts["structures"] + 1
        if expected is not None and dataset.shape[0] != expected:
            return _failed(path, names.index(name), done, unchecked,
                           f"{name} has {dataset.shape[0]} rows, the cache records {expected}")
        if name == S.SYSTEM_ID:
            problem = _check_system_ids(dataset)
            if problem:
                return _failed(path, names.index(name), done, unchecked, problem)
            if SYSTEM_ID_DIGEST not in dataset.attrs:
                unchecked.append(name)
            done += sizes[name]
            continue
        if not dataset.fletcher32:
            unchecked.append(name)
        rows = dataset.shape[0] if dataset.ndim else 1
        row_bytes = max(1, sizes[name] // max(1, rows))
        step = max(1, READ_BYTES // row_bytes)
        if dataset.chunks:
            step = max(dataset.chunks[0], step // dataset.chunks[0] * dataset.chunks[0])
        whole = [] if name in (S.ATOM_OFFSETS, S.EDGE_OFFSETS) else None
        for start in range(0, max(rows, 1), step):
            stop = min(start + step, rows)
            try:
                values = dataset[start:stop] if dataset.ndim else dataset[()]
            except OSError as error:
                bad = first_unreadable_rows(dataset, start, stop) or (start, stop)
                where = describe_rows(name, *bad, atom_offsets, edge_offsets)
                return _failed(path, names.index(name), done, unchecked, f"{where}: unreadable, the file is damaged ({_short(error)})")
            if whole is not None:
                whole.append(values)
            if name == S.EDGE_INDEX and atom_offsets is not None and edge_offsets is not None:
                problem = _check_edges(values, start, atom_offsets, edge_offsets)
                if problem:
                    return _failed(path, names.index(name), done, unchecked, problem)
            done += min(sizes[name], (stop - start) * row_bytes)
            if progress:
                progress(done, total)
        if whole is not None:
            offsets = np.concatenate(whole)
            end = counts["atoms" if name == S.ATOM_OFFSETS else "edges"]
            if offsets[0] != 0 or offsets[-1] != end or (np.diff(offsets) < 0).any():
                return _failed(path, names.index(name), done, unchecked,
                               f"{name} is not non-decreasing from 0 to {end}: the file is damaged")
            if name == S.ATOM_OFFSETS:
                atom_offsets = offsets
            else:
                edge_offsets = offsets
    if progress:
        progress(total, total)
    return VerifyReport(path=Path(path), ok=True, datasets=len(names), bytes_read=done, not_checksummed=unchecked)


def _check_system_ids(dataset: h5py.Dataset) -> str | None:
    try:
        ids = dataset.asstr()[:]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{S.SYSTEM_ID}: unreadable, the file is damaged ({_short(error)})"
    stored = dataset.attrs.get(SYSTEM_ID_DIGEST)
    if stored is not None and str(stored) != system_id_digest(ids.tolist()):
        return f"{S.SYSTEM_ID}: SHA-256 of the system ids differs from {SYSTEM_ID_DIGEST}, the file is damaged"
    return None


def _check_edges(index: np.ndarray, start: int, atom_offsets: np.ndarray, edge_offsets: np.ndarray) -> str | None:
    """Edges start.. must join atoms of their own structure (indices are local)."""
    rows = start + np.arange(len(index))
    owner = np.searchsorted(edge_offsets, rows, side="right") - 1
    n_atoms = (atom_offsets[1:] - atom_offsets[:-1])[owner]
    bad = np.flatnonzero((index < 0).any(axis=1) | (index >= n_atoms[:, None]).any(axis=1))
    if bad.size:
        k = int(bad[0])
        return f"{S.EDGE_INDEX} row {start + k} (structure {int(owner[k])}): atom index outside the structure, the file is damaged"
    return None


def _short(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _failed(path, n_done: int, done: int, unchecked: list[str], failure: str) -> VerifyReport:
    return VerifyReport(path=Path(path), ok=False, datasets=n_done, bytes_read=done, not_checksummed=unchecked,
                        failure=f"{path}: {failure}")


def raise_if_damaged(report: VerifyReport) -> None:
    """Raise the report's failure as a `MoldenInputError` (one line for the CLI)."""
    if not report.ok:
        raise MoldenInputError(None, f"{report.failure}; rewrite it with molden preprocess")
