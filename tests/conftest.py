"""Shared fixtures: small structure files written with ASE, so tests need no downloads."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
import ase.io


def _frames(n: int, seed: int = 0) -> list[Atoms]:
    """A mix of periodic bulk, slabs and molecules with EMT energies and forces."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        kind = k % 3
        if kind == 0:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        elif kind == 1:
            atoms = fcc111("Pt", (2, 2, 3), vacuum=6.0)
            atoms.set_constraint(FixAtoms(indices=list(range(4))))
        else:
            atoms = molecule("CH4")
            atoms.center(vacuum=4.0)
            atoms.pbc = False
        # Every frame carries tags (zeros where ASE built none): a cache keeps only the fields
        # of its first structure, and refuses later structures that have more.
        atoms.set_tags(atoms.get_tags())
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    return frames


@pytest.fixture
def mixed_extxyz(tmp_path):
    """An extxyz file of 30 frames (bulk, slabs, molecules) with energies and forces."""
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, _frames(30))
    return path


@pytest.fixture(scope="session")
def s2ef_cache(tmp_path_factory):
    """A cache of 60 EMT frames (bulk, slabs, molecules) with energies, forces and train/val/test
    splits, graphs at 4 Å: small enough that a training step takes milliseconds."""
    from molden.data.splits import SplitConfig
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    folder = tmp_path_factory.mktemp("s2ef")
    source = folder / "frames.extxyz"
    frames = _frames(60, seed=3)
    for atoms in frames:  # OC20 tags: ASE's layer numbers 1-3 become sub-surface / surface
        atoms.set_tags(np.minimum(atoms.get_tags(), 2) // 2)
    ase.io.write(source, frames)
    out = folder / "s2ef.h5"
    run_preprocess(PreprocessConfig(source="ase", inputs=[source], out=out, cutoff_angstrom=4.0,
                                    split=SplitConfig(val=0.2, test=0.1, group_by="structure")))
    return out


@pytest.fixture(scope="session")
def qm9_cache(tmp_path_factory):
    """The first 400 molecules of QM9 (qm9pack) with 60 validation and 40 test molecules.

    `MOLDEN_TEST_QM9_CACHE=FILE` uses that cache instead, built by this fixture's settings
    elsewhere (`molden preprocess qm9 --limit 400 --val 60 --test 40`): the GPU machine has no
    qm9pack."""
    import importlib.util
    import os
    from pathlib import Path

    if os.environ.get("MOLDEN_TEST_QM9_CACHE"):
        given = Path(os.environ["MOLDEN_TEST_QM9_CACHE"])
        assert given.is_file(), f"MOLDEN_TEST_QM9_CACHE={given}: no such file"
        return given

    if importlib.util.find_spec("qm9pack") is None:  # importing it needs pkg_resources: only locate it
        pytest.skip("qm9pack is not installed (pip install -e '.[qm9]')")
    from molden.data.splits import SplitConfig
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("qm9") / "qm9.h5"
    run_preprocess(PreprocessConfig(source="qm9", out=out, limit=400, split=SplitConfig(val=60, test=40)))
    return out


@pytest.fixture(scope="session")
def emt_cache(tmp_path_factory):
    """8 EMT adsorbate + slab relaxations (every frame, relaxed positions and energies, OC20
    tags, ID/OOD splits), 6 Å graphs."""
    from molden.data.emt import EMTConfig
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    out = tmp_path_factory.mktemp("emt") / "emt.h5"
    run_preprocess(PreprocessConfig(source="emt", out=out, emt=EMTConfig(n_systems=8)))
    return out


@pytest.fixture
def keep_torch_threads():
    """Restores torch's thread count after a test that sets it process-wide (the benchmarks)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
