"""OC20 reader on fixtures in OC20's raw layouts: relaxation `.traj` files and S2EF extxyz + txt."""

from __future__ import annotations

import lzma
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io.trajectory import Trajectory
from ase.optimize import BFGS

from molden.data.readers import READERS, count_oc20, read_oc20
from molden.errors import MoldenConfigError, MoldenInputError


def slab_with_adsorbate(metal: str = "Cu", adsorbate: str = "O", shift: float = 0.0) -> Atoms:
    """A 2x2x3 fcc(111) slab + one adsorbate, OC20 tags (0 sub-surface, 1 surface, 2 adsorbate),
    the two sub-surface layers fixed, periodic in all three directions as OC20 stores it."""
    slab = fcc111(metal, size=(2, 2, 3), vacuum=7.0)
    layer = slab.get_tags()  # ASE numbers layers 1 (top) .. 3 (bottom)
    add_adsorbate(slab, adsorbate, 1.6 + shift, "fcc")
    slab.set_tags(np.concatenate([np.where(layer == 1, 1, 0), [2]]))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 0))
    slab.pbc = True
    del slab.info["adsorbate_info"]  # ASE's build bookkeeping, not in OC20's files
    return slab


def relaxation(path: Path, steps: int = 4, **kwargs) -> list[Atoms]:
    """Relax with EMT, writing an OC20-style per-system trajectory; return its frames."""
    atoms = slab_with_adsorbate(**kwargs)
    atoms.calc = EMT()
    BFGS(atoms, trajectory=str(path), logfile=None).run(fmax=0.01, steps=steps)
    return ase.io.read(path, ":")


@pytest.fixture(scope="module")
def trajs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("is2re")
    relaxation(folder / "random10.traj", steps=4)
    relaxation(folder / "random2.traj", steps=2, metal="Pt", adsorbate="C", shift=0.3)
    return folder


def test_traj_keeps_tags_fixed_energy_forces_per_frame(trajs):
    reference = ase.io.read(trajs / "random10.traj", ":")
    frames = list(read_oc20(trajs / "random10.traj"))
    assert [s.frame for s in frames] == list(range(len(reference))) and len(frames) == 5
    for s, atoms in zip(frames, reference):
        assert s.system_id == "random10"
        assert s.tags.tolist() == [0] * 8 + [1] * 4 + [2]
        assert s.fixed.tolist() == [True] * 8 + [False] * 5
        assert s.energy == atoms.get_potential_energy()
        np.testing.assert_array_equal(s.forces, atoms.get_forces(apply_constraint=False))
        np.testing.assert_array_equal(s.positions, atoms.positions)
        assert s.pbc.all()


def test_every_frame_is_paired_with_the_relaxed_last_frame(trajs):
    final = ase.io.read(trajs / "random10.traj", -1)
    for s in read_oc20(trajs / "random10.traj"):
        np.testing.assert_array_equal(s.relaxed_positions, final.positions)
        assert s.relaxed_energy == final.get_potential_energy()
    (initial,) = read_oc20(trajs / "random10.traj", frames="initial")
    (last,) = read_oc20(trajs / "random10.traj", frames="final")
    assert initial.frame == 0 and last.frame == 4 and initial.energy > last.energy
    assert initial.relaxed_energy == last.energy


def test_folder_of_trajs_in_natural_order_with_counts(trajs):
    assert [(s.system_id, s.frame) for s in read_oc20(trajs, frames="initial")] == [("random2", 0), ("random10", 0)]
    assert count_oc20(trajs) == 3 + 5 == len(list(read_oc20(trajs)))
    assert count_oc20(trajs, frames="final") == 2
    assert len(list(read_oc20(trajs, limit=4))) == 4
    assert READERS["oc20"] is read_oc20


def test_traj_without_tags_names_the_key(tmp_path):
    atoms = slab_with_adsorbate()
    del atoms.arrays["tags"]
    atoms.calc = SinglePointCalculator(atoms, energy=1.0, forces=np.zeros((len(atoms), 3)))
    with Trajectory(str(tmp_path / "random7.traj"), "w") as traj:
        traj.write(atoms)
    with pytest.raises(MoldenInputError, match=r"random7\.traj, record random7 frame 0: missing required key 'tags'"):
        list(read_oc20(tmp_path / "random7.traj"))


def test_unknown_frames_option_and_bad_paths(trajs, tmp_path):
    with pytest.raises(MoldenConfigError):
        list(read_oc20(trajs, frames="middle"))
    with pytest.raises(MoldenInputError, match="no such file"):
        list(read_oc20(tmp_path / "missing.traj"))
    (tmp_path / "random1.traj").write_bytes(b"not a trajectory")
    with pytest.raises(MoldenInputError, match="cannot open trajectory"):
        list(read_oc20(tmp_path / "random1.traj"))


