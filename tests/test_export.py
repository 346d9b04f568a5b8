"""`molden export`: every field survives cache → extxyz → cache, peers read forces raw, and bad
`--out` values are refused before any work."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from molden.cli.app import app
from molden.data.ase_convert import atoms_from_structure, check_export_keys, extra_fields, structure_from_atoms
from molden.data.export import EXPORT_FORMATS, export_cache
from molden.data.h5_dataset import H5Dataset
from molden.data.h5_writer import CacheWriter
from molden.data.readers import read_ase
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError
from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

runner = CliRunner()
# extxyz writes per-atom floats with 8 decimals ("%16.8f"); scalars and the cell exactly.
PER_ATOM_ATOL = 1e-8
TARGET_NAMES = ["mu", "U0", "homolumogap", "reference_energy"]
SPLITS = ["train", "val_id", "test_ood_both", "12", "T"]


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ structures with every field
def _per_atom_vectors(draw, n: int) -> np.ndarray:
    return np.array(draw(st.lists(st.floats(-30, 30), min_size=3 * n, max_size=3 * n))).reshape(n, 3)


# How to draw each field `extra_fields()` exports; a new Structure field must be added here
# (test_every_structure_field_is_exported fails until it is).
EXTRA_FIELD_VALUES = {
    "relaxed_positions": lambda draw, n, positions: positions + draw(st.floats(-0.3, 0.3)),
    "relaxed_energy": lambda draw, n, positions: draw(st.floats(-1e4, 1e4)),
    "converged": lambda draw, n, positions: draw(st.booleans()),
}


@st.composite
def structure_sets(draw) -> list[Structure]:
    """1-4 structures sharing which optional fields they have (as a cache requires)."""
    n_structures = draw(st.integers(1, 4))
    has = {name: draw(st.booleans()) for name in ("tags", "energy", "forces", "fixed", "split")}
    extras = [name for name in extra_fields() if draw(st.booleans())]
    targets = draw(st.lists(st.sampled_from(TARGET_NAMES), unique=True, max_size=3))
    text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
    structures = []
    for k in range(n_structures):
        n = draw(st.integers(1, 6))
        # Atoms on a 1.3 Å grid, jittered: never overlapping.
        grid = np.array([(i % 2, (i // 2) % 2, i // 4) for i in range(n)], float) * 1.3 + 1.0
        positions = grid + draw(st.floats(-0.2, 0.2)) * np.array([1.0, -0.5, 0.25])
        pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
        cell = np.diag([6.0, 6.5, 7.0]) + np.array([[0, 0, 0], [draw(st.floats(-1, 1)), 0, 0], [0, 0, 0]])
        if not pbc.any() and draw(st.booleans()):
            cell = np.zeros((3, 3))
        fields = dict(
            numbers=draw(st.lists(st.integers(1, 92), min_size=n, max_size=n)),
            positions=positions,
            cell=cell,
            pbc=pbc,
            system_id=draw(text),
            frame=draw(st.integers(0, 10_000)),
            targets={name: draw(st.floats(-1e6, 1e6)) for name in targets},
        )
        if has["tags"]:
            fields["tags"] = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
        if has["fixed"]:
            fields["fixed"] = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        if has["energy"]:
            fields["energy"] = draw(st.floats(-1e5, 1e5))
        if has["forces"]:
            fields["forces"] = _per_atom_vectors(draw, n)
        if has["split"] and draw(st.booleans()):
            fields["split"] = draw(st.sampled_from(SPLITS))
        for name in extras:
            fields[name] = EXTRA_FIELD_VALUES[name](draw, n, positions)
        structures.append(Structure(**fields))
    return structures


def write_cache(structures: list[Structure], path: Path) -> Path:
    """`structures` → a cache at `path`, as `molden preprocess` writes it (unassigned → train).
    The graphs are left empty: export does not read them."""
    with_graphs = [s.with_graph(np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int32)) for s in structures]
    writer = CacheWriter(path, {"source": "ase", "test": True}, resume=False)
    writer.write(with_graphs)
    return writer.finalize(lambda ids, index: np.array(["train"] * len(ids), dtype=object))


def assert_same_structure(a: Structure, b: Structure) -> None:
    """Every data field equal (graph and cache position aside), per-atom floats to 1e-8."""
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_array_equal(a.pbc, b.pbc)
    np.testing.assert_array_equal(a.fixed, b.fixed)
    np.testing.assert_allclose(a.cell, b.cell, rtol=0, atol=1e-12)
    for name in ("positions", "forces", "relaxed_positions"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=0, atol=PER_ATOM_ATOL, err_msg=name)
    assert (a.tags is None) == (b.tags is None)
    if a.tags is not None:
        np.testing.assert_array_equal(a.tags, b.tags)
    for name in ("energy", "relaxed_energy", "converged", "system_id", "frame", "split", "targets"):
        assert getattr(a, name, None) == getattr(b, name, None), name
    for name in extra_fields():  # any field added later
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if isinstance(x, np.ndarray):
            np.testing.assert_allclose(x, y, rtol=0, atol=PER_ATOM_ATOL, err_msg=name)
        else:
            assert x == y, name


# ------------------------------------------------------------------ round trips
def test_every_structure_field_is_exported():
    own = {"numbers", "positions", "cell", "pbc", "tags", "fixed", "energy", "forces", "system_id", "frame",
           "targets", "split"}
    graph_and_cache = {"edge_index", "unit_shifts", "cache_index"}
    names = {f.name for f in dataclasses.fields(Structure)}
    assert names - own - graph_and_cache == set(extra_fields())
    assert set(extra_fields()) <= set(EXTRA_FIELD_VALUES), "draw values for the new field in EXTRA_FIELD_VALUES"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures=structure_sets(), keys=st.sampled_from([("energy", "forces"), ("REF_energy", "REF_forces")]),
       suffix=st.sampled_from([".extxyz", ".xyz.gz"]))
def test_structure_cache_extxyz_structure_round_trip_keeps_every_field(structures, keys, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(structures, Path(tmp) / "x.h5")
        stored = H5Dataset(cache)
        originals = [stored[k] for k in range(len(stored))]
        for original, given_ in zip(originals, structures):
            assert_same_structure(original, dataclasses.replace(given_, split=given_.split or "train"))
        out = Path(tmp) / f"x{suffix}"
        summary = export_cache(cache, out, energy_key=keys[0], forces_key=keys[1])
        assert summary.n_structures == len(structures)
        back = list(read_ase(out))
        assert len(back) == len(originals)
        for a, b in zip(originals, back):
            assert_same_structure(a, b)


def slab_frames(n: int = 6) -> list:
    """Cu(111) slabs with an O adsorbate: bottom layer fixed, OC20 tags, EMT energy and forces."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    frames = []
    for k in range(n):
        atoms = fcc111("Cu", (2, 2, 3), vacuum=5.0)
        add_adsorbate(atoms, "O", 1.6 + 0.05 * k, "fcc")
        atoms.info.pop("adsorbate_info")  # a dict extxyz cannot hold
        atoms.set_tags([0] * 4 + [1] * 8 + [2])
        atoms.set_constraint(FixAtoms(indices=range(4)))
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    return frames


