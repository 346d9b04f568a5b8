"""Specifications of `molden.graph.radius_graph` / `neighbor_list`: ASE's "ijS", edge for edge.

Every backend ("auto" = vesin on the CPU when installed, "torch" = brute force / torch cell
list) is compared exactly with `ase.neighborlist.neighbor_list` after sorting on (i, j, S).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import given, settings
from hypothesis import strategies as st

from molden.errors import MoldenInputError
from molden.graph import edge_lengths, nearest_neighbors_mask, neighbor_list, radius_graph

BACKENDS = ["auto", "torch"]


def lexsorted(rows: np.ndarray) -> np.ndarray:
    """[E, 5] rows (i, j, S0, S1, S2) sorted lexicographically."""
    return rows[np.lexsort(rows.T[::-1])] if len(rows) else rows.reshape(0, 5)


def ase_reference(atoms: Atoms, cutoff: float) -> np.ndarray:
    """[E, 5] rows (i, j, S0, S1, S2) from ASE, sorted lexicographically."""
    i, j, shifts = ase_neighbor_list("ijS", atoms, cutoff)
    return lexsorted(np.column_stack([i, j, shifts]).astype(np.int64))


def ase_batched_reference(systems: list[Atoms], cutoff: float) -> np.ndarray:
    """ASE's rows for each system, atom indices offset as in a batch, sorted lexicographically."""
    offsets = np.cumsum([0] + [len(a) for a in systems])
    rows = [ase_reference(atoms, cutoff) + np.array([o, o, 0, 0, 0]) for atoms, o in zip(systems, offsets)]
    return lexsorted(np.concatenate(rows))


def molden_rows(atoms: Atoms, cutoff: float, backend: str = "auto", dtype=torch.float64, **kwargs) -> np.ndarray:
    edge_index, shifts = neighbor_list(
        torch.tensor(atoms.positions, dtype=dtype),
        cutoff,
        cell=torch.tensor(atoms.cell.array, dtype=dtype),
        pbc=torch.tensor(atoms.pbc),
        backend=backend,
        **kwargs,
    )
    return lexsorted(np.column_stack([edge_index.T.numpy(), shifts.numpy()]).astype(np.int64))


