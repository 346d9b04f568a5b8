"""Per-dataset statistics written into the cache when it is finalised.

Counts, the element histogram, target mean/std, energy per atom, forces RMS and per-element
reference energies (least squares of total energy on composition, as MACE's E0s / Noisy Nodes
§5.2 "fixed per atom energy from linear regression"). Computed by streaming the file in blocks,
so memory stays bounded and a resumed write gets the same numbers as an uninterrupted one.

What a model is normalised or offset with (targets, energies, forces) is fitted on the "train"
split only, so validation and test data never leak into training; a cache without a train
split fits them on all structures. `/stats` records which (`fitted_on`). Counts and the element
histogram describe the whole file.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from molden.data import h5_schema as S

N_ELEMENTS = 119  # index = atomic number
BLOCK_STRUCTURES = 65536
TRAIN_SPLIT = "train"
ALL_STRUCTURES = "all"


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


def fitted_structures(f: h5py.File) -> tuple[np.ndarray, str]:
    """[S] bool mask of the structures statistics are fitted on, and what it is: the "train"
    split, or "all" structures when the cache has no train split (`structures/split` and the
    `split_names` attribute must already be final)."""
    names = json.loads(f.attrs["split_names"])
    codes = f[S.SPLIT_CODE][:]
    if TRAIN_SPLIT in names:
        train = codes == names.index(TRAIN_SPLIT)
        if train.any():
            return train, TRAIN_SPLIT
    return np.ones(len(codes), dtype=bool), ALL_STRUCTURES


def element_reference_energies(f: h5py.File, element_counts: np.ndarray, fit: np.ndarray | None = None,
                               offset: np.ndarray | None = None) -> np.ndarray:
    """[119] eV per atom of each element fitted to the total energies of the structures in `fit`
    ([S] bool, default all), less `offset` ([S] eV) where given; NaN for elements absent from
    them."""
    if fit is None:
        fit = np.ones(int(f.attrs["n_structures"]), dtype=bool)
    present = np.flatnonzero(element_counts)  # of the whole file; narrowed to `fit` below
    gram = np.zeros((len(present), len(present)))
    rhs = np.zeros(len(present))
    energy = f[S.ENERGY]
    for block, comp in composition_blocks(f):
        e = energy[block] if offset is None else energy[block] - offset[block]
        ok = np.isfinite(e) & fit[block]
        c = comp[ok][:, present].astype(np.float64)
        gram += c.T @ c
        rhs += c.T @ e[ok]
    fitted = np.diag(gram) > 0  # the element occurs in a fitted structure
    reference = np.full(N_ELEMENTS, np.nan)
    # lstsq on the normal equations: rank-deficient compositions (e.g. one element ratio
    # throughout) get the minimum-norm solution instead of an error.
    reference[present[fitted]] = np.linalg.lstsq(gram[np.ix_(fitted, fitted)], rhs[fitted], rcond=None)[0]
    return reference


def energy_residual_std(f: h5py.File, reference: np.ndarray, fit: np.ndarray, offset: np.ndarray | None = None) -> float:
    """Standard deviation (eV) over the structures in `fit` of the energy (less `offset`, [S] eV,
    where given) left once the per-element `reference` energies ([119] eV, NaN for absent
    elements) are subtracted: the spread of the labels an energy head that adds those references
    learns (DeNS Eq. 1's σ_E, with the references in the place of its mean μ_E)."""
    reference = np.nan_to_num(np.asarray(reference, dtype=np.float64))
    energy = f[S.ENERGY]
    total, total_sq, count = 0.0, 0.0, 0
    for block, comp in composition_blocks(f):
        e = energy[block] if offset is None else energy[block] - offset[block]
        ok = np.isfinite(e) & fit[block]
        residual = e[ok] - comp[ok] @ reference
        total += float(residual.sum())
        total_sq += float(np.square(residual).sum())
        count += int(ok.sum())
    if count == 0:
        return float("nan")
    mean = total / count
    return float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def referenced_energy_statistics(f: h5py.File, offset: np.ndarray) -> dict[str, np.ndarray | float]:
    """The energy statistics of `write_statistics` (per-element references and the spread left
    after them) for the energies less `offset` ([S] eV: OC20 S2EF's `reference_energy`, when a
    model learns `energy − reference_energy`), fitted on the same structures."""
    fit, _ = fitted_structures(f)
    reference = element_reference_energies(f, f[S.STATS]["element_counts"][:], fit, offset=offset)
    return {"element_reference_energy_ev": reference,
            "energy_residual_std_ev": energy_residual_std(f, reference, fit, offset=offset)}


def _forces_rms(f: h5py.File, fit: np.ndarray) -> float:
    """RMS of the force components of the atoms of the structures in `fit`, eV/Å."""
    offsets = f[S.ATOM_OFFSETS][:]
    sq, count = 0.0, 0
    for start, stop in _blocks(len(offsets) - 1):
        keep = np.repeat(fit[start:stop], np.diff(offsets[start : stop + 1]))
        if keep.any():
            block = f[S.FORCES][offsets[start] : offsets[stop]][keep]
            sq += float(np.square(block).sum())
            count += block.size
    return float(np.sqrt(sq / max(count, 1)))


def write_statistics(f: h5py.File, extra: dict) -> None:
    """Compute and store the `/stats` group; `extra` adds scalar attributes (e.g. dropped edges).

    Splits must be final: target, energy and force statistics are fitted on the train split.
    """
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

    fit, fitted_on = fitted_structures(f)
    g.attrs["fitted_on"] = fitted_on
    g.attrs["n_structures_fitted"] = int(fit.sum())
    if S.TARGETS in f:
        targets = f[S.TARGETS][:][fit]
        names = json.loads(f.attrs["target_names"])
        g.create_dataset("targets_mean", data=np.nanmean(targets, axis=0), fletcher32=True)
        g.create_dataset("targets_std", data=np.nanstd(targets, axis=0), fletcher32=True)
        g["targets_mean"].attrs["names"] = json.dumps(names)
        g["targets_std"].attrs["names"] = json.dumps(names)
    if S.ENERGY in f:
        energy = f[S.ENERGY][:]
        per_atom = (energy / np.diff(f[S.ATOM_OFFSETS][:]))[fit]
        g.attrs["energy_per_atom_mean_ev"] = float(np.nanmean(per_atom))
        g.attrs["energy_per_atom_std_ev"] = float(np.nanstd(per_atom))
        references = element_reference_energies(f, element_counts, fit)
        g.create_dataset("element_reference_energy_ev", data=references, fletcher32=True)
        g.attrs["energy_residual_std_ev"] = energy_residual_std(f, references, fit)
    if S.FORCES in f:
        g.attrs["forces_rms_ev_per_angstrom"] = _forces_rms(f, fit)
