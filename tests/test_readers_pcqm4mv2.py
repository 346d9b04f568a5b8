"""PCQM4Mv2 SDF reader on molblocks written the way RDKit writes `pcqm4m-v2-train.sdf`."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from hypothesis import given, settings
from hypothesis import strategies as st

from molden.data.readers import READERS, count_pcqm4mv2, read_pcqm4mv2
from molden.errors import MoldenInputError

# Heavy atoms only, as in PCQM4Mv2's SDF (hydrogens are implicit there).
MOLECULES = ["C6H6", "CH3CH2OH", "CH3CONH2", "C5H5N", "CF3CN"]


def molblock(symbols: list[str], positions: np.ndarray, data: dict[str, str] | None = None) -> str:
    """One V2000 record in RDKit's layout (`Chem.SDWriter`), bonds from a 1.7 Å distance rule."""
    n = len(symbols)
    bonds = [(i, j) for i in range(n) for j in range(i + 1, n) if np.linalg.norm(positions[i] - positions[j]) < 1.7]
    lines = ["", "     RDKit          3D", "", f"{n:3d}{len(bonds):3d}  0  0  0  0  0  0  0  0999 V2000"]
    for s, (x, y, z) in zip(symbols, positions):
        lines.append(f"{x:10.4f}{y:10.4f}{z:10.4f} {s:<3} 0  0  0  0  0  0  0  0  0  0  0  0")
    lines += [f"{i + 1:3d}{j + 1:3d}  1  0" for i, j in bonds]
    lines.append("M  END")
    for name, value in (data or {}).items():
        lines += [f">  <{name}>  (1) ", value, ""]
    return "\n".join(lines) + "\n$$$$\n"


def heavy_atoms(name: str) -> tuple[list[str], np.ndarray]:
    atoms = molecule(name)
    keep = atoms.numbers > 1
    return list(np.array(atoms.get_chemical_symbols())[keep]), atoms.positions[keep]


@pytest.fixture()
def sdf(tmp_path) -> Path:
    path = tmp_path / "pcqm4m-v2-train.sdf"
    path.write_text("".join(molblock(*heavy_atoms(name)) for name in MOLECULES))
    return path


def write_targets_csv(path: Path, gaps: list[float], extra_rows: int = 2) -> Path:
    """OGB's data.csv.gz: train rows first, then valid/test rows whose gap is empty."""
    rows = [f"{i},C,{g}" for i, g in enumerate(gaps)] + [f"{len(gaps) + k},CC," for k in range(extra_rows)]
    with gzip.open(path, "wt") as handle:
        handle.write("idx,smiles,homolumogap\n" + "\n".join(rows) + "\n")
    return path


def test_elements_and_positions_match_the_source_molecules(sdf):
    got = list(read_pcqm4mv2(sdf))
    assert [s.system_id for s in got] == ["0", "1", "2", "3", "4"] and READERS["pcqm4mv2"] is read_pcqm4mv2
    for s, name in zip(got, MOLECULES):
        symbols, positions = heavy_atoms(name)
        assert s.numbers.tolist() == [{"C": 6, "N": 7, "O": 8, "F": 9}[e] for e in symbols]
        np.testing.assert_allclose(s.positions, positions, rtol=0, atol=5e-5)  # 4 decimals in the file
        assert s.targets == {} and not s.pbc.any() and s.energy is None


def test_gzip_sdf_and_count(sdf):
    gz = sdf.with_suffix(".sdf.gz")
    gz.write_bytes(gzip.compress(sdf.read_bytes()))
    plain, packed = list(read_pcqm4mv2(sdf)), list(read_pcqm4mv2(gz))
    assert all((a.positions == b.positions).all() for a, b in zip(plain, packed)) and len(packed) == 5
    assert count_pcqm4mv2(sdf) == 5 and count_pcqm4mv2(gz) is None
    assert len(list(read_pcqm4mv2(gz, limit=2))) == 2


def test_homolumogap_joined_by_record_index(sdf, tmp_path):
    gaps = [6.81, 3.25, 5.5, 4.75, 7.0]
    csv_path = write_targets_csv(tmp_path / "data.csv.gz", gaps)
    assert [s.targets["homolumogap"] for s in read_pcqm4mv2(sdf, targets_csv=csv_path)] == gaps