def assert_same_edges(atoms: Atoms, cutoff: float, backend: str) -> None:
    got, ref = molden_rows(atoms, cutoff, backend), ase_reference(atoms, cutoff)
    assert got.shape == ref.shape, f"{len(got)} edges, ASE has {len(ref)}"
    np.testing.assert_array_equal(got, ref)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def random_system(seed: int) -> tuple[Atoms, float]:
    """A random triclinic cell (skewed, maybe left-handed, maybe smaller than the cutoff),
    random pbc, positions partly outside the cell, then a random rigid motion."""
    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(1.5, 9.0, size=3)) + rng.uniform(-4.0, 4.0, size=(3, 3)) * np.tri(3, k=-1)
    if rng.random() < 0.3:
        cell[0] = -cell[0]  # left-handed
    if abs(np.linalg.det(cell)) < 1.0:
        cell += np.eye(3) * 2.0
    n_atoms = int(rng.integers(1, 25))
    frac = rng.uniform(-1.5, 2.5, size=(n_atoms, 3))
    pbc = rng.random(3) < 0.5
    rotation = random_rotation(rng)
    translation = rng.normal(scale=5.0, size=3)
    atoms = Atoms(
        numbers=np.ones(n_atoms, dtype=int),
        positions=frac @ cell @ rotation.T + translation,
        cell=cell @ rotation.T,
        pbc=pbc,
    )
    return atoms, float(rng.uniform(0.5, 7.0))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_radius_graph_matches_ase_on_random_triclinic_cells(backend, seed):
    atoms, cutoff = random_system(seed)
    assert_same_edges(atoms, cutoff, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pbc", [tuple(bool(int(b)) for b in f"{k:03b}") for k in range(8)])
def test_radius_graph_matches_ase_for_every_pbc_combination_on_a_skewed_cell(backend, pbc):
    rng = np.random.default_rng(7)
    cell = np.array([[4.0, 0.0, 0.0], [3.5, 2.0, 0.0], [-1.5, 2.5, 3.0]])
    atoms = Atoms("H20", positions=rng.uniform(-3, 9, size=(20, 3)), cell=cell, pbc=pbc)
    assert_same_edges(atoms, 5.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_cell", [True, False])
def test_radius_graph_matches_ase_on_molecules_without_cell(backend, zero_cell):
    atoms = molecule("C6H6")
    if not zero_cell:
        atoms.cell = np.diag([1.0, 1.0, 1.0])  # a too-small box must not matter when pbc is False
    assert_same_edges(atoms, 3.0, backend)
    edge_index, _ = neighbor_list(torch.tensor(atoms.positions), 3.0, backend=backend)  # cell=None
    assert edge_index.shape[1] == len(ase_reference(atoms, 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vacuum_vector", [(0.0, 0.0, 0.0), (0.0, 0.0, 25.0), (7.0, 1.0, 0.3)])
def test_radius_graph_matches_ase_on_slabs_whatever_the_vacuum_vector(backend, vacuum_vector):
    assert_same_edges(slab_with_vacuum_vector(vacuum_vector), 6.0, backend)


def slab_with_vacuum_vector(vacuum_vector) -> Atoms:
    """Cu(111) 3x3x3 with an O on top, pbc (T, T, F), its third cell vector set to any value:
    a non-periodic axis's cell vector must not change the graph."""
    slab = fcc111("Cu", (3, 3, 3), vacuum=8.0)
    slab.append("O")
    slab.positions[-1] = slab.positions[-4] + [0.0, 0.0, 1.9]
    cell = slab.cell.array.copy()
    cell[2] = vacuum_vector
    slab.set_cell(cell)
    slab.pbc = (True, True, False)
    return slab


@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_graph_matches_ase_on_cells_much_smaller_than_the_cutoff(backend):
    atoms = bulk("Cu", "fcc", a=3.6)  # 1 atom, face spacing ~2 Å: several image shells
    atoms.positions += 0.3
    assert_same_edges(atoms, 7.5, backend)
    thin = Atoms("H2", positions=[[0, 0, 0], [0.4, 0.3, 5.0]], cell=[[1.1, 0, 0], [0.6, 0.9, 0], [0, 0, 12.0]], pbc=True)
    assert_same_edges(thin, 4.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_graph_gives_shifts_for_unwrapped_positions(backend):
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 2, 2))
    atoms.positions[::3] += atoms.cell.array.sum(axis=0) * 2.7  # far outside the cell
    atoms.positions[1::5] -= atoms.cell.array[1] * 3.0
    assert_same_edges(atoms, 5.0, backend)


def test_radius_graph_torch_cell_list_matches_ase_on_a_large_rattled_crystal():
    # Above the brute-force size limit, so the torch cell list runs, with partial pbc.
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((7, 7, 7))
    atoms.rattle(0.2, seed=3)
    atoms.positions[:50] += [30.0, -12.0, 0.0]
    atoms.pbc = (True, False, True)
    assert len(atoms) > 1000
    assert_same_edges(atoms, 4.5, "torch")


def test_radius_graph_float32_differs_only_within_1e4_of_the_cutoff():
    atoms, cutoff = random_system(11)
    atoms.pbc = True
    got = {tuple(r) for r in molden_rows(atoms, cutoff, "torch", dtype=torch.float32)}
    ref = {tuple(r) for r in ase_reference(atoms, cutoff)}
    for i, j, *shift in got ^ ref:
        d = np.linalg.norm(atoms.positions[j] + np.array(shift) @ atoms.cell.array - atoms.positions[i])
        assert abs(d - cutoff) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_radius_graph_equals_per_system_graphs_with_offsets(backend):
    systems = [molecule("CH4"), bulk("Si", "diamond", a=5.43), fcc111("Pt", (2, 2, 3), vacuum=6.0), molecule("H2O")]
    systems[1].positions += 9.0  # unwrapped
    positions = torch.tensor(np.concatenate([a.positions for a in systems]))
    cell = torch.tensor(np.stack([a.cell.array for a in systems]))
    pbc = torch.tensor(np.stack([a.pbc for a in systems]))
    batch = torch.tensor(np.repeat(np.arange(len(systems)), [len(a) for a in systems]))
    edge_index, shifts = neighbor_list(positions, 4.0, cell=cell, pbc=pbc, batch=batch, backend=backend)
    got = np.column_stack([edge_index.T.numpy(), shifts.numpy()])
    # Systems come one after another in the batch.
    system = np.repeat(np.arange(len(systems)), [len(a) for a in systems])[got[:, 0]]
    assert (np.diff(system) >= 0).all()
    np.testing.assert_array_equal(lexsorted(got), ase_batched_reference(systems, 4.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_of_overlapping_molecules_and_slabs_equals_per_system_graphs(backend, dtype):
    # Molecules share coordinates (the vesin backend must move them apart to search them in one
    # call), runs of molecules alternate with periodic slabs, one system is a single atom and
    # one system index has no atoms at all.
    rng = np.random.default_rng(4)
    pool = [molecule(name) for name in ("CH4", "H2O", "C6H6", "CH3OH", "NH3")]
    systems = []
    for k in range(30):
        atoms = pool[k % len(pool)].copy()
        atoms.rotate(float(rng.uniform(0, 360)), tuple(rng.normal(size=3)), center="COP")
        systems.append(atoms)
        if k % 7 == 3:
            slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
            slab.rattle(0.05, seed=k)
            systems.append(slab)
    systems.insert(5, Atoms("H", positions=[[0.1, 0.2, 0.3]]))
    got, index = rows_with_an_empty_system(systems, 9, 3.5, dtype, backend)
    assert (np.diff(index[got[:, 0]]) >= 0).all()  # systems one after another
    np.testing.assert_array_equal(lexsorted(got), ase_batched_reference(systems, 3.5))


def rows_with_an_empty_system(systems: list[Atoms], empty: int, cutoff: float, dtype, backend: str):
    """(i, j, S) rows of `neighbor_list` on `systems` batched with an atom-less system inserted
    at index `empty` (no cell, no pbc), and each atom's system index."""
    index = np.repeat(np.arange(len(systems)), [len(a) for a in systems])
    index[index >= empty] += 1
    cells = [a.cell.array for a in systems]
    cells.insert(empty, np.zeros((3, 3)))
    pbcs = [a.pbc for a in systems]
    pbcs.insert(empty, np.zeros(3, dtype=bool))
    edge_index, shifts = neighbor_list(
        torch.tensor(np.concatenate([a.positions for a in systems]), dtype=dtype), cutoff,
        cell=torch.tensor(np.stack(cells), dtype=dtype), pbc=torch.tensor(np.stack(pbcs)),
        batch=torch.tensor(index), backend=backend,
    )
    return np.column_stack([edge_index.T.numpy(), shifts.numpy()]), index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "systems",
    [
        # Regressions (review): vesin died with SIGFPE on long, thin non-periodic point sets,
        # and float32 rounding bands wider than the gap between packed molecules joined them.
        [molecule("H2O"), molecule("H2O")],
        [Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.7, 0.0, 0.0]]), Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 3e6, 0.0]])],
    ],
)
@pytest.mark.parametrize("where", [0.0, 1e5])
def test_far_apart_or_far_from_the_origin_molecules_match_ase(backend, systems, where):
    systems = [a.copy() for a in systems]
    systems[0].positions += where
    systems[1].positions += [where, 2000.0 + where, 2000.0 + where]
    for dtype in (torch.float64, torch.float32):
        positions = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=dtype)
        batch = torch.tensor(np.repeat(np.arange(len(systems)), [len(a) for a in systems]))
        edge_index, shifts = neighbor_list(positions, 3.0, batch=batch, backend=backend)
        got = lexsorted(np.column_stack([edge_index.T.numpy(), shifts.numpy()]))
        # The reference is ASE on the positions as the dtype holds them.
        held = [Atoms(a.numbers, positions=p) for a, p in zip(systems, np.split(positions.double().numpy(), [len(systems[0])]))]
        np.testing.assert_array_equal(got, ase_batched_reference(held, 3.0))


