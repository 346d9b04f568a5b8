"""Symmetry checks for models, in one place (as e3nn's `util/test.py`): example batches,
random rigid motions, permutations, and per-dtype tolerances.

Every backbone test builds its inputs here, so "invariant" and "equivariant" mean the same
thing for every model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import Batch, collate
from molden.pipeline.structure_graphs import build_graphs

# Absolute tolerances per dtype for outputs of order one.
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9}


def example_atoms(kind: str, seed: int = 0):
    """Small ASE systems with EMT energies/forces: "molecule" (no cell), "slab" (pbc x, y; tags
    and fixed atoms as OC20), "bulk" (fully periodic, skewed)."""
    rng = np.random.default_rng(seed)
    if kind == "molecule":
        atoms = molecule("CH3CH2OH")
        atoms.pbc = False
    elif kind == "slab":
        atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
        add_adsorbate(atoms, "O", 1.8, "fcc")
        tags = np.where(atoms.numbers == 8, 2, np.where(atoms.positions[:, 2] > 8.0, 1, 0))
        atoms.set_tags(tags)
        atoms.set_constraint(FixAtoms(mask=tags == 0))
    elif kind == "bulk":
        from ase.build import bulk

        atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
        atoms.set_cell(atoms.cell.array + rng.normal(scale=0.2, size=(3, 3)), scale_atoms=True)
    else:
        raise ValueError(kind)
    atoms.set_tags(atoms.get_tags())  # every kind carries tags, so kinds can share a batch
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = EMT()
    atoms.get_forces()
    return atoms


def example_batch(kinds=("molecule", "slab", "bulk"), *, cutoff: float = 5.0, dtype=torch.float64, seed: int = 0) -> Batch:
    """A collated batch of `kinds`, graphs built at `cutoff` Å."""
    structures = [structure_from_atoms(example_atoms(k, seed + n), system_id=k) for n, k in enumerate(kinds)]
    with_graphs, _ = build_graphs(structures, cutoff)
    return collate(with_graphs, dtype=dtype)


def random_rotation(seed: int = 0, *, reflect: bool = False, dtype=torch.float64) -> torch.Tensor:
    """[3, 3] a random orthogonal matrix with det +1 (or −1 when `reflect`)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) == reflect:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q, dtype=dtype)


def rotated(batch: Batch, rotation: torch.Tensor) -> Batch:
    """The batch turned by `rotation` (positions, cell rows, forces and force inputs: x → R x)."""
    r = rotation.to(batch.positions.dtype)

    def turn(t):
        return None if t is None else t @ r.T

    return replace(
        batch,
        positions=turn(batch.positions),
        cell=batch.cell @ r.T,
        forces=turn(batch.forces),
        relaxed_positions=turn(batch.relaxed_positions),
        force_inputs=turn(batch.force_inputs),
    )


def translated(batch: Batch, shift) -> Batch:
    """Every atom moved by `shift` [3] Å (relaxed positions too)."""
    t = torch.as_tensor(shift, dtype=batch.positions.dtype)
    rp = None if batch.relaxed_positions is None else batch.relaxed_positions + t
    return replace(batch, positions=batch.positions + t, relaxed_positions=rp)


def permutation_within_graphs(batch: Batch, seed: int = 0) -> torch.Tensor:
    """[N] long: new atom k is old atom perm[k]; atoms stay in their own graph (batch sorted)."""
    g = torch.Generator().manual_seed(seed)
    keys = batch.batch.to(torch.float64) + torch.rand(len(batch.batch), generator=g, dtype=torch.float64) * 0.5
    return torch.argsort(keys)


def permuted(batch: Batch, perm: torch.Tensor) -> Batch:
    """The batch with atoms reordered by `perm` (from `permutation_within_graphs`)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    per_atom = {}
    for name in ("positions", "numbers", "batch", "fixed", "tags", "forces", "relaxed_positions", "force_inputs"):
        value = getattr(batch, name)
        per_atom[name] = None if value is None else value[perm]
    edge_index = None if batch.edge_index is None else inverse[batch.edge_index]
    return replace(batch, edge_index=edge_index, **per_atom)
