"""Specifications of the EMT catalysis generator (`molden.data.emt`) on a tiny config."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.calculators.fd import calculate_numerical_forces
from pydantic import ValidationError

from molden.data.adsorbates import ADSORBATE_ELEMENTS, adsorbate_atoms, place_adsorbate, relaxation_anomaly
from molden.data.emt import SPLITS, EMTConfig, EMTMDConfig, build_slab, generate_emt
from molden.data.structure import TAG_ADSORBATE, TAG_SUBSURFACE, TAG_SURFACE, Structure

TINY = EMTConfig(
    n_systems=12, seed=3, slab_size=(2, 2), n_layers=3, n_fixed_layers=1, max_steps=100,
    split_fractions={"train": 0.5, "val_id": 0.1, "test_id": 0.1,
                     "test_ood_ads": 0.1, "test_ood_cat": 0.1, "test_ood_both": 0.1},
)
ADS_NUMBERS = {1, 6, 7, 8}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _generate_logging(config: EMTConfig) -> tuple[list[Structure], list[logging.LogRecord]]:
    """Every frame, and what the generator logged while making them."""
    logger = logging.getLogger("molden.data.emt")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        return list(generate_emt(config)), handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def generated() -> tuple[list[Structure], list[logging.LogRecord]]:
    return _generate_logging(TINY)


@pytest.fixture(scope="module")
def frames(generated) -> list[Structure]:
    return generated[0]


@pytest.fixture(scope="module")
def systems(frames) -> dict[str, list[Structure]]:
    by_id: dict[str, list[Structure]] = defaultdict(list)
    for s in frames:
        by_id[s.system_id].append(s)
    return dict(by_id)


def _assert_same(a: list[Structure], b: list[Structure]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.system_id, x.frame, x.split, x.targets) == (y.system_id, y.frame, y.split, y.targets)
        for name in ("numbers", "positions", "forces", "tags", "fixed", "relaxed_positions"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert x.energy == y.energy and x.relaxed_energy == y.relaxed_energy


def test_same_seed_gives_identical_frames(frames):
    _assert_same(frames, list(generate_emt(TINY)))


def test_two_workers_match_one_worker_and_report_progress(frames):
    done: list[int] = []
    parallel = list(generate_emt(TINY.model_copy(update={"workers": 2}), progress=done.append))
    _assert_same(frames, parallel)
    assert done == sorted(done) and done[-1] == TINY.n_systems


def _skipped(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]


def test_every_requested_system_is_kept_or_logged_as_skipped(generated, systems):
    frames_, records = generated
    skipped = _skipped(records)
    assert len(systems) + len(skipped) == TINY.n_systems
    summary = [r.getMessage() for r in records if r.getMessage().startswith("EMT: ")]
    assert summary and summary[-1].startswith(f"EMT: {len(systems)} systems, {len(frames_)} frames, ")
    assert f"{len(skipped)} skipped" in summary[-1]


def test_a_system_whose_every_attempt_fails_is_skipped_and_logged(monkeypatch):
    from molden.data import emt

    config = TINY.model_copy(update={"n_systems": 3, "max_steps": 5, "max_attempts": 2})
    calls: list[int] = []

    def fail_system_one(initial, *args):
        calls.append(1)
        return "dissociated" if len(calls) <= config.max_attempts else None  # system 0's attempts fail

    monkeypatch.setattr(emt, "relaxation_anomaly", fail_system_one)
    frames_, records = _generate_logging(config)
    kept = {s.system_id for s in frames_}
    assert kept == {"emt_000001", "emt_000002"}
    skipped = _skipped(records)
    assert len(skipped) == 1 and "dissociated" in skipped[0]


def test_every_structure_validates(frames):
    for s in frames:
        s.validate()
        assert tuple(s.pbc) == (True, True, False)


def test_tags_match_geometry(frames):
    for s in frames:
        assert set(s.tags.tolist()) == {TAG_SUBSURFACE, TAG_SURFACE, TAG_ADSORBATE}
        z = s.positions[:, 2]
        ads, surface, sub = (s.tags == t for t in (TAG_ADSORBATE, TAG_SURFACE, TAG_SUBSURFACE))
        assert set(s.numbers[ads].tolist()) <= ADS_NUMBERS
        assert not set(s.numbers[~ads].tolist()) & ADS_NUMBERS
        assert z[sub].max() < z[surface].min()  # sub-surface layers lie below the surface layers
        assert z[ads].min() > z[surface].min()  # the adsorbate sits on the surface, not inside


def test_bottom_layers_are_fixed_and_never_move(systems):
    for frames_ in systems.values():
        first = frames_[0]
        np.testing.assert_array_equal(first.fixed, first.tags == TAG_SUBSURFACE)
        assert first.fixed.any() and not first.fixed.all()
        for s in frames_[1:]:
            np.testing.assert_array_equal(s.positions[first.fixed], first.positions[first.fixed])


def test_converged_systems_end_below_fmax_and_others_ran_out_of_steps(systems):
    for frames_ in systems.values():
        last = frames_[-1]
        fmax = np.linalg.norm(last.forces[~last.fixed], axis=1).max()
        if last.converged:
            assert fmax <= TINY.fmax_ev_per_angstrom
        else:
            assert len(frames_) == TINY.max_steps + 1 and fmax > TINY.fmax_ev_per_angstrom


def test_relaxation_lowers_the_energy(systems):
    for frames_ in systems.values():
        assert frames_[-1].energy <= frames_[0].energy


def test_forces_are_minus_the_energy_gradient(systems):
    frame = next(iter(systems.values()))[1]
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    atoms.calc = EMT()
    assert atoms.get_potential_energy() == pytest.approx(frame.energy, abs=1e-9)
    np.testing.assert_allclose(calculate_numerical_forces(atoms, eps=1e-5), frame.forces, atol=1e-5)


def test_relaxed_fields_come_from_the_last_frame(systems):
    for frames_ in systems.values():
        last = frames_[-1]
        assert [s.frame for s in frames_] == list(range(len(frames_)))
        for s in frames_:
            np.testing.assert_array_equal(s.relaxed_positions, last.positions)
            assert s.relaxed_energy == last.energy
            assert (s.split, s.targets, s.converged) == (last.split, last.targets, last.converged)
        assert np.isfinite(last.targets["adsorption_energy"])


def test_ood_splits_hold_out_metals_and_adsorbates(systems):
    held_ads = {tuple(sorted(adsorbate_atoms(a).get_chemical_symbols())) for a in TINY.ood_adsorbates}
    assert set(Counter(f[0].split for f in systems.values())) == set(SPLITS)
    for frames_ in systems.values():
        s = frames_[0]
        ads = s.tags == TAG_ADSORBATE
        metal = Atoms(numbers=s.numbers[~ads]).get_chemical_symbols()[0]
        adsorbate = tuple(sorted(Atoms(numbers=s.numbers[ads]).get_chemical_symbols()))
        assert (metal in TINY.ood_metals) == (s.split in ("test_ood_cat", "test_ood_both"))
        assert (adsorbate in held_ads) == (s.split in ("test_ood_ads", "test_ood_both"))
        assert set(adsorbate) <= ADSORBATE_ELEMENTS


def test_broken_relaxations_are_named_anomalies():
    slab = build_slab("Cu", "111", TINY)
    initial = place_adsorbate(slab, "CO", np.random.default_rng(0))
    n = len(slab)

    def anomaly(moved: np.ndarray, energy_change_ev: float = -1.0) -> str | None:
        return relaxation_anomaly(initial, moved, energy_change_ev, np.zeros_like(moved), slab.info["top_layer"])

    assert anomaly(initial.positions.copy()) is None
    split_apart = initial.positions.copy()
    split_apart[n + 1, 2] += 3.0
    assert anomaly(split_apart) == "dissociated"
    lifted = initial.positions.copy()
    lifted[n:, 2] += 6.0
    assert anomaly(lifted) == "desorbed"
    sunk = initial.positions.copy()
    sunk[n:, 2] -= 4.0
    assert anomaly(sunk) == "intercalated"
    assert anomaly(initial.positions.copy(), energy_change_ev=0.5) == "energy rose"


def test_config_rejects_held_out_metal_outside_metals():
    with pytest.raises(ValidationError):
        EMTConfig(metals=("Cu", "Ag"), ood_metals=("Pt",))


def test_resume_after_a_frame_relaxes_only_the_systems_not_finished(frames, monkeypatch):
    from molden.data import emt

    k = len(frames) // 2
    index = emt.system_index(frames[k].system_id)
    relaxed: list[int] = []
    real = emt.relax_system
    monkeypatch.setattr(emt, "relax_system", lambda config, i, split: relaxed.append(i) or real(config, i, split))
    rest = list(generate_emt(TINY, resume_after=(index, frames[k].frame)))
    _assert_same(frames[k + 1 :], rest)
    assert relaxed == list(range(index, TINY.n_systems))


@pytest.mark.parametrize("md", [None, EMTMDConfig(frames=5, interval_steps=2)], ids=["relaxations", "md"])
def test_interrupted_emt_preprocess_resumes_to_the_same_file(tmp_path, monkeypatch, md):
    import h5py

    from molden.data import emt
    from molden.pipeline import preprocess as pp

    monkeypatch.setattr(pp, "BLOCK_STRUCTURES", 16 if md is None else 7)  # MD: a block ends inside a system
    config = dict(source="emt", emt=TINY.model_copy(update={"n_systems": 6, "md": md}))
    reference = tmp_path / "ref.h5"
    pp.run_preprocess(pp.PreprocessConfig(out=reference, **config))

    out = tmp_path / "c.h5"
    progress: list[tuple[int, int | None]] = []

    def interrupt(done, total):
        progress.append((done, total))
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pp.run_preprocess(pp.PreprocessConfig(out=out, **config), progress=interrupt)
    assert progress[-1] == (4, 6)  # emt reports systems relaxed out of systems asked for
    relaxed: list[int] = []
    real = emt.relax_system
    monkeypatch.setattr(emt, "relax_system", lambda c, i, split: relaxed.append(i) or real(c, i, split))
    summary = pp.run_preprocess(pp.PreprocessConfig(out=out, **config))
    assert summary.resumed_from > 0 and relaxed and relaxed[0] > 0  # earlier systems not redone
    with h5py.File(reference) as f, h5py.File(out) as g:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)


def test_converged_is_a_per_system_flag_in_the_cache_not_a_target(frames, tmp_path):
    import h5py

    from molden.data import H5Dataset
    from molden.data.h5_writer import CacheWriter

    assert all(set(s.targets) == {"adsorption_energy"} and isinstance(s.converged, bool) for s in frames)
    writer = CacheWriter(tmp_path / "emt.h5", {"source": "emt"})
    no_edges = dict(edge_index=np.zeros((2, 0), np.int64), unit_shifts=np.zeros((0, 3), np.int32))
    writer.write([s.with_graph(**no_edges) for s in frames])
    path = writer.finalize(lambda ids, index: np.full(len(ids), "train", dtype=object))
    with h5py.File(path) as f:
        assert f["structures/converged"].dtype == bool
        np.testing.assert_array_equal(f["structures/converged"][:], [s.converged for s in frames])
        assert f.attrs["target_names"] == '["adsorption_energy"]'
        assert f["stats/targets_mean"].shape == (1,)
    dataset = H5Dataset(path, in_memory_bytes=0)
    assert [dataset[i].converged for i in range(len(dataset))] == [s.converged for s in frames]


def test_the_cache_is_the_same_file_whatever_the_thread_count(tmp_path):
    """BLAS and OpenMP thread counts, set before numpy loads, change neither the relaxations nor
    the fitted statistics (least squares included): one machine, one file (FORMAT: checksums)."""
    import os
    import subprocess
    import sys

    import h5py

    script = ("import sys; from molden.data.emt import EMTConfig; from molden.pipeline import preprocess as pp; "
              f"emt = EMTConfig.model_validate_json({TINY.model_copy(update={'n_systems': 4}).model_dump_json()!r}); "
              "pp.run_preprocess(pp.PreprocessConfig(out=sys.argv[1], source='emt', emt=emt))")
    for threads in ("1", "3"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"t{threads}.h5")], check=True, env=env,
                       timeout=300, capture_output=True)
    with h5py.File(tmp_path / "t1.h5") as f, h5py.File(tmp_path / "t3.h5") as g:
        names: list[str] = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert "stats/element_reference_energy_ev" in names
        for name in names:
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)  # NaNs of absent elements equal
        assert dict(f["stats"].attrs) == dict(g["stats"].attrs)  # the fitted scales (energy_residual_std_ev, ...)


MD = EMTMDConfig(frames=6, interval_steps=4)


@pytest.fixture(scope="module")
def md_frames() -> list[Structure]:
    return list(generate_emt(TINY.model_copy(update={"md": MD})))


def test_md_frames_start_from_each_relaxed_system_and_stay_far_from_equilibrium(md_frames, systems):
    relaxed = {sid: frames_[-1] for sid, frames_ in systems.items()}
    by_id: dict[str, list[Structure]] = defaultdict(list)
    for s in md_frames:
        by_id[s.system_id].append(s)
    assert set(by_id) == set(relaxed)
    for sid, frames_ in by_id.items():
        start = relaxed[sid]
        assert [s.frame for s in frames_] == list(range(MD.frames))
        for s in frames_:
            assert s.split == start.split and s.targets == {} and s.converged is None
            assert s.relaxed_positions is None and s.relaxed_energy is None
            np.testing.assert_array_equal(s.positions[s.fixed], start.positions[s.fixed])  # fixed layers held
            free = ~s.fixed
            rms = np.sqrt(np.mean((s.positions[free] - start.positions[free]) ** 2))
            assert 0.005 < rms < 0.5  # thermal motion at 900 K, not an explosion
        # Hot frames: free-atom forces far above those of the converged relaxed structure.
        median = np.median(np.concatenate([np.linalg.norm(s.forces[~s.fixed], axis=1) for s in frames_]))
        assert median > 0.2
        if start.converged:
            assert median > 4 * TINY.fmax_ev_per_angstrom and min(s.energy for s in frames_) > start.energy


def test_md_frames_are_exact_emt_labels_and_the_same_for_a_seed(md_frames):
    frame = md_frames[3]
    atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    atoms.calc = EMT()
    assert atoms.get_potential_energy() == pytest.approx(frame.energy, abs=1e-9)
    np.testing.assert_allclose(calculate_numerical_forces(atoms, eps=1e-5), frame.forces, atol=1e-5)
    _assert_same(list(generate_emt(TINY.model_copy(update={"md": MD}))), md_frames)
    colder = list(generate_emt(TINY.model_copy(update={"md": MD.model_copy(update={"temperature_kelvin": 300.0})})))
    force = lambda frames_: np.median(np.concatenate([np.linalg.norm(s.forces[~s.fixed], axis=1) for s in frames_]))
    assert force(colder) < 0.8 * force(md_frames)


def test_md_config_rejects_nonsense():
    for bad in ({"frames": 0}, {"temperature_kelvin": 0}, {"interval_steps": 0}, {"timestep_fs": -1}):
        with pytest.raises(ValidationError):
            EMTMDConfig(**bad)