def test_a_cutoff_too_small_for_vesin_still_gives_the_graph():
    atoms = Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 5e-7]])
    assert_same_edges(atoms, 1e-6, "auto")


def ase_truncated(atoms: Atoms, cutoff: float, k: int) -> set[tuple]:
    i, j, shifts, d = ase_neighbor_list("ijSd", atoms, cutoff)
    kept = set()
    for centre in np.unique(i):
        sel = np.nonzero(i == centre)[0]
        kth = np.sort(d[sel])[min(k, len(sel)) - 1]
        kept |= {(i[e], j[e], *shifts[e]) for e in sel if d[e] <= kth + 1e-6}
    return kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_num_neighbors_keeps_the_k_nearest_and_every_tie(backend):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))  # 12 tied nearest neighbours
    atoms.positions[0] += [0.05, 0.0, 0.0]
    for k in (4, 12, 13, 100):
        got = {tuple(r) for r in molden_rows(atoms, 5.0, backend, max_num_neighbors=k)}
        assert got == ase_truncated(atoms, 5.0, k)


def test_max_num_neighbors_does_not_depend_on_atom_order():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.01, seed=1)
    perm = np.random.default_rng(0).permutation(len(atoms))
    base = {tuple(r) for r in molden_rows(atoms, 5.0, max_num_neighbors=8)}
    permuted = molden_rows(atoms[perm], 5.0, max_num_neighbors=8)
    permuted[:, :2] = perm[permuted[:, :2]]
    assert {tuple(r) for r in permuted} == base


