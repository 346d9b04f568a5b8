"""The HDF5 graph cache: round trip, plain-h5py readability, atomic and resumable writing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from ase.io import read
from ase.neighborlist import neighbor_list

from molden.data import H5Dataset
from molden.pipeline import preprocess as pp
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess
from molden.data.sampling import BlockShuffleSampler
from molden.errors import MoldenConfigError, MoldenInputError


def _config(src, out, **kw) -> PreprocessConfig:
    return PreprocessConfig(source="ase", inputs=[src], out=out, cutoff_angstrom=4.0, **kw)


def test_cache_round_trips_structures_and_matches_ase_graph(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    summary = run_preprocess(_config(mixed_extxyz, out))
    frames = read(mixed_extxyz, ":")
    data = H5Dataset(out)
    assert len(data) == len(frames) == summary.n_structures
    for atoms, s in zip(frames, data):
        np.testing.assert_array_equal(s.numbers, atoms.numbers)
        np.testing.assert_array_equal(s.positions, atoms.positions)
        np.testing.assert_array_equal(s.pbc, atoms.pbc)
        assert s.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
        np.testing.assert_allclose(s.forces, atoms.get_forces(apply_constraint=False), atol=1e-12)
        i, j, S = neighbor_list("ijS", atoms, 4.0)
        ours = sorted(zip(s.edge_index[0], s.edge_index[1], *s.unit_shifts.T))
        ref = sorted(zip(i, j, *S.T))
        assert ours == ref


def test_cache_is_readable_with_plain_h5py(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    frames = read(mixed_extxyz, ":")
    with h5py.File(out) as f:
        assert f.attrs["format"] == "molden-graph-cache"
        assert f.attrs["cutoff_angstrom"] == 4.0
        a, e = f["structures/atom_offsets"][:], f["structures/edge_offsets"][:]
        s = 4
        pos = f["atoms/positions"][a[s] : a[s + 1]]
        ij = f["edges/index"][e[s] : e[s + 1]]
        shifts = f["edges/unit_shifts"][e[s] : e[s + 1]]
        d = pos[ij[:, 1]] + shifts @ f["structures/cell"][s] - pos[ij[:, 0]]
    _, _, dist = neighbor_list("ijd", frames[s], 4.0)
    np.testing.assert_allclose(np.sort(np.linalg.norm(d, axis=1)), np.sort(dist), atol=1e-10)


def test_statistics_and_splits_are_written(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    data = H5Dataset(out)
    stats = data.statistics()
    frames = read(mixed_extxyz, ":")
    counts = np.bincount(np.concatenate([a.numbers for a in frames]), minlength=119)
    np.testing.assert_array_equal(stats["element_counts"], counts)
    assert stats["n_atoms"] == counts.sum()
    # Per-element references reproduce total energies to within the fit's residual.
    ref = stats["element_reference_energy_ev"]
    pred = np.array([ref[a.numbers].sum() for a in frames])
    energies = np.array([a.get_potential_energy() for a in frames])
    assert np.abs(pred - energies).mean() < np.abs(energies - energies.mean()).mean()
    sizes = {name: len(H5Dataset(out, name)) for name in data.split_names}
    assert sum(sizes.values()) == len(frames)
    assert set(sizes) == {"train", "val", "test"}


@pytest.mark.parametrize("block_size", [1, 4, 7, 256])
@pytest.mark.parametrize("split", [None, "train"])
def test_reading_in_memory_and_from_disk_agree(mixed_extxyz, tmp_path, block_size, split):
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    mem, disk = H5Dataset(out, split), H5Dataset(out, split, in_memory_bytes=0, block_size=block_size)
    assert mem.in_memory and not disk.in_memory and len(mem) == len(disk)
    for k in np.random.default_rng(0).permutation(len(mem)):
        a, b = mem[int(k)], disk[int(k)]
        for name in ("numbers", "positions", "cell", "pbc", "fixed", "forces", "edge_index", "unit_shifts"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.system_id, a.frame, a.split, a.energy) == (b.system_id, b.frame, b.split, b.energy)


def _disk_dataset_logging_reads(mixed_extxyz, tmp_path, monkeypatch) -> tuple[H5Dataset, list[tuple[int, int]]]:
    """A 30-structure cache read from disk in blocks of 4, and the list its reads go into."""
    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    reads: list[tuple[int, int]] = []
    real_read = H5Dataset._read
    monkeypatch.setattr(H5Dataset, "_read", lambda self, a, b: reads.append((a, b)) or real_read(self, a, b))
    return H5Dataset(out, in_memory_bytes=0, block_size=4), reads


def test_block_shuffle_sampler_reads_each_block_once_per_epoch(mixed_extxyz, tmp_path, monkeypatch):
    disk, reads = _disk_dataset_logging_reads(mixed_extxyz, tmp_path, monkeypatch)
    sampler = BlockShuffleSampler(disk, seed=3)
    first = sampler.order()
    assert sorted(first.tolist()) == list(range(len(disk)))
    for k in first:
        disk[int(k)]
    # Each block is loaded whole once (after one structure of it was read alone): 2 reads a block.
    whole = sorted(a for a, b in reads if b - a > 1)
    assert whole == list(range(0, len(disk) - 1, 4)) and len(reads) == 2 * len(whole)
    np.testing.assert_array_equal(BlockShuffleSampler(disk, seed=3).order(), first)  # seeded
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.order(), first)  # a new order each epoch
    # Batches still mix blocks: the first 8 indices come from more than one block.
    assert len({int(k) // 4 for k in first[:8]}) > 1


@pytest.mark.parametrize("in_memory_bytes", [0, 1 << 30])
def test_threads_reading_one_dataset_get_the_same_structures(mixed_extxyz, tmp_path, in_memory_bytes):
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "c.h5"
    run_preprocess(_config(mixed_extxyz, out))
    expected = [s.positions for s in H5Dataset(out)]
    data = H5Dataset(out, in_memory_bytes=in_memory_bytes, block_size=4)
    order = np.random.default_rng(1).integers(0, len(data), size=400)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda k: data[int(k)].positions, order))
    for k, positions in zip(order, got):
        np.testing.assert_array_equal(positions, expected[k])


def test_random_reads_from_disk_read_single_structures(mixed_extxyz, tmp_path, monkeypatch):
    disk, reads = _disk_dataset_logging_reads(mixed_extxyz, tmp_path, monkeypatch)
    for k in (0, 9, 17, 25, 5, 29, 13):  # every read in a block not asked for before
        disk[k]
    assert [b - a for a, b in reads] == [1] * 7


def _interrupted_after(n: int, src, out) -> None:
    """Run preprocess in blocks of 7 structures and stop it after n, leaving a partial file."""

    def interrupt(done, total):
        if done >= n:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_preprocess(_config(src, out), progress=interrupt)


def test_interrupted_write_resumes_to_the_same_file(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 7)
    reference = tmp_path / "ref.h5"
    run_preprocess(_config(mixed_extxyz, reference))

    out = tmp_path / "c.h5"
    _interrupted_after(14, mixed_extxyz, out)
    assert not out.exists() and (tmp_path / "c.h5.partial").exists()
    with pytest.raises(MoldenInputError, match="interrupted"):
        H5Dataset(out)

    summary = run_preprocess(_config(mixed_extxyz, out))
    assert summary.resumed_from == 14
    assert not (tmp_path / "c.h5.partial").exists()
    with h5py.File(reference) as f, h5py.File(out) as g:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)


def test_a_mistyped_input_keeps_the_resumable_partial_file(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 7)
    out = tmp_path / "c.h5"
    _interrupted_after(7, mixed_extxyz, out)
    with pytest.raises(MoldenInputError, match="no such file"):
        run_preprocess(_config(tmp_path / "mixed.extxyz.typo", out))
    assert (tmp_path / "c.h5.partial").exists()
    assert run_preprocess(_config(mixed_extxyz, out)).resumed_from == 7


def test_changed_options_replace_a_stale_partial_file_only_with_overwrite(mixed_extxyz, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 7)
    out = tmp_path / "c.h5"
    _interrupted_after(7, mixed_extxyz, out)
    config = PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=out, cutoff_angstrom=3.0)
    with pytest.raises(MoldenConfigError, match="overwrite"):
        run_preprocess(config)
    assert out.with_name("c.h5.partial").exists()
    summary = run_preprocess(config.model_copy(update={"overwrite": True}))
    assert summary.resumed_from == 0
    assert H5Dataset(out).cutoff_angstrom == 3.0


def test_bad_input_leaves_no_partial_file(tmp_path):
    src = tmp_path / "bad.extxyz"
    src.write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.00001\n")
    out = tmp_path / "c.h5"
    with pytest.raises(MoldenInputError, match="overlap"):
        run_preprocess(_config(src, out))
    assert list(tmp_path.glob("c.h5*")) == []


def test_max_neighbors_drops_edges_and_reports_them(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    full = run_preprocess(_config(mixed_extxyz, tmp_path / "full.h5"))
    limited = run_preprocess(_config(mixed_extxyz, out, max_num_neighbors=4))
    assert limited.n_edges + limited.edges_dropped_by_max_neighbors == full.n_edges
    assert limited.edges_dropped_by_max_neighbors > 0
    assert H5Dataset(out).statistics()["edges_dropped_by_max_neighbors"] == limited.edges_dropped_by_max_neighbors


def test_atoms_without_neighbours_are_counted_and_reported(tmp_path):
    src = tmp_path / "far.extxyz"
    src.write_text('2\nProperties=species:S:1:pos:R:3 pbc="F F F"\nH 0 0 0\nH 0 0 20\n'
                   '2\nProperties=species:S:1:pos:R:3 pbc="F F F"\nH 0 0 0\nH 0 0 0.74\n')
    summary = run_preprocess(_config(src, tmp_path / "c.h5"))
    assert summary.isolated_atoms == 2
    assert summary.structures_with_isolated_atoms == ["far frame 0"]
    assert H5Dataset(tmp_path / "c.h5").statistics()["isolated_atoms"] == 2
