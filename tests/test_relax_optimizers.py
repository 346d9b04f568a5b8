"""Batched L-BFGS and FIRE against ASE's own (issue 15 acceptance): on EMT slab + adsorbate
systems they reach the same minima (energies within 1 meV, positions within 0.01 Å) in the same
number of steps, alone and all in one batch, fixed atoms unmoved.

A relaxation can be chaotic: for some systems ASE itself, started 1e-10 Å away, ends in another
minimum (CO on Au(111) below moves 1.3 Å). Float rounding, which differs between any two
implementations, decides those; the parity is checked on the systems whose ASE minimum is
stable to such a nudge, and the test requires most of them to be."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.optimize import FIRE, LBFGS

from molden.data.ase_convert import structure_from_atoms
from molden.data.emt import EMTConfig, build_slab
from molden.data.adsorbates import place_adsorbate
from molden.relax.driver import relax
from molden.relax.optimizers import FIRESettings, LBFGSSettings
from molden.relax.providers import ASECalculatorProvider

N_SYSTEMS = 20
FMAX = 0.05
MAX_STEPS = 300  # OC20's IS2RS budget


def _systems(n: int):
    """`n` unrelaxed EMT slab + adsorbate systems of several metals, facets and adsorbates."""
    config = EMTConfig(slab_size=(2, 2), n_layers=3)
    metals, facets, adsorbates = ("Cu", "Pt", "Ag", "Ni", "Au"), ("111", "100"), ("O", "H", "CO", "N", "OH")
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        slab = build_slab(metals[k % 5], facets[k % 2], config)
        out.append(place_adsorbate(slab, adsorbates[(k // 2) % 5], rng))
    return out


def _ase_relax(atoms, method: str, nudge_angstrom: float = 0.0):
    atoms = atoms.copy()
    free = ~np.isin(np.arange(len(atoms)), atoms.constraints[0].index)
    atoms.positions += np.random.default_rng(1).normal(scale=nudge_angstrom, size=atoms.positions.shape) * free[:, None]
    atoms.calc = EMT()
    opt = LBFGS(atoms, logfile=None) if method == "lbfgs" else FIRE(atoms, logfile=None)
    opt.run(fmax=FMAX, steps=MAX_STEPS)
    return atoms.positions.copy(), atoms.get_potential_energy(), opt.nsteps


@pytest.fixture(scope="module")
def systems():
    return _systems(N_SYSTEMS)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lbfgs", "fire"])
def test_batched_optimisers_reach_ases_minima_alone_and_in_one_batch(systems, method):
    reference = [_ase_relax(atoms, method) for atoms in systems]
    nudged = [_ase_relax(atoms, method, nudge_angstrom=1e-10) for atoms in systems]
    stable = [k for k in range(len(systems)) if np.abs(reference[k][0] - nudged[k][0]).max() < 1e-4]
    assert len(stable) >= N_SYSTEMS - 2, f"only {len(stable)} of {N_SYSTEMS} relaxations are well conditioned"
    structures = [structure_from_atoms(atoms) for atoms in systems]
    provider = ASECalculatorProvider()
    exact = dict(method=method, fmax_ev_per_angstrom=FMAX, max_steps=MAX_STEPS, lbfgs=LBFGSSettings(curvature_guard=False))
    together = relax(structures, provider, batch_size=N_SYSTEMS, **exact)
    queued = relax(structures, provider, batch_size=3, **exact)
    alone = {k: relax([structures[k]], provider, **exact)[0] for k in stable[:4]}
    for k in stable:
        positions, energy, steps = reference[k]
        for result in (together[k], queued[k]) + ((alone[k],) if k in alone else ()):
            assert result.steps == steps, (k, result.steps, steps)
            assert abs(result.energy_ev - energy) < 1e-3, k
            assert np.abs(result.positions - positions).max() < 0.01, k
        assert together[k].converged == (steps < MAX_STEPS)
    for k, result in enumerate(together):  # every structure, well conditioned or not
        fixed = structures[k].fixed
        np.testing.assert_array_equal(result.positions[fixed], structures[k].positions[fixed])
    # The batch does not change a structure's path beyond float rounding.
    for k, result in alone.items():
        np.testing.assert_allclose(together[k].positions, result.positions, atol=1e-9)
        assert together[k].steps == result.steps


def test_settings_follow_ases_defaults():
    import inspect

    lbfgs = inspect.signature(LBFGS.__init__).parameters
    assert (LBFGSSettings().memory, LBFGSSettings().damping, LBFGSSettings().alpha_ev_per_angstrom2) == (
        lbfgs["memory"].default, lbfgs["damping"].default, lbfgs["alpha"].default)
    assert LBFGSSettings().maxstep_angstrom == LBFGS.defaults["maxstep"]
    fire = inspect.signature(FIRE.__init__).parameters
    s = FIRESettings()
    assert (s.dt, s.dtmax, s.n_min, s.finc, s.fdec, s.astart, s.fa, s.a) == tuple(
        fire[k].default for k in ("dt", "dtmax", "Nmin", "finc", "fdec", "astart", "fa", "a"))
    assert s.maxstep_angstrom == FIRE.defaults["maxstep"]


def test_lbfgs_skips_pairs_of_negative_curvature_and_stays_finite():
    """On a concave surface (E = −k|x|²/2, forces +k x) y·s < 0: the guard does not store the
    pair, so the inverse-Hessian estimate stays positive definite and the step bounded."""
    import torch

    from molden.relax.optimizers import BatchedLBFGS

    optimizer = BatchedLBFGS(1, 2, LBFGSSettings(curvature_guard=True))
    positions = torch.tensor([[[0.1, 0.0, 0.0], [0.0, -0.2, 0.0]]], dtype=torch.float64)
    active = torch.tensor([True])
    for _ in range(5):
        positions = optimizer.step(positions, 2.0 * positions, active)
        assert torch.isfinite(positions).all()
    assert int(optimizer.count[0]) == 0  # no pair stored
    step = (optimizer.step(positions, 2.0 * positions, active) - positions).norm(dim=2).max()
    assert float(step) <= LBFGSSettings().maxstep_angstrom + 1e-12


@pytest.mark.slow
def test_the_curvature_guard_converges_where_ases_lbfgs_stalls(systems):
    """System 9 (`LBFGSSettings.curvature_guard`): ASE's L-BFGS stores negative-curvature pairs and is
    unconverged after 300 steps; the guarded one converges to fmax."""
    structure = structure_from_atoms(systems[9])
    positions, _, ase_steps = _ase_relax(systems[9], "lbfgs")
    guarded = relax([structure], ASECalculatorProvider(), method="lbfgs", fmax_ev_per_angstrom=FMAX, max_steps=MAX_STEPS)[0]
    assert ase_steps == MAX_STEPS and guarded.converged and guarded.steps < MAX_STEPS


def test_the_second_step_is_the_bfgs_update_of_the_chosen_initial_guess():
    """On E = Σ k_i (x_i − x*_i)²/2 (stiffness differing by component), the step after one
    curvature pair (s, y) is −H g with H = (I − ρ s yᵀ) H0 (I − ρ y sᵀ) + ρ s sᵀ, ρ = 1/(y·s)
    (Nocedal & Wright eq. 6.17) written as a 6×6 matrix: H0 = I/α for the fixed guess and
    (s·y / y·y) I for the scaled one (eq. 7.20)."""
    import torch

    from molden.relax.optimizers import BatchedLBFGS

    k = torch.tensor([[[5.0, 1.0, 12.0], [3.0, 8.0, 0.5]]], dtype=torch.float64)
    minimum = torch.tensor([[[0.3, -0.1, 0.05], [0.0, 0.2, -0.1]]], dtype=torch.float64)
    start = torch.tensor([[[0.28, -0.08, 0.06], [0.01, 0.17, -0.08]]], dtype=torch.float64)
    active = torch.tensor([True])

    def forces(x):
        return -k * (x - minimum)

    for guess in ("fixed", "scaled"):
        settings = LBFGSSettings(initial_inverse_hessian=guess, maxstep_angstrom=10.0)
        optimizer = BatchedLBFGS(1, 2, settings)
        first = optimizer.step(start, forces(start), active)
        second = optimizer.step(first, forces(first), active)
        s_, y_ = (first - start).flatten(), (forces(start) - forces(first)).flatten()
        rho = 1.0 / (y_ @ s_)
        h0 = 1.0 / settings.alpha_ev_per_angstrom2 if guess == "fixed" else float((s_ @ y_) / (y_ @ y_))
        eye = torch.eye(6, dtype=torch.float64)
        h = (eye - rho * torch.outer(s_, y_)) @ (h0 * eye) @ (eye - rho * torch.outer(y_, s_)) + rho * torch.outer(s_, s_)
        expected = first.flatten() + h @ forces(first).flatten()
        np.testing.assert_allclose(second.flatten().numpy(), expected.numpy(), rtol=0, atol=1e-14)


def test_the_scaled_guess_starts_from_one_over_alpha_and_keeps_each_structures_curvature():
    """Before a structure has a curvature pair its guess is 1/α; after, each slot's γ is its own
    (two slots on quadratics of different stiffness k get γ = 1/k each, not a shared value)."""
    import torch

    from molden.relax.optimizers import BatchedLBFGS

    stiffness = torch.tensor([2.0, 40.0], dtype=torch.float64)[:, None, None]
    optimizer = BatchedLBFGS(2, 1, LBFGSSettings(initial_inverse_hessian="scaled"))
    positions = torch.tensor([[[0.05, 0.0, 0.0]], [[0.0, 0.03, 0.0]]], dtype=torch.float64)
    active = torch.tensor([True, True])
    first = optimizer.step(positions, -stiffness * positions, active)
    np.testing.assert_allclose((first - positions).numpy(), (stiffness * positions / 70.0).numpy() * -1, atol=1e-15)
    optimizer.step(first, -stiffness * first, active)  # stores each slot's first pair
    guess = optimizer.initial_inverse_hessian()
    np.testing.assert_allclose(guess.numpy(), 1.0 / stiffness.flatten().numpy(), rtol=1e-12)


@pytest.mark.slow
def test_the_scaled_guess_converges_every_system_in_fewer_steps_and_the_batch_does_not_change_a_path(systems):
    """On the 20 EMT systems the scaled guess converges every one to fmax in fewer steps in all
    than ASE's fixed guess, fixed atoms unmoved; alone, queued or in one batch, each structure
    takes the same steps to the same positions."""
    structures = [structure_from_atoms(atoms) for atoms in systems]
    provider = ASECalculatorProvider()
    scaled = dict(method="lbfgs", fmax_ev_per_angstrom=FMAX, max_steps=MAX_STEPS,
                  lbfgs=LBFGSSettings(initial_inverse_hessian="scaled"))
    together = relax(structures, provider, batch_size=N_SYSTEMS, **scaled)
    queued = relax(structures, provider, batch_size=3, **scaled)
    fixed_steps = [relax([s], provider, method="lbfgs", fmax_ev_per_angstrom=FMAX, max_steps=MAX_STEPS)[0].steps
                   for s in structures]
    assert all(r.converged for r in together)
    assert sum(r.steps for r in together) < 0.75 * sum(fixed_steps)
    for k in range(4):
        alone = relax([structures[k]], provider, **scaled)[0]
        for other in (together[k], queued[k]):
            assert other.steps == alone.steps
            np.testing.assert_allclose(other.positions, alone.positions, atol=1e-9)
    for structure, result in zip(structures, together):
        np.testing.assert_array_equal(result.positions[structure.fixed], structure.positions[structure.fixed])


def _bfgs_step(pairs, h0: float, forces):
    """The L-BFGS step from the pairs (s, y) oldest first, as the matrix recursion
    H ← Vᵀ H V + ρ s sᵀ, V = I − ρ y sᵀ (Nocedal & Wright eq. 7.19), from H0 = h0 I."""
    import torch

    n = forces.numel()
    h = h0 * torch.eye(n, dtype=torch.float64)
    for s_, y_ in pairs:
        rho = 1.0 / (y_ @ s_)
        v = torch.eye(n, dtype=torch.float64) - rho * torch.outer(y_, s_)
        h = v.T @ h @ v + rho * torch.outer(s_, s_)
    return h @ forces.flatten()


def test_the_scaled_guess_uses_the_newest_pair_of_a_full_ring_and_a_reset_slot_starts_again():
    """Memory 2, two slots, steps on an anisotropic quadratic: once the ring has wrapped, each
    step is still the BFGS update of the two newest pairs from γ of the newest (not the oldest,
    not a stale one). Then slot 0 is reset while slot 1 keeps its history: slot 0's next step
    is F/α again (its ring still holds the old pairs), slot 1's goes on from its own."""
    import torch

    from molden.relax.optimizers import BatchedLBFGS

    k = torch.tensor([[5.0, 1.0, 12.0], [3.0, 8.0, 0.5]], dtype=torch.float64)
    minimum = torch.tensor([[0.3, -0.1, 0.05], [0.0, 0.2, -0.1]], dtype=torch.float64)

    def forces(x):
        return -k * (x - minimum)

    settings = LBFGSSettings(initial_inverse_hessian="scaled", memory=2, maxstep_angstrom=10.0)
    optimizer = BatchedLBFGS(2, 2, settings)
    positions = torch.stack([minimum + 0.05, minimum - torch.tensor([0.02, 0.04, 0.01], dtype=torch.float64)])
    active = torch.tensor([True, True])
    visited: list[list] = [[], []]  # the positions each slot was given since it (re)started

    def expected_step(slot: int, x):
        xs = visited[slot]
        pairs = [((xs[i] - xs[i - 1]).flatten(), (forces(xs[i - 1]) - forces(xs[i])).flatten())
                 for i in range(1, len(xs))][-settings.memory:]
        if not pairs:
            return (forces(x) / settings.alpha_ev_per_angstrom2).flatten()
        s_new, y_new = pairs[-1]
        return _bfgs_step(pairs, float((s_new @ y_new) / (y_new @ y_new)), forces(x))

    for step in range(6):
        if step == 5:
            optimizer.reset(torch.tensor([0]))
            visited[0] = []
        for slot in (0, 1):
            visited[slot].append(positions[slot])
        moved = optimizer.step(positions, forces(positions), active)
        for slot in (0, 1):
            np.testing.assert_allclose((moved[slot] - positions[slot]).flatten().numpy(),
                                       expected_step(slot, positions[slot]).numpy(), rtol=0, atol=1e-13)
        positions = moved
    assert len(visited[1]) == 6 and len(visited[0]) == 1  # slot 1 wrapped its ring twice; slot 0 restarted


def _two_loop(pairs, h0: float, g: np.ndarray) -> np.ndarray:
    """H g by the two-loop recursion over the pairs (s, y) oldest first, as ASE's `LBFGS.step`
    writes it (ρ = 1/(y·s) whatever its sign)."""
    q, a = g.copy(), []
    for s_, y_ in reversed(pairs):
        a.append((s_ @ q) / (y_ @ s_))
        q = q - a[-1] * y_
    z = h0 * q
    for (s_, y_), a_ in zip(pairs, reversed(a)):
        z = z + s_ * (a_ - (y_ @ z) / (y_ @ s_))
    return z


@pytest.mark.parametrize("guess", ["fixed", "scaled"])
@pytest.mark.parametrize(("memory", "resets"), [(4, {7: [2]}), (6, {4: [0], 9: [0, 1, 2]})])
def test_the_compact_step_is_the_two_loop_recursion_at_every_depth_wrap_and_reset(guess, memory, resets):
    """Three slots on separable quartic wells (curvature changing along the path, so pairs
    differ and some have y·s < 0 with the guard off): every step of every slot equals ASE's
    two-loop recursion over the pairs that slot stored since it (re)started, through the ring's
    wrap, an idle slot, a reset of one slot mid-run, and (memory 6) a reset of every slot after
    one ring wrapped, which shrinks the depth the step reads (`calls_since_reset`)."""
    import torch

    from molden.relax.optimizers import BatchedLBFGS

    rng = np.random.default_rng(3)
    k = rng.uniform(0.5, 8.0, size=(3, 4, 3))
    minimum = rng.normal(scale=0.1, size=(3, 4, 3))

    def forces(x):
        d = x - minimum
        return -(k * d + 40.0 * d**3) + 3.0 * np.sin(5.0 * d)  # concave near d = 0: y·s < 0 happens

    settings = LBFGSSettings(memory=memory, maxstep_angstrom=10.0, curvature_guard=False, initial_inverse_hessian=guess)
    optimizer = BatchedLBFGS(3, 4, settings)
    x = minimum + rng.normal(scale=0.1, size=minimum.shape)
    visited: list[list[np.ndarray]] = [[], [], []]
    negative_curvature = 0
    for step in range(14):
        active = np.array([True, step % 3 != 1, True])  # slot 1 sits out every third step
        if step in resets:
            optimizer.reset(resets[step])
            for b in resets[step]:
                visited[b] = []
        f = forces(x)
        moved = optimizer.step(torch.from_numpy(x), torch.from_numpy(f), torch.from_numpy(active)).numpy()
        for b in range(3):
            if not active[b]:
                np.testing.assert_array_equal(moved[b], x[b])
                continue
            visited[b].append((x[b].ravel().copy(), f[b].ravel().copy()))
            pairs = [(xs - xp, fp - fs) for (xp, fp), (xs, fs) in zip(visited[b][:-1], visited[b][1:])][-settings.memory:]
            negative_curvature += bool(pairs) and pairs[-1][0] @ pairs[-1][1] < 0
            h0 = 1.0 / settings.alpha_ev_per_angstrom2
            if guess == "scaled" and pairs and pairs[-1][0] @ pairs[-1][1] > 0:
                h0 = (pairs[-1][0] @ pairs[-1][1]) / (pairs[-1][1] @ pairs[-1][1])
            expected = _two_loop(pairs, h0, -f[b].ravel())
            np.testing.assert_allclose((x[b] - moved[b]).ravel(), expected, rtol=1e-9, atol=1e-13)
        x = moved
    assert negative_curvature > 0  # the case ASE stores and the guard would not
    last_reset = [max([k for k, slots in resets.items() if b in slots], default=0) for b in range(3)]
    assert optimizer.calls_since_reset.tolist() == [14 - k for k in last_reset]  # the depth bound follows resets


def test_the_lbfgs_step_reads_nothing_back_and_launches_as_many_kernels_at_any_depth():
    """A GPU step costs launches: the step's aten ops (views aside) are as many with 1 stored
    pair as with 50, and none of them waits for the device (nonzero, item, boolean masks)."""
    import torch

    from molden.bench.optimizer_step import READ, _OperatorCounter
    from molden.relax.optimizers import BatchedLBFGS

    memory = 50
    optimizer = BatchedLBFGS(4, 5, LBFGSSettings(memory=memory, maxstep_angstrom=0.04))
    stiffness = torch.linspace(1.0, 9.0, 60, dtype=torch.float64).view(4, 5, 3)
    x = torch.full((4, 5, 3), 0.8, dtype=torch.float64)
    active = torch.tensor([True, True, False, True])
    counts = {}
    for step in range(memory + 10):
        ops = _OperatorCounter(torch.device("cpu"))  # on a CPU: nonzero, item and the like by name
        with ops:
            x = optimizer.step(x, -stiffness * x, active)
        counts[step] = ops.ops
    assert int(optimizer.count.max()) == memory
    for step in (1, 2, memory // 2, memory + 5):
        assert counts[step][READ] == 0, counts[step]
        assert sum(counts[step].values()) == sum(counts[2].values())


@pytest.mark.parametrize("form", ["list", "indices", "mask"])
def test_reset_takes_slots_as_a_list_indices_or_a_mask_and_resets_only_those(form):
    import torch

    from molden.relax.optimizers import BatchedFIRE, BatchedLBFGS

    slots = {"list": [2], "indices": torch.tensor([2]), "mask": torch.tensor([False, False, True])}[form]
    lbfgs, fire = BatchedLBFGS(3, 2, LBFGSSettings()), BatchedFIRE(3, 2, FIRESettings())
    lbfgs.count[:], lbfgs.calls_since_reset[:], fire.n_steps[:] = 2, 3, 4
    lbfgs.reset(slots)
    fire.reset(slots)
    assert lbfgs.count.tolist() == [2, 2, 0] and lbfgs.calls_since_reset.tolist() == [3, 3, 0]
    assert fire.n_steps.tolist() == [4, 4, 0]


@pytest.mark.parametrize("method", ["lbfgs", "fire"])
def test_forces_with_their_graph_never_reach_the_optimisers_state(method, monkeypatch):
    """A provider may return −∂E/∂x with its graph (create_graph=True, as a conservative model
    in training mode would): the history must not chain the steps' graphs (torch-sim #559)."""
    import torch

    from molden.relax import driver

    made = []
    for name in ("BatchedLBFGS", "BatchedFIRE"):
        cls = getattr(driver, name)
        monkeypatch.setattr(driver, name, type(name, (cls,), {"__init__": lambda self, *a, _c=cls, **k: (
            _c.__init__(self, *a, **k), made.append(self))[0]}))

    def provider(batch):
        x = batch.positions.clone().requires_grad_(True)
        energy = (2.0 * (x - batch.positions.detach() - 0.05) ** 2).sum()
        forces = -torch.autograd.grad(energy, x, create_graph=True)[0]
        return energy.reshape(1).expand(batch.num_graphs), forces

    structure = structure_from_atoms(_systems(1)[0])
    relax([structure], provider, method=method, fmax_ev_per_angstrom=0.0, max_steps=4)
    assert len(made) == 1
    state = [v for v in vars(made[0]).values() if isinstance(v, torch.Tensor)]
    assert state and not any(t.requires_grad for t in state)