def test_nearest_neighbors_mask_reports_how_many_edges_were_dropped():
    centers = torch.tensor([0, 0, 0, 0, 1, 1])
    distances = torch.tensor([1.0, 2.0, 2.0 + 5e-7, 3.0, 1.0, 4.0], dtype=torch.float64)
    mask = nearest_neighbors_mask(centers, distances, 2, num_nodes=2)
    assert mask.tolist() == [True, True, True, False, True, True]
    assert int((~mask).sum()) == 1


def test_radius_graph_distances_are_differentiable_in_positions_and_cell():
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=2)
    positions = torch.tensor(atoms.positions, requires_grad=True)
    cell = torch.tensor(atoms.cell.array, requires_grad=True)
    edge_index, _ = radius_graph(positions, 3.0, cell=cell, pbc=torch.tensor([True] * 3))

    def lengths(pos, cel):
        _, shift = radius_graph(pos, 3.0, cell=cel, pbc=torch.tensor([True] * 3))
        return (pos[edge_index[1]] + shift - pos[edge_index[0]]).norm(dim=-1)

    assert torch.autograd.gradcheck(lengths, (positions, cell))
    _, unit_shifts = neighbor_list(positions, 3.0, cell=cell, pbc=torch.tensor([True] * 3))
    batch = torch.zeros(len(positions), dtype=torch.long)
    direct = edge_lengths(positions, cell[None], batch, edge_index[0], edge_index[1], unit_shifts)
    torch.testing.assert_close(lengths(positions, cell), direct)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("cell", "pbc"),
    [
        (np.zeros((3, 3)), (True, False, False)),
        (np.diag([3.0, 3.0, 0.0]), (True, True, True)),
        (np.array([[2.0, 0, 0], [4.0, 0, 0], [0, 0, 3.0]]), (True, True, False)),
    ],
)
def test_degenerate_periodic_cell_raises_molden_input_error(backend, cell, pbc):
    atoms = Atoms("H2", positions=[[0, 0, 0], [1, 0, 0]], cell=cell, pbc=pbc)
    with pytest.raises(MoldenInputError, match="degenerate"):
        molden_rows(atoms, 3.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_vacuum_vector_nearly_parallel_to_a_periodic_axis_is_ignored(backend):
    # A non-periodic vector is not part of the lattice: a tilted one must neither change pairs
    # nor shrink the face spacing of the periodic axes (which would explode the image shells).
    atoms = Atoms("H3", positions=[[0, 0, 0], [1.2, 0.4, 0.3], [2.0, 2.0, 4.0]],
                  cell=[[3.0, 0, 0], [0, 3.0, 0], [3.0, 0.001, 0.001]], pbc=(True, True, False))
    assert_same_edges(atoms, 4.0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_single_atom_systems_have_only_periodic_self_images(backend):
    assert_same_edges(Atoms("H", positions=[[0.0, 0.0, 0.0]]), 3.0, backend)
    assert_same_edges(Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 2.5, pbc=True), 3.0, backend)


# Tests that must also run where a GPU exists: the torch backend is the only CUDA path.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def mixed_batch(device: str, dtype=torch.float64):
    """A molecule in a box (pbc False), a slab, a bulk crystal (unwrapped) and a bare molecule."""
    systems = [molecule("CH4"), fcc111("Pt", (2, 2, 3), vacuum=6.0), bulk("Si", "diamond", a=5.43), molecule("H2O")]
    systems[0].cell = np.eye(3) * 9.0
    systems[2].positions += 9.0
    positions = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=dtype, device=device)
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), dtype=dtype, device=device)
    pbc = torch.tensor(np.stack([a.pbc for a in systems]), device=device)
    n_node = [len(a) for a in systems]
    return systems, positions, cell, pbc, n_node


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_n_node_gives_the_same_graph_as_batch(device, backend):
    systems, positions, cell, pbc, n_node = mixed_batch(device)
    batch = torch.repeat_interleave(torch.arange(len(n_node), device=device), torch.tensor(n_node, device=device))
    by_batch = neighbor_list(positions, 4.0, cell=cell, pbc=pbc, batch=batch, backend=backend)
    for counts in (n_node, np.array(n_node), torch.tensor(n_node), torch.tensor(n_node, device=device)):
        by_n_node = neighbor_list(positions, 4.0, cell=cell, pbc=pbc, n_node=counts, backend=backend)
        assert torch.equal(by_n_node[0], by_batch[0]) and torch.equal(by_n_node[1], by_batch[1])
    got = np.column_stack([by_batch[0].T.cpu().numpy(), by_batch[1].cpu().numpy()])
    np.testing.assert_array_equal(lexsorted(got), ase_batched_reference(systems, 4.0))


