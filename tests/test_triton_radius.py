"""Specifications of the Triton cell-list backend of `neighbor_list` (`molden.graph.triton_cells`).

Without a GPU the kernel runs on CPU tensors under Triton's interpreter: the same kernel code,
checked edge for edge against ASE's "ijS" on the systems of tests/test_radius_graph.py. Triton
fixes its mode when imported (`TRITON_INTERPRET=1` then interprets every kernel of the process),
so `test_triton_kernel_matches_ase_under_the_interpreter` runs this file again in a process of
its own with the variable set; there the tests marked `interpreted` run and the others skip.
This process keeps the compiled mode: the kernel is compiled for a GPU (none needed) and, with
one, run on CUDA tensors. Example counts are small: the interpreter runs programs in Python.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from hypothesis import given, settings
from hypothesis import strategies as st
from test_radius_graph import (_HostReads, ase_batched_reference, ase_reference, lexsorted, mixed_batch, molden_rows,
                               random_system, rows_with_an_empty_system, slab_with_vacuum_vector)

from molden.errors import MoldenInputError
from molden.graph import neighbor_list
from molden.graph.radius_graph import backend_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETER, reason="runs in the interpreter's own process (see module docstring)")
compiled = pytest.mark.skipif(INTERPRETER, reason="needs Triton's compiled mode")


@compiled
def test_triton_kernel_matches_ase_under_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 18, done.stdout[-2000:]  # every interpreted case ran


def assert_same_edges(atoms: Atoms, cutoff: float, dtype=torch.float64) -> None:
    got, ref = molden_rows(atoms, cutoff, "triton", dtype=dtype), ase_reference(atoms, cutoff)
    assert got.shape == ref.shape, f"{len(got)} edges, ASE has {len(ref)}"
    np.testing.assert_array_equal(got, ref)


@interpreted
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_triton_kernel_matches_ase_on_random_triclinic_cells(seed):
    atoms, cutoff = random_system(seed)
    assert_same_edges(atoms, cutoff)


@interpreted
@pytest.mark.parametrize("pbc", [tuple(bool(int(b)) for b in f"{k:03b}") for k in range(8)])
def test_triton_kernel_matches_ase_for_every_pbc_combination_on_a_skewed_cell(pbc):
    rng = np.random.default_rng(7)
    cell = np.array([[4.0, 0.0, 0.0], [3.5, 2.0, 0.0], [-1.5, 2.5, 3.0]])
    atoms = Atoms("H20", positions=rng.uniform(-3, 9, size=(20, 3)), cell=cell, pbc=pbc)
    assert_same_edges(atoms, 5.0)


@interpreted
@pytest.mark.parametrize("vacuum_vector", [(0.0, 0.0, 0.0), (7.0, 1.0, 0.3)])
def test_triton_kernel_matches_ase_on_slabs_whatever_the_vacuum_vector(vacuum_vector):
    assert_same_edges(slab_with_vacuum_vector(vacuum_vector), 6.0)


@interpreted
def test_triton_kernel_matches_ase_on_cells_much_smaller_than_the_cutoff():
    atoms = bulk("Cu", "fcc", a=3.6)  # 1 atom, face spacing ~2 Å: 9 bins' images per axis
    atoms.positions += 0.3
    assert_same_edges(atoms, 7.5)
    thin = Atoms("H2", positions=[[0, 0, 0], [0.4, 0.3, 5.0]], cell=[[1.1, 0, 0], [0.6, 0.9, 0], [0, 0, 12.0]], pbc=True)
    assert_same_edges(thin, 4.0)


@interpreted
def test_triton_kernel_gives_shifts_for_unwrapped_positions_in_float64_and_float32():
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 2, 2))
    atoms.positions[::3] += atoms.cell.array.sum(axis=0) * 2.7  # far outside the cell
    atoms.positions[1::5] -= atoms.cell.array[1] * 3.0
    assert_same_edges(atoms, 5.0)
    atoms.rattle(0.05, seed=1)  # off the lattice: no distance within float32 rounding of 5 Å
    assert_same_edges(atoms, 5.0, dtype=torch.float32)


@interpreted
def test_triton_kernel_finds_molecules_far_apart_and_far_from_the_origin():
    # Non-periodic axes are hashed: far-apart atoms share bins and the distance test parts them.
    systems = [molecule("H2O"), Atoms("H2", positions=[[0.0, 0.0, 0.0], [0.0, 3e6, 0.0]])]
    systems[0].positions += 1e5
    systems[1].positions += [1e5, 2000.0 + 1e5, 2000.0 + 1e5]
    positions = torch.tensor(np.concatenate([a.positions for a in systems]))
    edge_index, shifts = neighbor_list(positions, 3.0, n_node=[3, 2], backend="triton")
    got = lexsorted(np.column_stack([edge_index.T.numpy(), shifts.numpy()]))
    np.testing.assert_array_equal(got, ase_batched_reference(systems, 3.0))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_batch_of_molecules_slabs_and_crystals_equals_per_system_graphs(dtype):
    # One launch per pass for all systems: molecules, slabs, a crystal thinner than the cutoff,
    # a single atom and an empty system, each with its own bins and image reach.
    rng = np.random.default_rng(4)
    systems = []
    for k, name in enumerate(("CH4", "H2O", "C6H6", "CH3OH", "NH3", "CH4")):
        atoms = molecule(name)
        atoms.rotate(float(rng.uniform(0, 360)), tuple(rng.normal(size=3)), center="COP")
        systems.append(atoms)
        if k % 3 == 1:
            slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
            slab.rattle(0.05, seed=k)
            systems.append(slab)
    small = bulk("Cu", "fcc", a=3.6)
    small.positions += 7.0  # unwrapped
    systems += [small, Atoms("H", positions=[[0.1, 0.2, 0.3]])]
    got, _ = rows_with_an_empty_system(systems, 3, 4.0, dtype, "triton")
    assert (np.diff(got[:, 0]) >= 0).all(), "centres ascending, so systems one after another"
    np.testing.assert_array_equal(lexsorted(got), ase_batched_reference(systems, 4.0))


@interpreted
def test_triton_kernel_handles_no_atoms_and_single_atoms():
    edge_index, shifts = neighbor_list(torch.zeros(0, 3, dtype=torch.float64), 3.0, backend="triton")
    assert edge_index.shape == (2, 0) and shifts.shape == (0, 3)
    assert_same_edges(Atoms("H", positions=[[0.0, 0.0, 0.0]]), 3.0)
    assert_same_edges(Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 2.5, pbc=True), 3.0)


def test_bin_grids_are_sized_by_each_systems_own_atoms():
    # fairchem #795/#1204: buffers sized by the batch's worst system. Here a sparse 2-atom box
    # and a molecule get a few bins each, whatever the large crystal beside them needs.
    from molden.graph.periodic import complete_cells
    from molden.graph.triton_cells import bin_grids

    cells = np.stack([np.eye(3) * 1000.0, np.zeros((3, 3)), np.eye(3) * 40.0])
    pbc = np.array([[True] * 3, [False] * 3, [True] * 3])
    counts = np.array([2, 5, 6000])
    full = complete_cells(cells, pbc)
    bins, reach, _ = bin_grids(full, np.linalg.inv(full), pbc, counts, 4.0)
    n_bins = bins.prod(axis=1)
    assert n_bins[0] <= 2 * 2 + 8 and n_bins[1] == 27 and n_bins[2] == 10**3
    assert (reach[2] == 1).all() and (reach[1] == 1).all()


@interpreted
def test_triton_backend_refuses_non_finite_positions():
    positions = torch.rand(4, 3, dtype=torch.float64)
    positions[1, 0] = float("nan")
    with pytest.raises(MoldenInputError, match="finite"):
        neighbor_list(positions, 2.0, cell=torch.eye(3, dtype=torch.float64) * 3, pbc=torch.tensor([True] * 3), backend="triton")


@compiled
def test_triton_backend_on_cpu_without_the_interpreter_raises_molden_input_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MoldenInputError, match="CUDA tensors"):
        neighbor_list(torch.zeros(2, 3), 3.0, backend="triton")
    # Set once Triton is imported (compiled), the variable cannot make it interpret.
    import triton  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(MoldenInputError, match="before Triton is imported"):
        neighbor_list(torch.zeros(2, 3), 3.0, backend="triton")


@interpreted
def test_the_cuda_backend_comparison_finds_the_same_pairs_in_every_backend(monkeypatch):
    from molden.bench import radius_graph as bench

    cases = [c for c in bench.benchmark_cases(quick=True) if c.name in ("OC20-like slab x1", "QM9-like molecules x64")]
    monkeypatch.setattr(bench, "benchmark_cases", lambda quick=False: cases)
    rows = bench.compare_cuda_backends("cpu", repeats=1)
    assert [r["case"] for r in rows] == [c.name for c in cases]
    assert all(r["same_pairs"] and r["n_edges"] > 0 and r["triton_ms"] > 0 for r in rows)


def test_auto_backend_takes_triton_for_cuda_tensors_unless_opted_out(monkeypatch):
    monkeypatch.delenv("MOLDEN_TRITON_RADIUS_GRAPH", raising=False)
    assert backend_for("cuda") == "triton"  # the default since it passed the ASE tests on an H200
    for off in ("0", "false", "OFF", "no"):
        monkeypatch.setenv("MOLDEN_TRITON_RADIUS_GRAPH", off)
        assert backend_for("cuda") == "torch", off
    monkeypatch.setenv("MOLDEN_TRITON_RADIUS_GRAPH", "1")
    assert backend_for("cuda") == "triton"
    assert backend_for("cpu") in ("vesin", "torch")
    assert backend_for("cuda", "torch") == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_kernel_on_cuda_matches_ase(dtype):
    systems = [molecule("CH4"), fcc111("Pt", (2, 2, 3), vacuum=6.0), bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6)]
    systems[2].positions += 9.0
    for atoms in systems:
        atoms.rattle(0.02, seed=len(atoms))
    positions = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=dtype, device="cuda")
    cell = torch.tensor(np.stack([a.cell.array for a in systems]), dtype=dtype, device="cuda")
    pbc = torch.tensor(np.stack([a.pbc for a in systems]), device="cuda")
    n_node = [len(a) for a in systems]
    edge_index, shifts = neighbor_list(positions, 6.0, cell=cell, pbc=pbc, n_node=n_node, backend="triton")
    got = np.column_stack([edge_index.T.cpu().numpy(), shifts.cpu().numpy()])
    np.testing.assert_array_equal(lexsorted(got), ase_batched_reference(systems, 6.0))


@compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_backend_on_cuda_waits_once_for_its_output_size():
    # Bins and grids are sized on the host from per-system numbers: the kernel adds one scalar
    # read (the number of candidates) to the torch path's data-dependent selections.
    from molden.graph import radius_graph

    _, positions, cell, pbc, n_node = mixed_batch("cuda")
    radius_graph(positions, 4.0, cell=cell, pbc=pbc, n_node=n_node, backend="triton")  # compile first
    with _HostReads(max_values=13 * len(n_node) + 1) as watch:
        radius_graph(positions, 4.0, cell=cell, pbc=pbc, n_node=n_node, backend="triton")
    assert watch.reads == ["scalar read"]
    assert watch.copies <= 1


@compiled
@pytest.mark.parametrize("float_type", ["fp64", "fp32"])
def test_triton_kernel_compiles_for_a_cuda_gpu_without_one(float_type, monkeypatch, tmp_path):
    # The interpreter does not type-check as the compiler does: compile both passes to a
    # Hopper binary (ptxas ships in the Triton wheel), so CI without a GPU catches what only
    # the compiler would refuse.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from molden.graph.triton_cells import _candidates

    pointers = ["centre_order", "sorted_points", "points", "atom_system", "atom_bins", "bin_start", "systems", "cells",
                "search2_ptr", "counts", "starts", "out_j", "out_shift", "out_dist"]
    floats = {"sorted_points", "points", "cells", "search2_ptr", "out_dist"}
    for write in (False, True):
        signature = {name: f"*{float_type}" if name in floats else "*i32" for name in pointers}
        signature |= {"starts": "*i64" if write else "*i32", "n_atoms": "i32"}
        signature |= {"WRITE": "constexpr", "BLOCK_C": "constexpr", "BLOCK_J": "constexpr"}
        source = triton.compiler.ASTSource(
            fn=JITFunction(_candidates), signature=signature, constexprs={"WRITE": write, "BLOCK_C": 16, "BLOCK_J": 32}
        )
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"]
