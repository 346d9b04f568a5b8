"""Export a cache back to any format ASE writes (extxyz by default), so no data is locked in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import ase.io

from molden.data.ase_convert import atoms_from_structure
from molden.data.h5_dataset import H5Dataset


def export_cache(
    path: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    format: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the structures of `path` (optionally one split) to `out`; returns how many.

    Tags, fixed atoms (FixAtoms), energy (eV), forces (eV/Å), system id, frame and targets
    travel with each frame. The file is written to a temporary name and renamed when done.
    """
    dataset = H5Dataset(path, split)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    fmt = format or ase.io.formats.filetype(out, read=False)
    try:
        def frames():
            for k in range(len(dataset)):
                if progress and k % 1000 == 0:
                    progress(k, len(dataset))
                yield atoms_from_structure(dataset[k])

        ase.io.write(tmp, frames(), format=fmt)  # streams: one frame in memory at a time
        if progress:
            progress(len(dataset), len(dataset))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(dataset)