@pytest.fixture
def slab_cache(tmp_path) -> Path:
    source = tmp_path / "slabs.extxyz"
    ase.io.write(source, slab_frames())
    config = PreprocessConfig(source="ase", inputs=[source], out=tmp_path / "slabs.h5", cutoff_angstrom=4.0)
    return run_preprocess(config).path


@pytest.mark.parametrize("keys", [("energy", "forces"), ("REF_energy", "REF_forces")])
def test_cache_extxyz_cache_round_trip_keeps_every_array_and_split(slab_cache, tmp_path, keys):
    out = tmp_path / "slabs_export.extxyz"
    export_cache(slab_cache, out, energy_key=keys[0], forces_key=keys[1])
    config = PreprocessConfig(source="ase", inputs=[out], out=tmp_path / "again.h5", cutoff_angstrom=4.0)
    again = run_preprocess(config).path
    first, second = H5Dataset(slab_cache), H5Dataset(again)
    assert len(first) == len(second) == 6
    for k in range(len(first)):
        assert_same_structure(first[k], second[k])
        np.testing.assert_array_equal(first[k].edge_index, second[k].edge_index)
    with h5py.File(slab_cache) as a, h5py.File(again) as b:
        assert set(a["splits"]) == set(b["splits"])
        for name in a["splits"]:
            np.testing.assert_array_equal(a["splits"][name][:], b["splits"][name][:])


def test_ref_keys_give_peers_the_forces_of_fixed_atoms(slab_cache, tmp_path):
    plain, raw = tmp_path / "plain.extxyz", tmp_path / "raw.extxyz"
    export_cache(slab_cache, plain)
    summary = export_cache(slab_cache, raw, energy_key="REF_energy", forces_key="REF_forces")
    assert summary.fixed_atoms_with_forces == 6 * 4
    cached = H5Dataset(slab_cache)[0]
    assert np.abs(cached.forces[:4]).max() > 1e-3  # EMT forces on the fixed layer are not zero
    # What ASE-based trainers see: get_forces() applies FixAtoms (move_mask) and zeroes them...
    zeroed = ase.io.read(plain, 0)
    np.testing.assert_array_equal(zeroed.get_forces()[:4], 0.0)
    # ...while the REF_ keys are plain arrays and info entries that no constraint touches.
    atoms = ase.io.read(raw, 0)
    assert atoms.calc is None or "forces" not in atoms.calc.results
    np.testing.assert_allclose(atoms.arrays["REF_forces"], cached.forces, rtol=0, atol=PER_ATOM_ATOL)
    assert atoms.info["REF_energy"] == cached.energy
    assert not atoms.arrays["move_mask"][:4].any() if "move_mask" in atoms.arrays else atoms.constraints


