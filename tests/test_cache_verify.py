"""Damaged caches are found: checksums on every dataset, `molden inspect --verify`, one-line errors."""

from __future__ import annotations

import ase.io
import h5py
import numpy as np
import pytest
from ase.build import bulk
from typer.testing import CliRunner

from molden.cli.app import app
from molden.data import H5Dataset
from molden.data.cache_verify import SYSTEM_ID_DIGEST, system_id_digest, verify_cache
from molden.errors import MoldenInputError
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess


def _write_cache(src, out):
    run_preprocess(PreprocessConfig(source="ase", inputs=[src], out=out, cutoff_angstrom=4.0))
    return out


@pytest.fixture
def small_cache(mixed_extxyz, tmp_path):
    return _write_cache(mixed_extxyz, tmp_path / "c.h5")


@pytest.fixture(scope="module")
def large_cache(tmp_path_factory):
    """About 1 MiB of cache, mostly chunk data, so the middle of the file is array bytes."""
    tmp = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(300):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(atoms)
    ase.io.write(tmp / "cu.extxyz", frames)
    return _write_cache(tmp / "cu.extxyz", tmp / "cu.h5")


def _damage_chunk(path, dataset: str, chunk: int = 0) -> None:
    """Flip the bytes in the middle of one stored chunk of `dataset`."""
    with h5py.File(path) as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        data = bytearray(raw.read(8))
        raw.seek(info.byte_offset + info.size // 2)
        raw.write(bytes(b ^ 0xFF for b in data))


def _copy_without_checksums(src, out) -> None:
    """The same cache as a writer before checksums made it: no fletcher32, no id digest."""
    with h5py.File(src) as f, h5py.File(out, "w") as g:
        g.attrs.update(f.attrs)

        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                g.require_group(name).attrs.update(obj.attrs)
            elif obj.dtype.kind == "O":
                g.create_dataset(name, data=obj.asstr()[:], dtype=h5py.string_dtype("utf-8"), chunks=obj.chunks,
                                 maxshape=obj.maxshape)
            else:
                filters = dict(compression="gzip", shuffle=True) if obj.compression else {}
                g.create_dataset(name, data=obj[()], chunks=obj.chunks, maxshape=obj.maxshape, **filters).attrs.update(obj.attrs)

        f.visititems(copy)


def test_an_intact_cache_verifies_with_every_dataset_checksummed(small_cache):
    report = verify_cache(small_cache)
    assert report.ok and report.failure is None
    assert report.not_checksummed == []  # fletcher32 everywhere, a digest on the system ids
    with h5py.File(small_cache) as f:
        assert f["structures/system_id"].attrs[SYSTEM_ID_DIGEST] == system_id_digest(f["structures/system_id"].asstr()[:])
        assert report.bytes_read == sum(d.size * d.dtype.itemsize for d in _all_datasets(f))


def _all_datasets(f):
    found = []
    f.visititems(lambda n, o: found.append(o) if isinstance(o, h5py.Dataset) else None)
    return found


def test_inspect_verify_fails_in_one_line_on_64_kib_zeroed_in_the_middle(large_cache, tmp_path):
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(large_cache.read_bytes())
    size = damaged.stat().st_size
    assert size > 256 << 10
    with open(damaged, "r+b") as raw:
        raw.seek(size // 2 - (32 << 10))
        raw.write(bytes(64 << 10))
    plain = CliRunner().invoke(app, ["inspect", str(damaged)])  # metadata only: may or may not notice
    assert plain.exit_code in (0, 1) and "Traceback" not in plain.output and not isinstance(plain.exception, OSError)
    result = CliRunner().invoke(app, ["inspect", str(damaged), "--verify"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "damaged.h5" in errors[0] and "damaged" in errors[0]
    assert "Traceback" not in result.output
    with pytest.raises(MoldenInputError, match="damaged.h5.*--verify"):
        H5Dataset(damaged)  # read into memory at construction


def test_a_flipped_chunk_is_named_by_dataset_and_structure(small_cache):
    _damage_chunk(small_cache, "atoms/positions")
    report = verify_cache(small_cache)
    assert not report.ok
    assert "c.h5" in report.failure and "atoms/positions" in report.failure and "structures 0-29" in report.failure
    assert "\n" not in report.failure


def test_an_uncompressed_dataset_is_protected_by_its_checksum(small_cache):
    _damage_chunk(small_cache, "splits/train")  # no gzip stream here to notice the damage
    report = verify_cache(small_cache)
    assert not report.ok and "splits/train" in report.failure


def test_changed_system_ids_fail_their_digest(small_cache):
    with h5py.File(small_cache, "r+") as f:
        ids = f["structures/system_id"]
        ids[3] = ids.asstr()[3] + "x"
    report = verify_cache(small_cache)
    assert not report.ok and "structures/system_id" in report.failure and SYSTEM_ID_DIGEST in report.failure


def test_a_cache_written_before_checksums_still_reads_and_verifies(small_cache, tmp_path):
    old = tmp_path / "old.h5"
    _copy_without_checksums(small_cache, old)
    report = verify_cache(old)
    assert report.ok and "atoms/positions" in report.not_checksummed and "structures/system_id" in report.not_checksummed
    for storage in ({}, {"in_memory_bytes": 0}):
        for a, b in zip(H5Dataset(small_cache), H5Dataset(old, **storage)):
            np.testing.assert_array_equal(a.positions, b.positions)
            np.testing.assert_array_equal(a.edge_index, b.edge_index)
            assert a.system_id == b.system_id
    result = CliRunner().invoke(app, ["inspect", str(old), "--verify"])
    assert result.exit_code == 0 and "no checksum on" in result.output


def test_edges_leaving_their_structure_fail_verify_without_checksums(small_cache, tmp_path):
    old = tmp_path / "old.h5"
    _copy_without_checksums(small_cache, old)
    with h5py.File(old, "r+") as f:
        e = f["structures/edge_offsets"][:]
        a = f["structures/atom_offsets"][:]
        f["edges/index"][e[2]] = [0, a[3] - a[2]]  # one past the last atom of structure 2
    report = verify_cache(old)
    assert not report.ok and "structure 2" in report.failure and "edges/index" in report.failure
