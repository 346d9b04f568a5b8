"""Random access to the structures of an HDF5 graph cache (docs/FORMAT.md).

The file is opened lazily in each process and the handle is dropped when pickled, so
`torch.utils.data.DataLoader` workers can fork or spawn safely (as MACE's HDF5 dataset does).
Small caches (below `in_memory_bytes`) are read into memory once; larger ones are read per
structure through HDF5's chunk cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from torch.utils.data import Dataset

from molden.data import h5_schema as S
from molden.data.structure import Structure
from molden.errors import MoldenInputError

DEFAULT_IN_MEMORY_BYTES = 2 << 30
CHUNK_CACHE_BYTES = 64 << 20


def open_cache(path: str | Path) -> h5py.File:
    """Open a complete molden cache for reading, or raise `MoldenInputError` saying why not."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = " (an interrupted write is in .partial: rerun preprocess to resume)" if partial.exists() else ""
        raise MoldenInputError(path, f"no such file{hint}")
    try:
        f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as error:
        raise MoldenInputError(path, f"not a readable HDF5 file ({error})") from None
    if f.attrs.get("format") != S.FORMAT_NAME:
        f.close()
        raise MoldenInputError(path, "not a molden graph cache (attribute format missing)")
    if int(f.attrs.get("schema_version", -1)) != S.SCHEMA_VERSION:
        version = f.attrs.get("schema_version")
        f.close()
        raise MoldenInputError(path, f"schema version {version}, this molden reads {S.SCHEMA_VERSION}")
    if not bool(f.attrs.get("complete", False)):
        f.close()
        raise MoldenInputError(path, "cache is incomplete (interrupted write)")
    return f


class H5Dataset(Dataset):
    """Structures of a cache, with their clean-structure graphs, by index.

    Args:
        path: the `.h5` file written by `molden preprocess`.
        split: restrict to one split ("train", "val", ...); None for all structures.
        in_memory_bytes: read the whole file into memory when it is smaller than this.
    """

    def __init__(self, path: str | Path, split: str | None = None, *, in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES):
        self.path = Path(path)
        with open_cache(self.path) as f:
            self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            self.optional_fields: list[str] = json.loads(f.attrs["optional_fields"])
            self.target_names: list[str] = json.loads(f.attrs["target_names"])
            self.split_names: list[str] = json.loads(f.attrs["split_names"])
            self._atom_offsets = f[S.ATOM_OFFSETS][:]
            self._edge_offsets = f[S.EDGE_OFFSETS][:]
            if split is None:
                self.indices = np.arange(len(self._atom_offsets) - 1)
            elif split in f[S.SPLITS]:
                self.indices = f[S.SPLITS][split][:]
            else:
                raise MoldenInputError(self.path, f"no split {split!r}; the cache has {self.split_names}")
            size = self.path.stat().st_size
        self.split = split
        self._in_memory = size < in_memory_bytes
        self._arrays: dict[str, np.ndarray] | None = None
        self._file: h5py.File | None = None

    # -------------------------------------------------------------- metadata
    @property
    def cutoff_angstrom(self) -> float:
        return float(self.attrs["cutoff_angstrom"])

    @property
    def provenance(self) -> dict:
        return json.loads(self.attrs["provenance"])

    def statistics(self) -> dict:
        """The `/stats` group as plain Python values."""
        with open_cache(self.path) as f:
            g = f[S.STATS]
            out = {k: (v.item() if hasattr(v, "item") else v) for k, v in g.attrs.items()}
            for name, dataset in g.items():
                out[name] = dataset[:]
            return out

    # -------------------------------------------------------------- access
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py handles cannot cross process boundaries
        return state

    def _handle(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        return self._file

    def _source(self):
        """Where arrays are read from: a dict of numpy arrays or the open HDF5 file."""
        if not self._in_memory:
            return self._handle()
        if self._arrays is None:
            f = self._handle()
            self._arrays = {}
            f.visititems(lambda name, obj: self._arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) and not name.startswith((S.STATS, S.SPLITS)) else None)
            self._arrays[S.SYSTEM_ID] = f[S.SYSTEM_ID].asstr()[:]
            self.close()
        return self._arrays

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Structure:
        i = int(self.indices[index])
        src = self._source()
        a0, a1 = self._atom_offsets[i], self._atom_offsets[i + 1]
        e0, e1 = self._edge_offsets[i], self._edge_offsets[i + 1]
        system_id = src[S.SYSTEM_ID][i]
        if isinstance(system_id, bytes):
            system_id = system_id.decode()
        split_code = int(src[S.SPLIT_CODE][i])
        fields = dict(
            numbers=src[S.NUMBERS][a0:a1],
            positions=src[S.POSITIONS][a0:a1],
            cell=src[S.CELL][i],
            pbc=src[S.PBC][i],
            fixed=src[S.FIXED][a0:a1],
            system_id=system_id,
            frame=int(src[S.FRAME][i]),
            split=self.split_names[split_code] if split_code >= 0 else None,
            edge_index=src[S.EDGE_INDEX][e0:e1].T,
            unit_shifts=src[S.UNIT_SHIFTS][e0:e1],
        )
        for name in self.optional_fields:
            column = S.OPTIONAL[name]
            fields[name] = src[column.path][i] if name in S.PER_STRUCTURE else src[column.path][a0:a1]
        if self.target_names:
            fields["targets"] = dict(zip(self.target_names, src[S.TARGETS][i].tolist()))
        return Structure(**fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass
