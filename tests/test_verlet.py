"""The Verlet list (`molden.graph.verlet`) gives, at every call, exactly the pairs a fresh radius
graph finds, while searching again only the systems whose atoms moved too far."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule

from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import collate
from molden.errors import MoldenConfigError
from molden.graph.radius_graph import neighbor_list
from molden.graph.verlet import VerletGraph

CUTOFF = 4.0
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _systems() -> list[Atoms]:
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)  # a cell smaller than the cutoff in x and y
    slab.pbc = (True, True, False)
    bulk = Atoms("Al4", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                 cell=[[4.05, 0, 0], [1.0, 4.05, 0], [0.3, -0.6, 4.05]], pbc=True)  # skewed
    water = molecule("CH3CH2OH")
    chain = Atoms("H3", positions=[[0, 0, 0], [1.7, 0, 0], [3.5, 0.2, 0]], cell=[5.2, 0, 0], pbc=(True, False, False))
    return [slab, bulk, water, chain]


def _batch(atoms_list, ids, dtype=torch.float64, device="cpu"):
    structures = [replace(structure_from_atoms(a), system_id=k, tags=None, edge_index=None, unit_shifts=None) for a, k in zip(atoms_list, ids)]
    return collate(structures, dtype=dtype).to(device)


def _pairs(edge_index, unit_shifts) -> set:
    edge_index, unit_shifts = edge_index.cpu(), unit_shifts.cpu()
    return set(zip(edge_index[0].tolist(), edge_index[1].tolist(), map(tuple, unit_shifts.tolist())))


def _fresh(batch, positions, max_num_neighbors=None):
    edge_index, unit_shifts = neighbor_list(positions, CUTOFF, cell=batch.cell, pbc=batch.pbc, n_node=batch.n_node,
                                            max_num_neighbors=max_num_neighbors)
    n_edge = torch.bincount(batch.batch[edge_index[0].to(batch.batch.device)], minlength=batch.num_graphs)
    return _pairs(edge_index, unit_shifts), n_edge


def _check(graph: VerletGraph, batch, positions, max_num_neighbors=None):
    out = graph(batch, positions)
    pairs, n_edge = _fresh(batch, positions, max_num_neighbors)
    assert _pairs(out.edge_index, out.unit_shifts) == pairs
    assert len(pairs) == out.edge_index.shape[1]  # no pair twice
    assert torch.equal(out.n_edge, n_edge)
    assert out.positions is positions
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_num_neighbors", [None, 5])
def test_random_walk_matches_a_fresh_search_at_every_step(dtype, max_num_neighbors, device):
    batch = _batch(_systems(), ["slab", "bulk", "ethanol", "chain"], dtype, device)
    graph = VerletGraph(CUTOFF, 0.6, max_num_neighbors=max_num_neighbors)
    rng = np.random.default_rng(0)
    positions = batch.positions.clone()
    for _ in range(40):
        # Steps up to 0.1 Å per axis, with a drift so that atoms leave the cell.
        positions = positions + torch.from_numpy(rng.uniform(-0.06, 0.1, positions.shape)).to(device, dtype)
        _check(graph, batch, positions, max_num_neighbors)
    assert graph.calls == 40
    # Lists were kept for several steps (fewer searches than a rebuild every call) and
    # refreshed when atoms had moved too far (more than the first build).
    assert 4 < graph.built < 40 * batch.num_graphs / 3


@pytest.mark.parametrize("device", DEVICES)
def test_systems_leave_and_enter_the_batch(device):
    systems = _systems()
    graph = VerletGraph(CUTOFF, 1.0)
    first = _batch(systems, ["a", "b", "c", "d"], device=device)
    _check(graph, first, first.positions)
    assert graph.built == 4
    # "b" and "d" left; "e" (another copy of the slab, moved) came in; "a" and "c" moved a little.
    moved_slab = systems[0].copy()
    moved_slab.positions += 0.05
    second = _batch([systems[0], systems[2], moved_slab], ["a", "c", "e"], device=device)
    shifted = second.positions + 0.1
    _check(graph, second, shifted)
    assert graph.built == 5  # only "e" was searched
    # The same id with other positions (beyond skin / 2), or another cell, is searched again.
    third_atoms = [systems[0].copy(), systems[2].copy(), moved_slab]
    third_atoms[0].positions[3] += [0.0, 0.0, 0.8]
    third_atoms[2].set_cell(third_atoms[2].cell * 0.85)  # images of the same atoms come closer
    third = _batch(third_atoms, ["a", "c", "e"], device=device)
    _check(graph, third, third.positions + 0.1)
    assert graph.built == 7  # "a" (an atom moved 0.8 Å) and "e" (its cell changed); "c" kept


def test_an_atom_crossing_the_cell_face_keeps_its_pairs():
    chain = _systems()[3]
    batch = _batch([chain], ["chain"])
    graph = VerletGraph(CUTOFF, 0.8)
    positions = batch.positions.clone()
    for _ in range(8):  # atom 2 walks out through the x face (x = 5.2 Å) in steps of 0.05 Å
        positions = positions.clone()
        positions[2, 0] += 0.05
        _check(graph, batch, positions)
    assert positions[2, 0] > 3.5 + 0.35 and graph.built == 1


def test_no_skin_rebuilds_every_call_and_a_negative_skin_is_refused():
    batch = _batch(_systems(), ["a", "b", "c", "d"])
    graph = VerletGraph(CUTOFF, 0.0)
    for _ in range(3):
        _check(graph, batch, batch.positions)
    assert graph.built == 3 * batch.num_graphs
    with pytest.raises(MoldenConfigError, match="skin"):
        VerletGraph(CUTOFF, -0.1)


def test_positions_that_need_gradients_pass_through():
    batch = _batch(_systems()[:2], ["a", "b"])
    positions = batch.positions.clone().requires_grad_(True)
    graph = VerletGraph(CUTOFF, 0.5)
    out = graph(batch, positions)
    assert out.positions.requires_grad and not out.edge_index.requires_grad
    out = graph(batch, positions * 1.0)
    assert out.positions.grad_fn is not None


def test_two_atoms_approaching_head_on_are_found_in_time():
    # Outside the list (cutoff + skin) at first; each atom moves 0.14 Å a call towards the other,
    # so the pair enters the cutoff after 3 calls, when each atom has moved more than skin / 2.
    pair = Atoms("H2", positions=[[0, 0, 0], [CUTOFF + 0.7, 0, 0]])
    batch = _batch([pair], ["pair"])
    graph = VerletGraph(CUTOFF, 0.6)
    positions = batch.positions.clone()
    counts = []
    for _ in range(5):
        out = _check(graph, batch, positions)
        counts.append(out.edge_index.shape[1])
        positions = positions + torch.tensor([[0.14, 0, 0], [-0.14, 0, 0]], dtype=torch.float64)
    assert counts == [0, 0, 0, 2, 2]


def test_an_id_seen_before_with_other_atoms_or_twice_in_a_batch():
    """Ids only say where to look: the same id for another structure (an ASE calculator moved to
    other atoms), or twice in one batch (frames of one trajectory), still gives a fresh search's
    pairs."""
    systems = _systems()
    graph = VerletGraph(CUTOFF, 0.5)
    first = _batch([systems[0]], ["ase"])
    _check(graph, first, first.positions)
    other = _batch([systems[2]], ["ase"])  # ethanol after the slab: another atom count
    _check(graph, other, other.positions)
    bulk = _batch([systems[1]], ["ase"])  # 4 atoms under the same id again: searched
    _check(graph, bulk, bulk.positions)
    frames = [systems[0].copy(), systems[0].copy(), systems[0].copy()]
    frames[1].positions += 0.05
    frames[2].positions[:4] += [0.0, 0.0, 0.9]
    twice = _batch(frames, ["traj", "traj", "traj"])
    _check(graph, twice, twice.positions)
    moved = twice.positions + 0.02
    _check(graph, twice, moved)
    assert graph.built == 3 + 3  # the three frames were searched once each, then kept


@pytest.mark.parametrize("leaving", [["c"], ["b", "c"], ["a"], ["b"]])
def test_systems_leave_and_none_enter(leaving):
    """A relaxation's last structures converge one by one and nothing refills the batch: the
    remaining systems keep their lists, whichever left (the last ones, or from the front)."""
    systems = dict(zip("abc", _systems()[:3]))
    graph = VerletGraph(CUTOFF, 0.5)
    first = _batch(list(systems.values()), list(systems))
    _check(graph, first, first.positions)
    staying = [k for k in systems if k not in leaving]
    second = _batch([systems[k] for k in staying], staying)
    _check(graph, second, second.positions + 0.01)
    assert graph.built == 3  # nothing searched again


@pytest.mark.parametrize("seed", range(4))
def test_random_batches_of_moving_systems(seed):
    """Any sequence of batches: systems drawn in any order from a pool, each moving on its own
    (now and then by a jump), ids kept; every call gives a fresh search's pairs."""
    rng = np.random.default_rng(seed)
    pool = [*_systems(), *(a.copy() for a in _systems())]
    ids = [f"s{k}" for k in range(len(pool))]
    positions = {k: a.positions.copy() for k, a in zip(ids, pool)}
    graph = VerletGraph(CUTOFF, 0.5)
    for _ in range(30):
        chosen = list(rng.choice(len(pool), size=rng.integers(1, len(pool) + 1), replace=False))
        for k in chosen:
            positions[ids[k]] += rng.normal(scale=0.3 if rng.random() < 0.1 else 0.04, size=positions[ids[k]].shape)
        atoms = []
        for k in chosen:
            a = pool[k].copy()
            a.positions = positions[ids[k]]
            atoms.append(a)
        batch = _batch(atoms, [ids[k] for k in chosen])
        _check(graph, batch, batch.positions)
    assert graph.built < 30 * len(pool) / 2