# --- S2EF extxyz + txt -------------------------------------------------------------------------

S2EF_PROPERTIES = "Properties=species:S:1:pos:R:3:move_mask:L:1:tags:I:1:forces:R:3"


def write_s2ef(folder: Path, stem: str, frames: list[Atoms], compress: bool = False) -> list[str]:
    """`stem.extxyz[.xz]` + `stem.txt[.xz]` as OC20's S2EF download has them; return txt lines."""
    for atoms in frames:  # S2EF frames carry energy, free_energy and forces from VASP
        e, f = atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)
        atoms.calc = SinglePointCalculator(atoms, energy=e, free_energy=e, forces=f)
    lines = [f"random{1000 + 7 * i},frame{3 * i + 1},{-0.25 * i - 1.5}" for i in range(len(frames))]
    if compress:
        with lzma.open(folder / f"{stem}.extxyz.xz", "wt") as handle:
            ase.io.write(handle, frames, format="extxyz")
        with lzma.open(folder / f"{stem}.txt.xz", "wt") as handle:
            handle.write("\n".join(lines) + "\n")
    else:
        ase.io.write(folder / f"{stem}.extxyz", frames, format="extxyz")
        (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return lines


@pytest.fixture()
def s2ef(trajs, tmp_path) -> tuple[Path, list[Atoms]]:
    frames = ase.io.read(trajs / "random10.traj", ":") + ase.io.read(trajs / "random2.traj", ":")
    write_s2ef(tmp_path, "0", frames)
    return tmp_path, frames


def test_s2ef_fixture_has_oc20_extxyz_layout(s2ef):
    header = (s2ef[0] / "0.extxyz").read_text().splitlines()[1]
    assert S2EF_PROPERTIES in header and "energy=" in header and "free_energy=" in header


@pytest.mark.parametrize("compress", [False, True])
def test_s2ef_ids_reference_energy_tags_fixed_forces(trajs, tmp_path, compress):
    frames = ase.io.read(trajs / "random10.traj", ":")
    lines = write_s2ef(tmp_path, "3", frames, compress=compress)
    got = list(read_oc20(tmp_path / ("3.extxyz.xz" if compress else "3.extxyz")))
    assert len(got) == len(frames) == count_oc20(tmp_path)
    for s, atoms, line in zip(got, frames, lines):
        sid, fid, ref = line.split(",")
        assert (s.system_id, s.frame) == (sid, int(fid[5:]))
        assert s.targets == {"reference_energy": float(ref)}
        assert s.energy == pytest.approx(atoms.get_potential_energy(), rel=1e-12)  # raw total energy
        # extxyz writes 8 decimals of positions and forces
        np.testing.assert_allclose(s.forces, atoms.get_forces(apply_constraint=False), rtol=0, atol=1e-8)
        np.testing.assert_allclose(s.positions, atoms.positions, rtol=0, atol=1e-8)
        assert s.tags.tolist() == [0] * 8 + [1] * 4 + [2]
        assert s.fixed.tolist() == [True] * 8 + [False] * 5  # move_mask False = fixed
        assert s.relaxed_positions is None


def test_s2ef_folder_reads_chunks_in_numeric_order(s2ef):
    folder, frames = s2ef
    write_s2ef(folder, "10", frames[:1])
    write_s2ef(folder, "2", frames[:2])
    assert len(list(read_oc20(folder))) == count_oc20(folder) == len(frames) + 3
    assert [s.frame for s in read_oc20(folder, limit=3)] == [1, 4, 7]  # 0.extxyz first
    with pytest.raises(MoldenConfigError, match="frames='all'"):
        list(read_oc20(folder, frames="initial"))


def test_missing_txt_is_a_clear_error_naming_the_cli_command(s2ef):
    (s2ef[0] / "0.txt").unlink()
    with pytest.raises(MoldenInputError, match=r"no OC20 metadata file 0\.txt or 0\.txt\.xz.*`molden preprocess ase`"):
        list(read_oc20(s2ef[0] / "0.extxyz"))


@pytest.mark.parametrize("compress", [False, True])
def test_non_utf8_metadata_is_one_error_naming_the_line(trajs, tmp_path, compress):
    frames = ase.io.read(trajs / "random10.traj", ":")
    lines = write_s2ef(tmp_path, "5", frames, compress=compress)
    data = ("\n".join(lines) + "\n").encode().replace(b"random1007", b"random1\xff07")
    txt = tmp_path / ("5.txt.xz" if compress else "5.txt")
    txt.write_bytes(lzma.compress(data) if compress else data)
    with pytest.raises(MoldenInputError, match=r"5\.txt(\.xz)?, record line 2: not UTF-8 text: byte 0xff at line 2"):
        list(read_oc20(tmp_path / ("5.extxyz.xz" if compress else "5.extxyz")))
    assert count_oc20(tmp_path) is None


def test_txt_with_fewer_or_more_lines_than_frames(s2ef):
    folder, frames = s2ef
    txt = (folder / "0.txt").read_text().splitlines()
    (folder / "0.txt").write_text("\n".join(txt[:-1]) + "\n")
    with pytest.raises(MoldenInputError, match=rf"0\.txt, record line {len(frames)}: has fewer lines"):
        list(read_oc20(folder / "0.extxyz"))
    (folder / "0.txt").write_text("\n".join(txt + ["random1,frame0,0.0"]) + "\n")
    with pytest.raises(MoldenInputError, match=rf"has more lines than the {len(frames)} frames"):
        list(read_oc20(folder / "0.extxyz"))


def test_garbled_txt_line(s2ef):
    folder, _ = s2ef
    txt = (folder / "0.txt").read_text().splitlines()
    txt[2] = txt[2].replace("frame", "fram")
    (folder / "0.txt").write_text("\n".join(txt) + "\n")
    with pytest.raises(MoldenInputError, match=r"record line 3: expected 'random<sid>,frame<fid>"):
        list(read_oc20(folder / "0.extxyz"))


def test_truncated_extxyz_names_the_frame(s2ef):
    folder, _ = s2ef
    text = (folder / "0.extxyz").read_text().splitlines()
    (folder / "0.extxyz").write_text("\n".join(text[: 15 * 2 + 8]) + "\n")  # 13 atoms + 2 lines per frame
    with pytest.raises(MoldenInputError, match=r"0\.extxyz, record 0\.extxyz frame 2: cannot read frame"):
        list(read_oc20(folder / "0.extxyz"))


def test_garbled_number_in_extxyz(s2ef):
    folder, _ = s2ef
    text = (folder / "0.extxyz").read_text().splitlines()
    text[3] = text[3].replace(".", ".x", 1)
    (folder / "0.extxyz").write_text("\n".join(text) + "\n")
    with pytest.raises(MoldenInputError, match=r"frame 0: cannot read frame: ValueError"):
        list(read_oc20(folder / "0.extxyz"))


@pytest.mark.parametrize("key", ["forces", "energy", "tags"])
def test_missing_key_in_extxyz_is_named(trajs, tmp_path, key):
    atoms = ase.io.read(trajs / "random10.traj", 0)
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    results.pop(key, None)
    if key == "tags":
        del atoms.arrays["tags"]
    atoms.calc = SinglePointCalculator(atoms, **results)
    ase.io.write(tmp_path / "5.extxyz", [atoms], format="extxyz")
    (tmp_path / "5.txt").write_text("random5,frame0,-1.0\n")
    expected = rf"record 5\.extxyz frame 0 \(random5 frame0\): missing required key '{key}'"
    with pytest.raises(MoldenInputError, match=expected):
        list(read_oc20(tmp_path / "5.extxyz"))


@pytest.mark.parametrize("tags, message", [(0, "all atoms are tagged 0"), (3, "tags must be 0, 1 or 2")])
def test_lost_or_foreign_tags_are_caught_at_preprocess_time(trajs, tmp_path, tags, message):
    atoms = ase.io.read(trajs / "random10.traj", 0)
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(apply_constraint=False)}
    atoms.set_tags(np.full(len(atoms), tags))
    atoms.calc = SinglePointCalculator(atoms, **results)
    ase.io.write(tmp_path / "6.extxyz", [atoms], format="extxyz")
    (tmp_path / "6.txt").write_text("random6,frame0,-1.0\n")
    with pytest.raises(MoldenInputError, match=message):
        list(read_oc20(tmp_path / "6.extxyz"))


# ----------------------------------------------------------------- IS2RE reference energies
def _reference_files(folder: Path, references: dict) -> dict[str, Path]:
    """The same system id → eV mapping as OC20's pickle (numpy floats), JSON and CSV."""
    import json
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    files = {"pkl": folder / "oc20_ref.pkl", "json": folder / "refs.json", "csv": folder / "refs.csv"}
    files["pkl"].write_bytes(pickle.dumps({k: np.float64(v) for k, v in references.items()}))
    files["json"].write_text(json.dumps(references))
    files["csv"].write_text("system_id,energy_ev\n" + "".join(f"{k},{v!r}\n" for k, v in references.items()))
    return files


@pytest.mark.parametrize("kind", ["pkl", "json", "csv"])
def test_trajectory_frames_carry_oc20s_adsorption_energy_with_reference_energies(trajs, tmp_path, kind):
    """OC20's IS2RE target: relaxed total energy − the system's reference (oc20_ref.pkl), on
    every frame of the system, beside the reference itself."""
    from molden.data.readers import read_reference_energies

    references = {"random10": -12.5, "random2": 3.25, "random99": 0.0}
    refs = read_reference_energies(_reference_files(tmp_path, references)[kind])
    assert refs == references
    frames = list(read_oc20(trajs, references=refs))
    assert {s.system_id for s in frames} == {"random10", "random2"}
    for s in frames:
        assert s.targets["reference_energy"] == references[s.system_id]
        assert s.targets["adsorption_energy"] == pytest.approx(s.relaxed_energy - references[s.system_id], abs=1e-12)
    assert all(s.targets == {} for s in read_oc20(trajs))  # without references, no targets