def test_targets_csv_out_of_step_or_short(sdf, tmp_path):
    short = write_targets_csv(tmp_path / "short.csv.gz", [1.0, 2.0], extra_rows=0)
    with pytest.raises(MoldenInputError, match="fewer rows than the SDF has records"):
        list(read_pcqm4mv2(sdf, targets_csv=short))
    shifted = tmp_path / "shifted.csv"
    shifted.write_text("idx,smiles,homolumogap\n1,C,1.0\n")
    with pytest.raises(MoldenInputError, match=r"record line 2: idx 1 does not match SDF record 0"):
        list(read_pcqm4mv2(sdf, targets_csv=shifted))


def test_numeric_data_fields_become_targets(tmp_path):
    path = tmp_path / "with_data.sdf"
    path.write_text(molblock(*heavy_atoms("C6H6"), data={"homolumogap": "6.5", "smiles": "c1ccccc1"}))
    (s,) = read_pcqm4mv2(path)
    assert s.targets == {"homolumogap": 6.5}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["C", "N", "O", "F", "S", "Cl", "Br", "P", "Si", "B"]),
            st.tuples(*[st.integers(-999_999, 999_999)] * 3),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_any_v2000_molblock_round_trips(tmp_path_factory, atoms):
    symbols = [s for s, _ in atoms]
    positions = np.array([xyz for _, xyz in atoms], dtype=float) / 1e4  # exact at 4 decimals
    path = tmp_path_factory.mktemp("sdf") / "one.sdf"
    path.write_text(molblock(symbols, positions))
    (s,) = read_pcqm4mv2(path)
    assert s.n_atoms == len(symbols)
    np.testing.assert_allclose(s.positions, positions, rtol=0, atol=1e-12)


# --- bad input ---------------------------------------------------------------------------------


def test_truncated_record_names_the_record(sdf):
    text = sdf.read_text()
    sdf.write_text(text[: text.index("$$$$") + 5] + text[text.index("$$$$") + 5 :][:150])
    with pytest.raises(MoldenInputError, match=r"record 1: truncated record"):
        list(read_pcqm4mv2(sdf))


def test_missing_terminator_at_end_of_file(sdf):
    sdf.write_text(sdf.read_text()[: -len("$$$$\n")])
    with pytest.raises(MoldenInputError, match=r"record 4: truncated record: file ends without '\$\$\$\$'"):
        list(read_pcqm4mv2(sdf))


def test_garbled_coordinate_names_line(sdf):
    lines = sdf.read_text().splitlines()
    lines[5] = "   -1.2x48" + lines[5][10:]  # second atom of record 0
    sdf.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoldenInputError, match=r"record 0: garbled coordinate .* \(line 6\)"):
        list(read_pcqm4mv2(sdf))


def test_unknown_element_names_line(sdf):
    lines = sdf.read_text().splitlines()
    lines[6] = lines[6][:31] + "Xx " + lines[6][34:]
    sdf.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoldenInputError, match=r"record 0: unknown element 'Xx' at atom 2 \(line 7\)"):
        list(read_pcqm4mv2(sdf))


def test_missing_file_and_v3000(tmp_path):
    with pytest.raises(MoldenInputError, match="no such file"):
        list(read_pcqm4mv2(tmp_path / "missing.sdf"))
    path = tmp_path / "v3000.sdf"
    path.write_text("\n     RDKit          3D\n\n  0  0  0  0  0  0  0  0  0  0999 V3000\nM  END\n$$$$\n")
    with pytest.raises(MoldenInputError, match="V3000"):
        list(read_pcqm4mv2(path))


@pytest.mark.parametrize("compress", [False, True])
def test_non_utf8_sdf_is_one_error_naming_record_and_line(sdf, compress):
    lines = sdf.read_bytes().split(b"\n")
    second = lines.index(b"$$$$") + 2  # the title line of record 1, 0-based
    lines[second] = b"caf\xe9"  # Latin-1, not UTF-8
    data = b"\n".join(lines)
    path = sdf.with_name(sdf.name + ".gz") if compress else sdf
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(MoldenInputError, match=rf"record 1: not UTF-8 text: byte 0xe9 at line {second + 1}, column 4"):
        list(read_pcqm4mv2(path))


def test_non_utf8_targets_csv_names_the_line(sdf, tmp_path):
    path = write_targets_csv(tmp_path / "data.csv.gz", [1.0, 2.0, 3.0, 4.0, 5.0])
    data = gzip.decompress(path.read_bytes()).replace(b"2,C,3.0", b"2,C\xff,3.0")
    path.write_bytes(gzip.compress(data))
    with pytest.raises(MoldenInputError, match=r"data\.csv\.gz, record line 4: not UTF-8 text: byte 0xff at line 4"):
        list(read_pcqm4mv2(sdf, targets_csv=path))