def test_atoms_round_trip_without_a_file_keeps_relaxed_fields_and_split():
    s = Structure(numbers=[8, 1], positions=[[0, 0, 0], [0, 0, 1.0]], energy=-1.5, forces=np.ones((2, 3)),
                  relaxed_positions=[[0, 0, 0.1], [0, 0, 1.1]], relaxed_energy=-2.0, split="val_id",
                  system_id="7", frame=3, fixed=[True, False], targets={"U0": 1.25})
    assert_same_structure(s, structure_from_atoms(atoms_from_structure(s)))


# ------------------------------------------------------------------ keys, formats and --out
@pytest.mark.parametrize("energy_key, forces_key", [
    ("REF_energy", "REF_energy"), ("REF energy", "REF_forces"), ("tags", "REF_forces"),
    ("REF_energy", "move_mask"), ("REF_energy", "relaxed_positions"), ("energy", "energy"),
])
def test_ambiguous_export_keys_are_refused(energy_key, forces_key):
    with pytest.raises(MoldenConfigError):
        check_export_keys(energy_key, forces_key)


def test_target_named_like_an_ase_key_is_refused():
    with pytest.raises(MoldenConfigError, match="'stress'"):
        check_export_keys("energy", "forces", ["U0", "stress"])


def _one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in message, message
    return message


def test_unknown_format_is_one_line_listing_the_formats_before_any_work(tmp_path):
    # The cache does not even exist: the format is checked first.
    message = _one_line_error(_run("export", tmp_path / "x.h5", "--out", tmp_path / "x.foo"), "x.foo")
    for fmt, endings in EXPORT_FORMATS.items():
        assert fmt in message and all(e in message for e in endings)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_overwrite(slab_cache, tmp_path):
    out = tmp_path / "notes.extxyz"
    out.write_text("keep me")
    _one_line_error(_run("export", slab_cache, "--out", out), "--overwrite")
    assert out.read_text() == "keep me"
    result = _run("export", slab_cache, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(ase.io.read(out, ":")) == 6


def test_export_never_writes_onto_its_input(slab_cache, tmp_path):
    named_like_xyz = tmp_path / "cache.xyz"
    named_like_xyz.write_bytes(slab_cache.read_bytes())
    before = named_like_xyz.read_bytes()
    _one_line_error(_run("export", named_like_xyz, "--out", named_like_xyz, "--overwrite"), "cache being exported")
    assert named_like_xyz.read_bytes() == before


def test_out_folder_is_refused(slab_cache, tmp_path):
    _one_line_error(_run("export", slab_cache, "--out", tmp_path), "folder")


def test_traj_refuses_fields_it_cannot_hold(tmp_path):
    s = Structure(numbers=[8, 1], positions=[[0, 0, 0], [0, 0, 1.0]], relaxed_positions=[[0, 0, 0], [0, 0, 1.1]])
    cache = write_cache([s], tmp_path / "r.h5")
    with pytest.raises(MoldenInputError, match="relaxed_positions"):
        export_cache(cache, tmp_path / "r.traj")
    assert not list(tmp_path.glob("r.*traj"))
    export_cache(cache, tmp_path / "r.extxyz")
    assert_same_structure(H5Dataset(cache)[0], next(read_ase(tmp_path / "r.extxyz")))


def test_traj_keeps_every_field_it_can_hold(slab_cache, tmp_path):
    export_cache(slab_cache, tmp_path / "s.traj")
    cached = H5Dataset(slab_cache)
    for k, back in enumerate(read_ase(tmp_path / "s.traj")):
        assert_same_structure(cached[k], back)


def test_cli_export_with_ref_keys_and_a_note_about_fixed_atoms(slab_cache, tmp_path):
    result = _run("export", slab_cache, "--out", tmp_path / "a.extxyz")
    assert result.exit_code == 0 and "REF_forces" in result.stderr, result.output
    result = _run("export", slab_cache, "--out", tmp_path / "b.extxyz", "--energy-key", "REF_energy",
                  "--forces-key", "REF_forces")
    assert result.exit_code == 0 and "note" not in result.stderr, result.output
    assert "REF_forces" in ase.io.read(tmp_path / "b.extxyz", 0).arrays


def test_export_into_a_missing_folder_creates_it(tmp_path, mixed_extxyz):
    from molden.data.export import export_cache
    from molden.pipeline.preprocess import PreprocessConfig, run_preprocess

    cache = run_preprocess(PreprocessConfig(source="ase", inputs=[mixed_extxyz], out=tmp_path / "c.h5")).path
    summary = export_cache(cache, tmp_path / "new" / "dir" / "x.extxyz")
    assert summary.path.exists()
