"""Where `H5Dataset` keeps the arrays, what it sends to workers, and how it reports a damaged file."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from multiprocessing.reduction import ForkingPickler

import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase.build import bulk

from molden.data import H5Dataset
from molden.errors import MoldenInputError
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess


@pytest.fixture
def cache(mixed_extxyz, tmp_path):
    out = tmp_path / "c.h5"
    run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=out, cutoff_angstrom=4.0))
    return out


def _decompressed_bytes(path) -> int:
    with h5py.File(path) as f:
        names = ["atoms", "edges", "structures"]
        return sum(d.size * d.dtype.itemsize for n in names for d in f[n].values())


def _same(a, b) -> None:
    for name in ("numbers", "positions", "cell", "pbc", "fixed", "forces", "edge_index", "unit_shifts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.system_id, a.frame, a.split, a.energy, a.cache_index) == (b.system_id, b.frame, b.split, b.energy, b.cache_index)


@pytest.fixture(scope="module")
def crystal_cache(tmp_path_factory):
    """100 rattled 32-atom Cu crystals: many edges, so gzip shrinks the file several times."""
    tmp = tmp_path_factory.mktemp("crystals")
    rng = np.random.default_rng(0)
    frames = [bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)) for _ in range(100)]
    for atoms in frames:
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    ase.io.write(tmp / "cu.extxyz", frames)
    run_preprocess(PreprocessConfig(source="ase", inputs=[tmp / "cu.extxyz"], out=tmp / "cu.h5", cutoff_angstrom=4.0))
    return tmp / "cu.h5"


def test_memory_is_decided_on_the_decompressed_size(crystal_cache):
    size, decompressed = crystal_cache.stat().st_size, _decompressed_bytes(crystal_cache)
    assert decompressed > 2 * size  # gzip: the file is much smaller than its arrays
    between = (size + decompressed) // 2
    assert not H5Dataset(crystal_cache, in_memory_bytes=between).in_memory
    assert H5Dataset(crystal_cache, in_memory_bytes=2 * decompressed).in_memory


def test_workers_receive_no_copy_of_the_arrays(cache):
    data = H5Dataset(cache)
    assert data.in_memory
    data[0]  # a user who looks at one structure before training
    # What a spawned DataLoader worker receives: shared-memory handles, not the arrays' bytes.
    sent = len(ForkingPickler.dumps(data))
    assert sent < data.nbytes / 4, (sent, data.nbytes)
    worker = ForkingPickler.loads(ForkingPickler.dumps(data))
    for k in range(len(data)):
        _same(data[k], worker[k])


def test_in_memory_arrays_are_loaded_once_into_shared_memory_before_workers_start(cache):
    data = H5Dataset(cache)
    assert data._arrays is not None  # a DataLoader forked now inherits them instead of reloading
    assert all(t.is_shared() for t in data._shared.values())


@pytest.mark.parametrize("split", [None, "val"])
def test_a_memory_mapped_sidecar_reads_the_same_structures(cache, tmp_path, split):
    memory = H5Dataset(cache, split)
    mapped = H5Dataset(cache, split, sidecar=tmp_path / "side")
    assert mapped.storage == "mmap" and len(mapped) == len(memory)
    for k in range(len(memory)):
        _same(memory[k], mapped[k])
    assert isinstance(mapped._arrays["atoms/positions"], np.memmap)
    assert not mapped._arrays["atoms/positions"].flags.writeable
    manifest = (tmp_path / "side" / "manifest.json").stat().st_mtime_ns
    H5Dataset(cache, sidecar=tmp_path / "side")  # reused, not rewritten
    assert (tmp_path / "side" / "manifest.json").stat().st_mtime_ns == manifest


def test_a_sidecar_of_another_cache_is_refused(cache, mixed_extxyz, tmp_path):
    H5Dataset(cache, sidecar=tmp_path / "side")
    other = tmp_path / "other.h5"
    run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=other, cutoff_angstrom=3.0))
    with pytest.raises(MoldenInputError, match="another cache"):
        H5Dataset(other, sidecar=tmp_path / "side")


def _flip_chunk(path, dataset: str, chunk: int = 0) -> None:
    with h5py.File(path) as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        data = raw.read(8)
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes(b ^ 0xFF for b in data))


def test_a_damaged_chunk_raises_one_line_naming_file_and_structure(cache):
    _flip_chunk(cache, "atoms/positions")
    disk = H5Dataset(cache, in_memory_bytes=0)
    with pytest.raises(MoldenInputError) as raised:
        disk[7]
    message = str(raised.value)
    assert "\n" not in message and str(cache) in message and "record 7" in message
    assert "atoms/positions" in message and "molden inspect --verify" in message
    with pytest.raises(MoldenInputError, match="atoms/positions.*damaged"):
        H5Dataset(cache)  # in memory: read at construction


_FORKED: H5Dataset | None = None


def _read_inherited(k: int) -> tuple[int, bool, list]:
    """In a forked child: read through the dataset the parent had open."""
    inherited = _FORKED._file
    positions = _FORKED[k].positions.tolist()
    return os.getpid(), _FORKED._file is not inherited and _FORKED._file_pid == os.getpid(), positions


def test_a_handle_inherited_through_fork_is_not_used(cache):
    global _FORKED
    _FORKED = data = H5Dataset(cache, in_memory_bytes=0)
    data[3]  # the parent now holds an open HDF5 handle
    parent_handle = data._file
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_pid, reopened, positions = pool.apply(_read_inherited, (5,))
    assert child_pid != os.getpid() and reopened
    np.testing.assert_array_equal(positions, data[5].positions)
    assert data._file is parent_handle and data._file.id.valid  # the parent's handle is untouched


_LOADER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch.utils.data import DataLoader
    from molden.data import H5Dataset, collate
    from molden.data.sampling import BlockShuffleSampler


    def heavy_collate(structures):
        # A large tensor per batch keeps each worker's queue feeder busy handing it over
        # (torch's share_fd), where a worker stopped mid-epoch used to abort on exit.
        return collate(structures), torch.ones(1 << 24)


    if __name__ == "__main__":
        path, context = sys.argv[1], sys.argv[2]
        data = H5Dataset(path, in_memory_bytes=0, block_size=4)
        data[0]  # the main process holds an open handle too
        loader = DataLoader(data, batch_size=3, sampler=BlockShuffleSampler(data), num_workers=2,
                            collate_fn=collate, multiprocessing_context=context)
        n = sum(batch.num_graphs for batch in loader)
        assert n == len(data), n
        loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=heavy_collate,
                            multiprocessing_context=context)
        for k, batch in enumerate(loader):  # stop mid-epoch, as a training loop that breaks does
            if k == 2:
                break
        print("ok")
    """
)