@pytest.mark.parametrize("n_node", [[5, 5], [20, 20, 1], [-1, 41]])
def test_n_node_that_does_not_cover_the_atoms_raises_molden_input_error(n_node):
    positions = torch.zeros(40, 3)
    positions[:, 0] = torch.arange(40.0)
    with pytest.raises(MoldenInputError, match="n_node"):
        neighbor_list(positions, 1.5, n_node=n_node)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_radius_graph_shifts_equal_unit_shifts_times_the_cell_of_each_edge(device, backend):
    _, positions, cell, pbc, n_node = mixed_batch(device)
    cell.requires_grad_(True)
    edge_index, unit_shifts = neighbor_list(positions, 4.0, cell=cell, pbc=pbc, n_node=n_node, backend=backend)
    edge_index_rg, shifts = radius_graph(positions, 4.0, cell=cell, pbc=pbc, n_node=n_node, backend=backend)
    assert torch.equal(edge_index_rg, edge_index)
    system = torch.repeat_interleave(torch.arange(len(n_node), device=device), torch.tensor(n_node, device=device))
    expected = torch.einsum("ek,ekx->ex", unit_shifts.double(), cell[system[edge_index[0]]])
    torch.testing.assert_close(shifts, expected, rtol=0, atol=1e-12)
    assert (unit_shifts != 0).any(), "the batch must exercise periodic images"
    weights = torch.randn_like(expected)
    (got,) = torch.autograd.grad((shifts * weights).sum(), cell)
    (want,) = torch.autograd.grad((expected * weights).sum(), cell)
    torch.testing.assert_close(got, want)


