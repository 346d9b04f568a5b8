"""Random access to the structures of an HDF5 graph cache (docs/FORMAT.md).

The file is opened lazily in each process and the handle is dropped when pickled, so
`torch.utils.data.DataLoader` workers can fork or spawn safely (as MACE's HDF5 dataset does).
Small caches (below `in_memory_bytes`) are read into memory once. Larger ones stay on disk:
a structure whose block (`block_size` consecutive structures) was asked for recently loads
the whole block, one HDF5 read per array, and the last few blocks are kept; any other
structure is read alone. Sampling block by block (`BlockShuffleSampler`) so reads from disk
at close to in-memory speed, and a fully random order does not pay for whole blocks.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict, deque
from pathlib import Path

import h5py
import numpy as np
from torch.utils.data import Dataset

from molden.data import h5_schema as S
from molden.data.structure import Structure
from molden.errors import MoldenInputError

DEFAULT_IN_MEMORY_BYTES = 2 << 30
CHUNK_CACHE_BYTES = 64 << 20
DEFAULT_BLOCK_SIZE = 256
# Serialises loading and the block cache across threads (h5py serialises its calls anyway):
# one thread must not close the handle another is reading through.
_READ_LOCK = threading.RLock()


def _new_lock_in_child() -> None:  # a fork while another thread held the lock must not deadlock
    global _READ_LOCK
    _READ_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)
# Blocks kept in memory when reading from disk: enough for a DataLoader batch to straddle blocks.
CACHED_BLOCKS = 4


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
        block_size: structures per disk read when the file stays on disk.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        *,
        in_memory_bytes: int = DEFAULT_IN_MEMORY_BYTES,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
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
        self.block_size = max(1, int(block_size))
        self._in_memory = size < in_memory_bytes
        self._arrays: dict[str, np.ndarray] | None = None
        self._blocks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._recent_blocks: deque[int] = deque(maxlen=4 * CACHED_BLOCKS)
        self._file: h5py.File | None = None

    @property
    def in_memory(self) -> bool:
        """True when the whole cache is (or will be) read into memory."""
        return self._in_memory

    @property
    def atom_counts(self) -> np.ndarray:
        """[len(self)] int64 atoms of each structure of the dataset, in dataset order."""
        return (self._atom_offsets[1:] - self._atom_offsets[:-1])[self.indices]

    @property
    def edge_counts(self) -> np.ndarray:
        """[len(self)] int64 edges of each structure's cached graph, in dataset order."""
        return (self._edge_offsets[1:] - self._edge_offsets[:-1])[self.indices]

    def storage_index(self, index: int) -> int:
        """Position in the file of the dataset's `index`-th structure (blocks are by position)."""
        return int(self.indices[index])

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
        state["_blocks"] = OrderedDict()
        state["_recent_blocks"] = deque(maxlen=4 * CACHED_BLOCKS)
        return state

    def _handle(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
        return self._file

    def _per_structure_paths(self) -> list[str]:
        return [S.CELL, S.PBC, S.FRAME, S.SPLIT_CODE] + (
            [S.TARGETS] if self.target_names else []
        ) + [S.OPTIONAL[n].path for n in self.optional_fields if n in S.PER_STRUCTURE]

    def _per_atom_paths(self) -> list[str]:
        return [S.NUMBERS, S.POSITIONS, S.FIXED] + [S.OPTIONAL[n].path for n in self.optional_fields if n not in S.PER_STRUCTURE]

    def _read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Structures start..stop-1 of the file: one read per array."""
        f = self._handle()
        a0, a1 = self._atom_offsets[start], self._atom_offsets[stop]
        e0, e1 = self._edge_offsets[start], self._edge_offsets[stop]
        out = {path: f[path][start:stop] for path in self._per_structure_paths()}
        out.update({path: f[path][a0:a1] for path in self._per_atom_paths()})
        out[S.EDGE_INDEX] = f[S.EDGE_INDEX][e0:e1]
        out[S.UNIT_SHIFTS] = f[S.UNIT_SHIFTS][e0:e1]
        out[S.SYSTEM_ID] = f[S.SYSTEM_ID].asstr()[start:stop]
        return out

    def _source(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        """(arrays holding structure i, the file position of their first structure)."""
        if self._in_memory and self._arrays is not None:  # the common case needs no lock
            return self._arrays, 0
        with _READ_LOCK:
            if self._in_memory:
                if self._arrays is None:
                    self._arrays = self._read(0, len(self._atom_offsets) - 1)
                    self.close()
                return self._arrays, 0
            block = i // self.block_size
            recent = block in self._recent_blocks
            self._recent_blocks.append(block)
            arrays = self._blocks.get(block)
            if arrays is not None:
                self._blocks.move_to_end(block)
                return arrays, block * self.block_size
            if not recent:  # no sign of block-local access: the structure alone is cheaper
                return self._read(i, i + 1), i
            start = block * self.block_size
            arrays = self._blocks[block] = self._read(start, min(start + self.block_size, len(self._atom_offsets) - 1))
            if len(self._blocks) > CACHED_BLOCKS:
                self._blocks.popitem(last=False)
            return arrays, start

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Structure:
        i = int(self.indices[index])
        src, first = self._source(i)
        k = i - first
        a_base, e_base = self._atom_offsets[first], self._edge_offsets[first]
        a0, a1 = self._atom_offsets[i] - a_base, self._atom_offsets[i + 1] - a_base
        e0, e1 = self._edge_offsets[i] - e_base, self._edge_offsets[i + 1] - e_base
        split_code = int(src[S.SPLIT_CODE][k])
        fields = dict(
            numbers=src[S.NUMBERS][a0:a1],
            positions=src[S.POSITIONS][a0:a1],
            cell=src[S.CELL][k],
            pbc=src[S.PBC][k],
            fixed=src[S.FIXED][a0:a1],
            system_id=src[S.SYSTEM_ID][k],
            frame=int(src[S.FRAME][k]),
            split=self.split_names[split_code] if split_code >= 0 else None,
            edge_index=src[S.EDGE_INDEX][e0:e1].T,
            unit_shifts=src[S.UNIT_SHIFTS][e0:e1],
            cache_index=i,
        )
        for name in self.optional_fields:
            column = S.OPTIONAL[name]
            fields[name] = src[column.path][k] if name in S.PER_STRUCTURE else src[column.path][a0:a1]
        if self.target_names:
            fields["targets"] = dict(zip(self.target_names, src[S.TARGETS][k].tolist()))
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