@pytest.mark.slow  # worker processes: about 7 s with fork, 25 s with spawn on 2 cores
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_multi_worker_loader_reads_a_disk_cache_and_stops_cleanly(cache, tmp_path, context):
    script = tmp_path / "loader.py"
    script.write_text(_LOADER_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(cache), context], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")
    for sign in ("terminate called", "killed by signal", "Traceback"):
        assert sign not in run.stderr, run.stderr[-2000:]


class _SlowToPickle:
    """Stands for a batch whose pickling (torch's share_fd) is still running at worker exit."""

    def __reduce__(self):
        time.sleep(0.3)
        return (int, (0,))


def test_a_dataloader_worker_waits_at_exit_for_its_queue_feeder(monkeypatch):
    import torch.utils.data

    from molden.data import worker_exit

    queue = multiprocessing.get_context("spawn").Queue()
    queue.put(_SlowToPickle())
    queue.cancel_join_thread()  # what a DataLoader worker told to stop does
    queue.close()
    feeder = queue._thread
    assert feeder.is_alive()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    worker_exit.join_queue_feeders()  # the exit hook every unpickled H5Dataset registers
    assert not feeder.is_alive()


@pytest.mark.parametrize("cache_fixture", ["emt_cache", "s2ef_cache", "qm9_cache"])
@pytest.mark.parametrize("in_memory_bytes", [None, 0])  # the default (in memory) and from disk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collated_equals_collating_the_structures(cache_fixture, in_memory_bytes, dtype, request):
    """The training loader's batched read (`H5Dataset.collated`) is exactly `collate` of the
    structures, every field, in any order of positions, repeated ones included."""
    import dataclasses

    from molden.data import collate

    path = request.getfixturevalue(cache_fixture)
    kwargs = {} if in_memory_bytes is None else {"in_memory_bytes": in_memory_bytes}
    data = H5Dataset(path, "train", **kwargs)
    positions = [int(k) for k in np.random.default_rng(0).permutation(len(data))[:9]] + [0, 0]
    expected = collate([data[k] for k in positions], dtype=dtype)
    # the one field `collate` cannot know: the cache's graphs are whole radius graphs
    assert data.complete_graph_cutoff_angstrom == data.cutoff_angstrom and expected.graph_cutoff_angstrom is None
    expected = dataclasses.replace(expected, graph_cutoff_angstrom=data.cutoff_angstrom)
    got = data.collated(positions, dtype=dtype)
    for field in dataclasses.fields(expected):
        want, have = getattr(expected, field.name), getattr(got, field.name)
        if isinstance(want, torch.Tensor):
            assert have is not None and have.dtype == want.dtype and torch.equal(have, want), field.name
        else:
            assert have == want, field.name
