"""Per-dataset statistics written into the cache when it is finalised.

Counts, the element histogram, target mean/std, energy per atom and per-element reference
energies (least squares of total energy on composition, as MACE's E0s / Noisy Nodes §5.2
"fixed per atom energy from linear regression"). Computed by streaming the file in blocks, so
memory stays bounded and a resumed write gets the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from molden.data import h5_schema as S

N_ELEMENTS = 119  # index = atomic number
BLOCK_STRUCTURES = 65536


def _blocks(n: int, size: int = BLOCK_STRUCTURES):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def composition_blocks(f: h5py.File):
    """Yield (structure slice, [block, 119] counts of each element per structure)."""
    offsets = f[S.ATOM_OFFSETS][:]
    numbers = f[S.NUMBERS]
    for start, stop in _blocks(len(offsets) - 1):
        a0, a1 = offsets[start], offsets[stop]
        z = numbers[a0:a1].astype(np.int64)
        owner = np.repeat(np.arange(stop - start), np.diff(offsets[start : stop + 1]))
        counts = np.bincount(owner * N_ELEMENTS + z, minlength=(stop - start) * N_ELEMENTS)
        yield slice(start, stop), counts.reshape(stop - start, N_ELEMENTS)


def element_reference_energies(f: h5py.File, element_counts: np.ndarray) -> np.ndarray:
    """[119] eV per atom of each element fitted to total energies (NaN for absent elements)."""
    present = np.flatnonzero(element_counts)
    gram = np.zeros((len(present), len(present)))
    rhs = np.zeros(len(present))
    energy = f[S.ENERGY]
    for block, comp in composition_blocks(f):
        c = comp[:, present].astype(np.float64)
        e = energy[block]
        ok = np.isfinite(e)
        gram += c[ok].T @ c[ok]
        rhs += c[ok].T @ e[ok]
    reference = np.full(N_ELEMENTS, np.nan)
    # lstsq on the normal equations: rank-deficient compositions (e.g. one element ratio
    # throughout) get the minimum-norm solution instead of an error.
    reference[present] = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return reference


def write_statistics(f: h5py.File, extra: dict) -> None:
    """Compute and store the `/stats` group; `extra` adds scalar attributes (e.g. dropped edges)."""
    if S.STATS in f:
        del f[S.STATS]
    g = f.create_group(S.STATS)
    n_structures, n_atoms, n_edges = (int(f.attrs[k]) for k in ("n_structures", "n_atoms", "n_edges"))
    element_counts = np.zeros(N_ELEMENTS, np.int64)
    for start, stop in _blocks(n_atoms, 1 << 22):
        element_counts += np.bincount(f[S.NUMBERS][start:stop], minlength=N_ELEMENTS)
    g.create_dataset("element_counts", data=element_counts, fletcher32=True)
    g.attrs["n_structures"] = n_structures
    g.attrs["n_atoms"] = n_atoms
    g.attrs["n_edges"] = n_edges
    g.attrs["edges_per_atom"] = n_edges / max(n_atoms, 1)
    n_systems = len(np.unique(f[S.SYSTEM_ID].asstr()[:])) if n_structures else 0
    g.attrs["n_systems"] = n_systems
    for key, value in extra.items():
        g.attrs[key] = value

    if S.TARGETS in f:
        targets = f[S.TARGETS][:]
        names = json.loads(f.attrs["target_names"])
        g.create_dataset("targets_mean", data=np.nanmean(targets, axis=0), fletcher32=True)
        g.create_dataset("targets_std", data=np.nanstd(targets, axis=0), fletcher32=True)
        g["targets_mean"].attrs["names"] = json.dumps(names)
        g["targets_std"].attrs["names"] = json.dumps(names)
    if S.ENERGY in f:
        energy = f[S.ENERGY][:]
        per_atom = energy / np.diff(f[S.ATOM_OFFSETS][:])
        g.attrs["energy_per_atom_mean_ev"] = float(np.nanmean(per_atom))
        g.attrs["energy_per_atom_std_ev"] = float(np.nanstd(per_atom))
        g.create_dataset("element_reference_energy_ev", data=element_reference_energies(f, element_counts), fletcher32=True)
    if S.FORCES in f:
        sq, count = 0.0, 0
        for start, stop in _blocks(n_atoms, 1 << 22):
            block = f[S.FORCES][start:stop]
            sq += float(np.square(block).sum())
            count += block.size
        g.attrs["forces_rms_ev_per_angstrom"] = float(np.sqrt(sq / max(count, 1)))
