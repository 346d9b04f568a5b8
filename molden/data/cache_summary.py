"""What `molden inspect` shows about a cache, as one plain model (printable or JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols
from pydantic import BaseModel

from molden.data import h5_schema as S
from molden.data.h5_dataset import damaged_metadata, open_cache
from molden.errors import MoldenInputError


class CacheSummary(BaseModel):
    path: Path
    size_bytes: int
    source: str
    cutoff_angstrom: float
    max_num_neighbors: int | None
    molden_version: str
    schema_version: int
    created: str
    n_structures: int
    n_systems: int
    n_atoms: int
    n_edges: int
    edges_per_atom: float
    fields: list[str]
    element_histogram: dict[str, int]
    splits: dict[str, int]
    targets: dict[str, dict[str, float]]
    energy_per_atom_mean_ev: float | None = None
    energy_per_atom_std_ev: float | None = None
    forces_rms_ev_per_angstrom: float | None = None
    edges_dropped_by_max_neighbors: int = 0
    isolated_atoms: int = 0
    statistics_fitted_on: str = "all"
    """Split the target, energy and force statistics were fitted on ("train", or "all")."""


def summarize_cache(path: str | Path) -> CacheSummary:
    """Counts, element histogram, splits, sizes and provenance of a cache file.

    Reads metadata only; `molden.data.cache_verify.verify_cache` reads (and checks) the arrays.
    """
    path = Path(path)
    with open_cache(path) as f:
        try:
            return _summarize(f, path)
        except (OSError, KeyError) as error:  # damaged attributes or layout
            raise MoldenInputError(path, damaged_metadata(path, error)) from None


def _summarize(f, path: Path) -> CacheSummary:
    stats = f[S.STATS]
    counts = stats["element_counts"][:]
    histogram = {chemical_symbols[z]: int(counts[z]) for z in np.flatnonzero(counts)}
    targets = {}
    if "targets_mean" in stats:
        names = json.loads(stats["targets_mean"].attrs["names"])
        for name, mean, std in zip(names, stats["targets_mean"][:], stats["targets_std"][:]):
            targets[name] = {"mean": float(mean), "std": float(std)}
    max_nn = int(f.attrs["max_num_neighbors"])

    def stat(name: str):
        return float(stats.attrs[name]) if name in stats.attrs else None

    return CacheSummary(
        path=path,
        size_bytes=path.stat().st_size,
        source=str(f.attrs["source"]),
        cutoff_angstrom=float(f.attrs["cutoff_angstrom"]),
        max_num_neighbors=None if max_nn < 0 else max_nn,
        molden_version=str(f.attrs["molden_version"]),
        schema_version=int(f.attrs["schema_version"]),
        created=str(f.attrs["created"]),
        n_structures=int(stats.attrs["n_structures"]),
        n_systems=int(stats.attrs["n_systems"]),
        n_atoms=int(stats.attrs["n_atoms"]),
        n_edges=int(stats.attrs["n_edges"]),
        edges_per_atom=float(stats.attrs["edges_per_atom"]),
        fields=["numbers", "positions", "cell", "pbc", "fixed"] + json.loads(f.attrs["optional_fields"]),
        element_histogram=histogram,
        splits={name: len(f[S.SPLITS][name]) for name in json.loads(f.attrs["split_names"])},
        targets=targets,
        energy_per_atom_mean_ev=stat("energy_per_atom_mean_ev"),
        energy_per_atom_std_ev=stat("energy_per_atom_std_ev"),
        forces_rms_ev_per_angstrom=stat("forces_rms_ev_per_angstrom"),
        edges_dropped_by_max_neighbors=int(stats.attrs.get("edges_dropped_by_max_neighbors", 0)),
        isolated_atoms=int(stats.attrs.get("isolated_atoms", 0)),
        statistics_fitted_on=str(stats.attrs.get("fitted_on", "all")),
    )