def test_a_system_without_a_reference_and_bad_reference_files_are_named(trajs, tmp_path):
    from molden.data.readers import read_reference_energies

    with pytest.raises(MoldenInputError, match=r"random2\.traj, record random2: no reference energy for this system"):
        list(read_oc20(trajs, references={"random10": -1.0}))
    bad = {
        "code.pkl": b"cos\nsystem\n(S'true'\ntR.",  # os.system('true') when unpickled plainly
        "list.json": b"[1, 2]", "empty.json": b"{}", "nan.json": b'{"random10": NaN}', "text.json": b'{"random10": "abc"}',
        "rows.csv": b"random10,1.0\nrandom2\n", "refs.txt": b"random10,1.0\n", "zero.pkl": b"",
    }
    messages = {"code.pkl": "refusing to load os.system", "list.json": "found list", "empty.json": "found an empty one",
                "nan.json": "system random10", "text.json": "'abc' is not a finite number", "rows.csv": "row 2",
                "refs.txt": "must be a .pkl, .json, .csv file", "zero.pkl": "the reference-energy file is empty"}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MoldenInputError, match=messages[name]) as error:
            read_reference_energies(tmp_path / name)
        assert name in str(error.value)
    with pytest.raises(MoldenInputError, match="no such reference-energy file"):
        read_reference_energies(tmp_path / "absent.pkl")


def test_reference_energies_are_refused_for_s2ef_frames_which_carry_their_own(s2ef):
    with pytest.raises(MoldenConfigError, match="S2EF extxyz frames take theirs from their .txt metadata"):
        list(read_oc20(s2ef[0] / "0.extxyz", references={"random1000": 1.0}))


def test_preprocess_with_oc20_references_gives_is2re_the_adsorption_energy(trajs, tmp_path):
    """`molden preprocess oc20 DIR --oc20-references oc20_ref.pkl`: the cache's targets hold the
    adsorption energy that `--is2re-target adsorption_energy` trains on; a bad file is one line,
    before anything is written."""
    import json

    import h5py
    from typer.testing import CliRunner

    from molden.cli.app import app

    refs = _reference_files(tmp_path / "refs", {"random10": -12.5, "random2": 3.25})["pkl"]
    out = tmp_path / "oc20.h5"
    result = CliRunner().invoke(app, ["preprocess", "oc20", str(trajs), "--out", str(out), "--oc20-references", str(refs),
                                      "--val", "1", "--test", "0"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        names = json.loads(f.attrs["target_names"])
        targets, relaxed = f["structures/targets"][:], f["structures/relaxed_energy"][:]
        systems = f["structures/system_id"].asstr()[:]
    assert names == ["reference_energy", "adsorption_energy"]
    expected = relaxed - np.array([{"random10": -12.5, "random2": 3.25}[s] for s in systems])
    np.testing.assert_allclose(targets[:, 1], expected, atol=1e-9)

    (tmp_path / "bad.json").write_text("[]")
    refused = CliRunner().invoke(app, ["preprocess", "oc20", str(trajs), "--out", str(tmp_path / "x.h5"),
                                       "--oc20-references", str(tmp_path / "bad.json")])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1 and "bad.json" in refused.output
    assert not list(tmp_path.glob("x.h5*"))
    other = CliRunner().invoke(app, ["preprocess", "emt", "--out", str(tmp_path / "emt.h5"), "--oc20-references", str(refs)])
    assert other.exit_code == 1 and "--oc20-references is for source oc20, not emt" in other.output, other.output
    assert not list(tmp_path.glob("emt.h5*"))