class _HostReads:
    """Records, while active, scalar reads (`float(t)`, `bool(t)`, `.item()`) and copies from a
    device to the host: `reads` lists the scalar reads and the copies of more than
    `max_values` values; `copies` counts every copy to the host."""

    def __init__(self, max_values: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        watcher = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten._local_scalar_dense.default:
                    watcher.reads.append("scalar read")
                source = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if (
                    isinstance(out, torch.Tensor) and source is not None
                    and out.device.type == "cpu" and source.device.type != "cpu"
                ):
                    watcher.copies += 1
                    if source.numel() > max_values:
                        watcher.reads.append(f"{func} of {source.numel()} values to the host")
                return out

        self.mode, self.reads, self.copies = Mode(), [], 0

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_reads_no_scalar_and_copies_only_per_system_numbers_to_the_host(device):
    # Small systems (brute force): every size comes from n_node and the cells, which reach the
    # host in one copy of at most 13 numbers per system (cell, pbc, atom count) and one bound;
    # the only waits left are the data-dependent selections (nonzero).
    _, positions, cell, pbc, n_node = mixed_batch(device)
    with _HostReads(max_values=13 * len(n_node) + 1) as watch:
        radius_graph(positions, 4.0, cell=cell, pbc=pbc, n_node=n_node, backend="torch")
    assert watch.reads == []
    assert watch.copies <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_follow_a_cell_changed_in_place(backend):
    # Per-system checks are reused while the inputs repeat: a cell edited in place between
    # calls must still give its own graph, and a cell made degenerate must still be refused.
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    positions = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array)
    pbc = torch.tensor([True] * 3)
    for scale in (1.0, 1.1, 1.0):
        cell.copy_(torch.tensor(atoms.cell.array) * scale)
        scaled = atoms.copy()
        scaled.set_cell(atoms.cell.array * scale, scale_atoms=False)
        edge_index, shifts = neighbor_list(positions, 4.0, cell=cell, pbc=pbc, backend=backend)
        got = lexsorted(np.column_stack([edge_index.T.numpy(), shifts.numpy()]))
        np.testing.assert_array_equal(got, ase_reference(scaled, 4.0))
    cell[2] = cell[0]
    with pytest.raises(MoldenInputError, match="degenerate"):
        neighbor_list(positions, 4.0, cell=cell, pbc=pbc, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_system_shifts_equal_unit_shifts_times_its_cell_without_and_with_grad(dtype):
    # One periodic system takes the mirrored path on the CPU (half the products, the rest
    # negated): it must equal the plain product, and the autograd path, in either dtype.
    atoms = fcc111("Cu", (3, 3, 3), vacuum=8.0)
    atoms.rattle(0.05, seed=1)
    positions = torch.tensor(atoms.positions, dtype=dtype)
    cell = torch.tensor(atoms.cell.array, dtype=dtype)
    pbc = torch.tensor(atoms.pbc)
    edge_index, unit_shifts = neighbor_list(positions, 5.0, cell=cell, pbc=pbc)
    edge_index_rg, shifts = radius_graph(positions, 5.0, cell=cell, pbc=pbc)
    assert torch.equal(edge_index_rg, edge_index)
    assert shifts.dtype == dtype and (unit_shifts != 0).any()
    torch.testing.assert_close(shifts, unit_shifts.to(dtype) @ cell, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    _, with_grad = radius_graph(positions, 5.0, cell=cell.clone().requires_grad_(True), pbc=pbc)
    torch.testing.assert_close(with_grad.detach(), shifts, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_results_kept_by_the_caller_are_never_overwritten_and_dropped_ones_are_reused(monkeypatch):
    # Large results are written into buffers kept between calls (vesin_backend): a result the
    # caller still holds must never be handed out again, while a dropped one is reused.
    from molden.graph import vesin_backend

    monkeypatch.setattr(vesin_backend, "_REUSE_MIN_BYTES", 0)
    crystal = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    pbc = torch.tensor([True] * 3)
    cell = torch.tensor(crystal.cell.array)
    first = torch.tensor(crystal.positions)
    second = first + 0.3 * torch.rand(first.shape, generator=torch.Generator().manual_seed(0))
    kept = radius_graph(first, 4.0, cell=cell, pbc=pbc)
    copies = [t.clone() for t in kept]
    later = radius_graph(second, 4.0, cell=cell, pbc=pbc)
    assert all(torch.equal(held, copy) for held, copy in zip(kept, copies))
    assert all(held.data_ptr() != new.data_ptr() for held, new in zip(kept, later))
    pointers = [t.data_ptr() for t in later]
    del later
    again = radius_graph(second, 4.0, cell=cell, pbc=pbc)
    assert [t.data_ptr() for t in again] == pointers
