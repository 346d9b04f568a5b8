"""`molden.ase.MoldenCalculator` (issue 15): forces are the energy's gradient (ASE's own
finite-difference check), every ASE optimiser runs with it, and `atoms.pbc` is honoured."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.fd import calculate_numerical_forces
from ase.optimize import BFGS
from typer.testing import CliRunner

from molden.ase import MoldenCalculator
from molden.cli import train as train_cli

import typer


@pytest.fixture(scope="module")
def conservative_checkpoint(s2ef_cache, tmp_path_factory):
    app = typer.Typer()
    app.command()(train_cli.finetune)
    app.command()(train_cli.pretrain)
    out = tmp_path_factory.mktemp("runs") / "conservative"
    result = CliRunner().invoke(app, ["finetune", "--data", str(s2ef_cache), "--out", str(out), "--task", "s2ef",
                                      "--model", "painn_cpu", "--change", "cutoff_angstrom=4.0", "--conservative-forces",
                                      "--steps", "3", "--max-graphs", "8", "--eval-every", "3", "--warmup-steps", "1"])
    assert result.exit_code == 0, result.output
    return out / "best.pt"


def _slab():
    from molden.data.emt import EMTConfig, build_slab

    return build_slab("Cu", "111", EMTConfig(slab_size=(2, 2), n_layers=3))


def test_forces_are_minus_the_gradient_of_the_energy(conservative_checkpoint):
    atoms = _slab()
    atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = MoldenCalculator(conservative_checkpoint)
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), numerical, atol=1e-6)


def test_an_ase_optimiser_lowers_the_energy_and_leaves_fixed_atoms(conservative_checkpoint):
    atoms = _slab()
    atoms.positions += np.random.default_rng(1).normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = MoldenCalculator(conservative_checkpoint)
    start, fixed = atoms.get_potential_energy(), atoms.constraints[0].index
    before = atoms.positions[fixed].copy()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=20)
    assert atoms.get_potential_energy() < start
    np.testing.assert_array_equal(atoms.positions[fixed], before)


def test_the_calculator_honours_atoms_pbc(conservative_checkpoint):
    atoms = molecule("CO")
    atoms.set_cell([3.0, 3.0, 3.0])  # periodic images within the 4 Å cutoff
    atoms.calc = MoldenCalculator(conservative_checkpoint)
    atoms.pbc = False
    isolated = atoms.get_potential_energy()
    atoms.pbc = (True, True, False)
    slab_like = atoms.get_potential_energy()
    atoms.pbc = True
    bulk = atoms.get_potential_energy()
    assert len({round(isolated, 9), round(slab_like, 9), round(bulk, 9)}) == 3


def test_the_model_provider_returns_detached_tensors(conservative_checkpoint):
    """A relaxer keeps forces across steps; an attached autograd graph would grow with every
    step until memory runs out (torch-sim #559)."""
    from molden.data.ase_convert import structure_from_atoms
    from molden.data.batch import collate
    from molden.models.checkpoint import load_model
    from molden.relax.providers import ModelProvider

    provider = ModelProvider(load_model(conservative_checkpoint))
    energy, forces = provider(collate([structure_from_atoms(_slab())]))
    assert not energy.requires_grad and not forces.requires_grad
    assert energy.grad_fn is None and forces.grad_fn is None


@pytest.mark.parametrize("edges_per_call", [1, 300])
def test_the_model_provider_in_runs_of_structures_gives_the_whole_batchs_numbers(conservative_checkpoint, edges_per_call):
    """On a CPU the provider runs the model on a few structures at a time (cache-sized);
    energies and forces must not depend on the split, and a structure larger than the budget
    still runs (alone)."""
    import torch

    from molden.data.ase_convert import structure_from_atoms
    from molden.data.batch import collate
    from molden.models.checkpoint import load_model
    from molden.objectives.noise import with_positions
    from molden.relax.providers import ModelProvider, structure_runs

    rng = np.random.default_rng(2)
    systems = []
    for k in range(5):
        atoms = _slab() if k % 2 else molecule("CH3CH2OH")
        if not k % 2:
            atoms.set_tags(np.full(len(atoms), 2))  # an adsorbate-like molecule: OC20 tag 2
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        systems.append(structure_from_atoms(atoms, system_id=f"s{k}"))
    batch = collate(systems, dtype=torch.float64)
    loaded = load_model(conservative_checkpoint, dtype=torch.float64)
    whole = ModelProvider(loaded, edges_per_call=None)(batch)
    chunked_provider = ModelProvider(loaded, edges_per_call=edges_per_call)
    graphed = with_positions(batch, batch.positions, cutoff_angstrom=chunked_provider.cutoff_angstrom)
    assert len(structure_runs(graphed, edges_per_call)) == (5 if edges_per_call == 1 else 3)
    chunked = chunked_provider(batch)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def _moving_systems(n: int, seed: int):
    from molden.data.ase_convert import structure_from_atoms

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        atoms = _slab() if k % 2 else molecule("CH3CH2OH")
        if not k % 2:
            atoms.set_tags(np.full(len(atoms), 2))
        atoms.positions += rng.normal(scale=0.15, size=atoms.positions.shape)
        out.append(structure_from_atoms(atoms, system_id=f"s{k}"))
    return out


def test_a_relaxation_with_verlet_lists_follows_the_one_searched_at_every_step(conservative_checkpoint):
    """The skin changes which searches run, not the pairs: the same path, to float rounding
    (edges come in another order), with fewer searches; and systems queued behind a batch of 2
    enter and leave it."""
    import torch

    from molden.models.checkpoint import load_model
    from molden.relax.driver import relax
    from molden.relax.providers import ModelProvider

    structures = _moving_systems(5, seed=3)
    loaded = load_model(conservative_checkpoint, dtype=torch.float64)
    every_step, verlet = ModelProvider(loaded, skin_angstrom=0.0), ModelProvider(loaded, skin_angstrom=0.4)
    a = relax(structures, every_step, method="lbfgs", fmax_ev_per_angstrom=1e-3, max_steps=25, batch_size=2)
    b = relax(structures, verlet, method="lbfgs", fmax_ev_per_angstrom=1e-3, max_steps=25, batch_size=2)
    for x, y in zip(a, b):
        assert x.steps == y.steps
        np.testing.assert_allclose(x.positions, y.positions, rtol=0, atol=1e-8)
        assert abs(x.energy_ev - y.energy_ev) < 1e-9
    moved = max(np.abs(x.positions - s.positions).max() for x, s in zip(a, structures))
    assert moved > 0.2  # far enough that some lists had to be searched again
    assert verlet.graph.calls == every_step.graph.calls
    assert 5 < verlet.graph.built < every_step.graph.built / 2


def test_molecular_dynamics_with_the_calculators_verlet_lists(conservative_checkpoint):
    """ASE's Velocity Verlet with the calculator's Verlet lists: the trajectory of searching
    at every step, with fewer searches."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    runs = {}
    for skin in (0.0, 0.3):
        atoms = _slab()
        del atoms.constraints
        # about 3,000 K of random velocities, Å/fs
        atoms.set_velocities(np.random.default_rng(4).normal(scale=0.05, size=atoms.positions.shape))
        atoms.calc = MoldenCalculator(conservative_checkpoint, skin_angstrom=skin)
        start = atoms.positions.copy()
        VelocityVerlet(atoms, timestep=2 * units.fs).run(30)
        runs[skin] = (atoms.positions.copy(), atoms.get_total_energy(), atoms.calc.provider.graph)
    (fresh, energy_fresh, every_step), (kept, energy_kept, verlet) = runs[0.0], runs[0.3]
    assert np.abs(fresh - start).max() > 0.3  # atoms moved beyond the skin: lists were searched again
    np.testing.assert_allclose(kept, fresh, rtol=0, atol=1e-8)
    assert abs(energy_kept - energy_fresh) < 1e-8
    assert 1 < verlet.built < every_step.built / 2


def test_a_force_only_model_warns_once_that_its_energies_mean_nothing(s2ef_cache, tmp_path):
    """ForceNet's training (energy weight 0) leaves the energy head untrained: the calculator
    still gives ASE an energy (its optimisers log it) but warns, once; a model trained on
    energy does not warn."""
    import warnings

    app = typer.Typer()
    app.command()(train_cli.finetune)
    app.command()(train_cli.pretrain)
    for coefficient in ("0", "1"):
        out = tmp_path / f"e{coefficient}"
        result = CliRunner().invoke(app, ["finetune", "--data", str(s2ef_cache), "--out", str(out), "--task", "s2ef",
                                          "--model", "painn_cpu", "--change", "cutoff_angstrom=4.0",
                                          "--energy-coefficient", coefficient, "--steps", "1", "--max-graphs", "8",
                                          "--eval-every", "1"])
        assert result.exit_code == 0, result.output
        atoms = _slab()
        atoms.calc = MoldenCalculator(out / "best.pt")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            atoms.get_forces()
            atoms.positions[0, 0] += 0.01
            atoms.get_potential_energy()
        mine = [w for w in caught if "trained on forces only" in str(w.message)]
        assert len(mine) == (1 if coefficient == "0" else 0)
