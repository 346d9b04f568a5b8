"""GNS (Noisy Nodes §3.2, §5.1): symmetries as documented in molden/models/gns.py, per-block
latents, conservative forces, force encoding, presets."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from molden.data.ase_convert import structure_from_atoms
from molden.data.batch import collate
from molden.errors import MoldenConfigError
from molden.models import EdgeVectorHead, GraphScalarHead, Model, NodeVectorHead, keys
from molden.models.gns import PRESETS, GNSConfig, build_gns, count_parameters, gns_oc20_cpu
from molden.models.lattice_reduction import canonical_lattice_transform
from molden.pipeline.structure_graphs import build_graphs
from symmetry import (TOLERANCE, example_atoms, example_batch, permutation_within_graphs, permuted,
                      random_rotation, rotated, translated)

ATOL = TOLERANCE[torch.float64]
CUTOFF = 5.0


def tiny(**update) -> GNSConfig:
    base = dict(latent_dim=16, mlp_hidden_dim=16, n_bessel=8, cutoff_angstrom=CUTOFF, block_size=2, block_iterations=2)
    return gns_oc20_cpu().model_copy(update={**base, **update})


def model(config: GNSConfig | None = None, *, conservative: bool = False, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    backbone = build_gns(config or tiny())
    f = backbone.scalar_dim
    heads = {keys.ENERGY: GraphScalarHead(f, readout=backbone.graph_readout)}
    if not conservative:
        heads[keys.NOISE] = NodeVectorHead(f)
    return Model(backbone, heads, conservative_forces=conservative).double().eval()


def batch_of(atoms_list, dtype=torch.float64):
    structures = [structure_from_atoms(a, system_id=str(k)) for k, a in enumerate(atoms_list)]
    return collate(build_graphs(structures, CUTOFF)[0], dtype=dtype)


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_translation_invariance_is_exact_in_float64():
    m, batch = model(), example_batch(cutoff=CUTOFF)
    out, moved = m(batch), m(translated(batch, [1.3, -2.7, 0.4]))
    close(moved[keys.ENERGY], out[keys.ENERGY])
    close(moved[keys.NOISE], out[keys.NOISE])


def test_node_outputs_follow_a_permutation_and_graph_outputs_are_invariant():
    m, batch = model(), example_batch(cutoff=CUTOFF)
    perm = permutation_within_graphs(batch, seed=3)
    out, moved = m(batch), m(permuted(batch, perm))
    close(moved[keys.ENERGY], out[keys.ENERGY])
    close(moved[keys.NOISE], out[keys.NOISE][perm])


@pytest.mark.parametrize("reflect", [False, True])
def test_periodic_systems_rotated_with_their_cell_give_invariant_energies_and_equivariant_vectors(reflect):
    m, batch = model(), example_batch(("slab", "bulk"), cutoff=CUTOFF)
    r = random_rotation(5, reflect=reflect)
    out, turned = m(batch), m(rotated(batch, r))
    close(turned[keys.ENERGY], out[keys.ENERGY])
    close(turned[keys.NOISE], out[keys.NOISE] @ r.T)
    cons, bulk = model(conservative=True), example_batch(("bulk",), cutoff=CUTOFF)
    close(cons(rotated(bulk, r))[keys.FORCES], cons(bulk)[keys.FORCES] @ r.T)


def test_molecules_are_not_rotation_invariant_since_directions_are_cartesian():
    m, batch = model(), example_batch(("molecule",), cutoff=CUTOFF)
    r = random_rotation(7)
    change = (m(rotated(batch, r))[keys.ENERGY] - m(batch)[keys.ENERGY]).abs().max()
    assert change > 1e-6


def test_an_atom_wrapped_back_into_the_cell_gives_the_same_outputs():
    m = model()
    atoms = [example_atoms("slab"), example_atoms("bulk", seed=1)]
    moved = [a.copy() for a in atoms]
    moved[0].positions[3] += moved[0].cell[0] - 2 * moved[0].cell[1]  # along the slab's periodic axes
    moved[1].positions[0] += moved[1].cell[2] - moved[1].cell[0]
    out, wrapped = m(batch_of(atoms)), m(batch_of(moved))
    close(wrapped[keys.ENERGY], out[keys.ENERGY])
    close(wrapped[keys.NOISE], out[keys.NOISE])


def _equivalent_cell(atoms):
    """The same crystal described by the unimodular combination M A of its cell vectors."""
    other = atoms.copy()
    other.set_cell(np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]]) @ atoms.cell.array, scale_atoms=False)
    other.wrap()
    return other


def test_an_equivalent_unit_cell_gives_the_same_outputs_in_the_cartesian_frame():
    m = model(tiny(periodic_basis=False))
    atoms = example_atoms("bulk")
    out, other = m(batch_of([atoms])), m(batch_of([_equivalent_cell(atoms)]))
    close(other[keys.ENERGY], out[keys.ENERGY])
    close(other[keys.NOISE], out[keys.NOISE])


def _unimodular(rng, n, det):
    while True:
        m = rng.integers(-2, 3, size=(n, n))
        if round(np.linalg.det(m)) == det:
            return m


def _in_cell(atoms, cell=None, positions=None):
    """`atoms` described by `cell` (the same lattice, rows Å) and/or moved to `positions`,
    wrapped back into the cell."""
    other = atoms.copy()
    if cell is not None:
        other.set_cell(cell, scale_atoms=False)
    if positions is not None:
        other.positions = positions
    other.wrap()
    return other


def _outputs(atoms_list):
    """Energies [B], noise vectors and conservative forces [B, n, 3] of same-size systems."""
    batch = batch_of([a.copy() for a in atoms_list])  # copies carry no calculator, no energies
    direct, conservative = model()(batch), model(conservative=True)(batch)
    n = len(atoms_list[0])
    return (direct[keys.ENERGY], direct[keys.NOISE].reshape(-1, n, 3).detach(),
            conservative[keys.FORCES].reshape(-1, n, 3))


def test_equivalent_bulk_cells_give_the_same_outputs_with_the_periodic_basis():
    """det M = +1: the same energy, noise vectors and forces, Cartesian frame, atoms wrapped into
    the new cell. det M = −1 flips the cell's handedness: the outputs of the crystal inverted
    through a point (x → −x), vectors negated (lattice_reduction's docstring says why)."""
    rng = np.random.default_rng(0)
    atoms = example_atoms("bulk")  # skewed cell: a generic (triclinic) lattice
    atoms.positions += rng.normal(scale=0.3, size=atoms.positions.shape)  # far from centrosymmetric
    proper = [_unimodular(rng, 3, +1) for _ in range(3)]
    improper = [_unimodular(rng, 3, -1) for _ in range(2)]
    inverted = _in_cell(atoms, positions=-atoms.positions)
    systems = [atoms, inverted] + [_in_cell(atoms, m @ atoms.cell.array) for m in proper + improper]
    energy, noise, forces = _outputs(systems)
    for k in range(2, 2 + len(proper)):
        close(energy[k], energy[0])
        close(noise[k], noise[0])
        close(forces[k], forces[0])
    for k in range(2 + len(proper), len(systems)):
        close(energy[k], energy[1])
        close(noise[k], -noise[1])
        close(forces[k], -forces[1])
    assert (energy[1] - energy[0]).abs() > 1e-6 and (noise[1] + noise[0]).abs().max() > 1e-6  # not a symmetry


def test_equivalent_slab_cells_give_the_outputs_of_the_slab_or_of_its_half_turn():
    """M on the two periodic rows: every 2D lattice is symmetric under the half-turn about its
    normal, which no basis chosen from the cell can tell apart (lattice_reduction)."""
    rng = np.random.default_rng(1)
    atoms = example_atoms("slab")
    cell = atoms.cell.array.copy()
    cell[:2] = cell[:2] * [[1.06], [0.97]] + [[0.0, 0.31, 0.0], [0.42, 0.0, 0.0]]  # oblique lattice
    atoms.set_cell(cell, scale_atoms=True)
    half_turned = cell * [[-1], [-1], [1]]
    matrices = [_unimodular(rng, 2, det) for det in (1, -1, 1, -1, 1, -1)]
    others = []
    for m in matrices:
        other = cell.copy()
        other[:2] = m @ cell[:2]
        others.append(_in_cell(atoms, other))
    energy, noise, forces = _outputs([atoms, _in_cell(atoms, half_turned)] + others)
    assert (energy[1] - energy[0]).abs() > 1e-6
    seen = set()
    for k in range(2, len(energy)):
        ref = 0 if torch.allclose(energy[k], energy[0], atol=ATOL, rtol=0) else 1
        seen.add(ref)
        close(energy[k], energy[ref])
        close(noise[k], noise[ref])
        close(forces[k], forces[ref])
    assert seen == {0, 1}


@pytest.mark.parametrize("cubic", [True, False])
def test_a_perfect_fcc_crystal_has_the_same_energy_in_every_equivalent_cell(cubic):
    """Cubic lattices tie between several reduced bases; the basis picked may differ between
    equivalent cells by a symmetry of the lattice, which is one of this perfect crystal."""
    rng = np.random.default_rng(2)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=cubic)
    systems = [atoms] + [_in_cell(atoms, _unimodular(rng, 3, det) @ atoms.cell.array) for det in (1, -1, 1, -1)]
    energy = model()(batch_of(systems))[keys.ENERGY]
    close(energy, energy[0].expand(len(systems)))


def test_all_blocks_gives_the_latents_after_each_of_the_n_block_iterations():
    backbone = build_gns(tiny(block_iterations=3)).double()
    batch = example_batch(cutoff=CUTOFF)
    every, last = backbone(batch, all_blocks=True), backbone(batch)
    assert every.n_blocks == 3 and last.n_blocks == 1
    close(every.scalars[-1], last.scalars[0])
    encoded = backbone.encode(batch).nodes
    for nodes, graph in zip(every.scalars, every.graph_scalars):
        close(graph, encoded + nodes)
    assert not torch.allclose(every.scalars[0], every.scalars[1])


def test_the_vector_frame_is_the_canonical_basis_for_periodic_graphs_and_identity_for_molecules():
    batch = example_batch(cutoff=CUTOFF)
    frame = build_gns(tiny()).double()(batch).vector_frame
    transform = canonical_lattice_transform(batch.cell, batch.pbc)
    for g in range(batch.num_graphs):
        expected = transform[g] @ batch.cell[g] if bool(batch.pbc[g].any()) else torch.eye(3, dtype=torch.float64)
        if bool(batch.pbc[g].any()) and not bool(batch.pbc[g].all()):  # slab: vacuum row -> unit normal
            normal = torch.linalg.cross(expected[0], expected[1])
            expected[2] = normal / normal.norm() * torch.sign(normal @ batch.cell[g][2])
        close(frame[batch.batch == g], expected.T.expand(int(batch.n_node[g]), 3, 3))
    assert build_gns(tiny(periodic_basis=False)).double()(batch).vector_frame is None


def test_conservative_forces_equal_finite_differences_of_the_energy():
    """Along random displacement directions u: −F·u = dE/dh of E(x + h u), central differences."""
    m, batch = model(conservative=True), example_batch(("molecule", "slab"), cutoff=CUTOFF)
    forces = m(batch)[keys.FORCES].detach()
    g = torch.Generator().manual_seed(2)
    h = 1e-5
    for _ in range(3):
        u = torch.randn(batch.positions.shape, generator=g, dtype=torch.float64)
        e_plus = m(replace(batch, positions=batch.positions + h * u))[keys.ENERGY].detach().sum()
        e_minus = m(replace(batch, positions=batch.positions - h * u))[keys.ENERGY].detach().sum()
        assert abs(float((e_plus - e_minus) / (2 * h)) + float((forces * u).sum())) < 1e-8


def test_force_inputs_need_force_encoding_and_change_the_outputs():
    batch = example_batch(cutoff=CUTOFF)
    with_forces = replace(batch, force_inputs=batch.forces)
    with pytest.raises(MoldenConfigError):
        model()(with_forces)
    m = model(tiny(force_encoding=True))
    zeros = replace(batch, force_inputs=torch.zeros_like(batch.forces))
    close(m(zeros)[keys.ENERGY], m(batch)[keys.ENERGY])  # no force inputs = zero forces
    assert (m(with_forces)[keys.ENERGY] - m(batch)[keys.ENERGY]).abs().max() > 1e-6


def test_encoded_forces_rotate_with_periodic_systems():
    m = model(tiny(force_encoding=True))
    batch = example_batch(("slab", "bulk"), cutoff=CUTOFF)
    batch = replace(batch, force_inputs=batch.forces)
    r = random_rotation(11)
    out, turned = m(batch), m(rotated(batch, r))
    close(turned[keys.ENERGY], out[keys.ENERGY])
    close(turned[keys.NOISE], out[keys.NOISE] @ r.T)


def test_presets_build_and_count_their_parameters_without_allocating():
    for name, preset in PRESETS.items():
        config = preset()
        assert count_parameters(config) > 0, name
    small = PRESETS["gns_qm9_cpu"]()
    assert count_parameters(small) == sum(p.numel() for p in build_gns(small).parameters())
    assert PRESETS["gns_tat_pcqm_paper"]().tat and not PRESETS["gns_qm9_paper"]().tat
    with pytest.raises(ValueError):
        GNSConfig(latent_dim=0)


def test_a_slab_does_not_depend_on_its_vacuum_thickness_and_a_zero_vacuum_row_is_finite():
    from dataclasses import replace

    m, batch = model(), example_batch(("slab",), cutoff=CUTOFF)
    reference = m(batch)
    for c in (batch.cell[:, 2] * 2.0, torch.zeros_like(batch.cell[:, 2])):
        cell = batch.cell.clone()
        cell[:, 2] = c
        other = m(replace(batch, cell=cell))
        for key in reference:
            assert torch.isfinite(other[key]).all()
            close(other[key], reference[key])


def _triangle(r):
    """C–O at 1.5 Å and a third atom on the same line r Å from C (within R of O)."""
    return Atoms("COCu", positions=[[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [r, 0.0, 0.0]])


@pytest.mark.parametrize("envelope", ["polynomial", "none"])
def test_the_envelope_makes_the_energy_continuous_as_a_pair_crosses_the_cutoff(envelope):
    """The graph is rebuilt at R: the pair C–Cu is an edge at R − h and none at R + h, h = 1e-6 Å.
    The jump is the energy change less its smooth part, −F·Δx with the mean force."""
    m, h = model(tiny(envelope=envelope), conservative=True), 1e-6
    inside, outside = batch_of([_triangle(CUTOFF - h)]), batch_of([_triangle(CUTOFF + h)])
    assert int(inside.n_edge.sum()) == int(outside.n_edge.sum()) + 2
    a, b = m(inside), m(outside)
    mean_force_x = float(a[keys.FORCES][2, 0] + b[keys.FORCES][2, 0]) / 2
    jump = abs(float(a[keys.ENERGY].detach().sum() - b[keys.ENERGY].detach().sum()) - mean_force_x * 2 * h)
    if envelope == "polynomial":
        assert jump < 1e-12
        assert (a[keys.FORCES] - b[keys.FORCES]).abs().max() < 1e-6  # forces continuous too (smooth change ~1e-8)
    else:
        assert jump > 1e-4


@pytest.mark.parametrize("envelope", ["polynomial", "none"])
def test_the_edge_force_readout_is_continuous_as_a_pair_crosses_the_cutoff_with_the_envelope(envelope):
    torch.manual_seed(0)
    m = Model(build_gns(tiny(envelope=envelope)), {keys.FORCES: EdgeVectorHead(16)}).double()
    h = 1e-6
    a = m(batch_of([_triangle(CUTOFF - h)]))[keys.FORCES]
    b = m(batch_of([_triangle(CUTOFF + h)]))[keys.FORCES]
    change = float((a - b).abs().max())
    assert change < 1e-6 if envelope == "polynomial" else change > 1e-3  # smooth part ~ 1e-7 at h = 1e-6 Å


def test_the_paper_presets_have_no_envelope_and_the_cpu_presets_do():
    assert {name: PRESETS[name]().envelope for name in PRESETS} == {
        "gns_qm9_paper": "none", "gns_oc20_paper": "none", "gns_tat_pcqm_paper": "none",
        "gns_qm9_cpu": "polynomial", "gns_oc20_cpu": "polynomial"}
    assert GNSConfig().envelope == "none"  # configs saved before the field existed load unchanged


def test_the_two_mlp_graph_decoder_sums_an_mlp_of_the_processor_and_one_of_the_encoder():
    """Noisy Nodes §3.2: y = Σ MLP_P(a^Proc) + Σ MLP_E(a^Enc) + b (W folded into each MLP, one
    b per structure); permutation- and translation-invariant; the encoder's MLP is its own."""
    torch.manual_seed(0)
    backbone = build_gns(tiny()).double()
    head = GraphScalarHead(backbone.scalar_dim, encoder_mlp=True).double()
    batch = example_batch(cutoff=CUTOFF)
    latents = backbone(batch)
    expected = torch.zeros(batch.num_graphs, dtype=torch.float64).index_add_(
        0, batch.batch, (head.mlp(latents.scalars[-1]) + head.encoder_mlp(latents.encoder_scalars))[:, 0])
    close(head(latents, -1, batch), expected)
    m = Model(backbone, {keys.ENERGY: head}).eval()
    close(m(translated(batch, [0.7, -1.1, 2.0]))[keys.ENERGY], m(batch)[keys.ENERGY])
    perm = permutation_within_graphs(batch, seed=1)
    close(m(permuted(batch, perm))[keys.ENERGY], m(batch)[keys.ENERGY])
    # the encoder's latents enter through their own MLP: changing it changes the output
    with torch.no_grad():
        head.encoder_mlp[-1].bias.add_(1.0)
    assert not torch.allclose(head(latents, -1, batch), expected)
    with torch.no_grad():  # the paper's b is added once per structure, not once per atom
        head.encoder_mlp[-1].bias.sub_(1.0)
        head.graph_bias.add_(1.0)
    close(head(latents, -1, batch), expected + 1.0)
    with pytest.raises(ValueError, match="encoder latents"):
        head(replace(latents, encoder_scalars=None), -1, batch)


def test_decoder_mlps_are_as_wide_as_the_tables_mlps_and_cpu_specs_are_unchanged():
    """Noisy Nodes Table 10 gives 1024-wide MLPs with 512 latents: every head's MLP of a GNS
    spec is `mlp_hidden_dim` wide. Where the two agree (the CPU presets) the spec carries no
    width, so it equals the spec of a run saved before the field existed."""
    from molden.models.spec import HeadSpec, ModelSpec, build_model, graph_head, model_spec, vector_head

    paper = PRESETS["gns_qm9_paper"]()
    spec = model_spec(paper, {keys.TARGETS: graph_head(paper, "two_mlps", readout="mean"), keys.NOISE: vector_head(paper)})
    assert {name: head.hidden_dim for name, head in spec.heads.items()} == {keys.TARGETS: 1024, keys.NOISE: 1024}
    assert spec.heads[keys.TARGETS].encoder_mlp
    with torch.device("meta"):
        built = build_model(spec)
    head = built.heads[keys.TARGETS]
    for mlp in (head.mlp, head.encoder_mlp):
        assert (mlp[0].in_features, mlp[0].out_features, mlp[-1].out_features) == (512, 1024, 1)
    assert built.heads[keys.NOISE].mlp[0].out_features == 1024

    cpu = PRESETS["gns_qm9_cpu"]()
    new = model_spec(cpu, {keys.TARGETS: graph_head(cpu, readout="mean"), keys.NOISE: vector_head(cpu)})
    saved = json.loads(new.model_dump_json())
    for head in saved["heads"].values():
        del head["hidden_dim"], head["encoder_mlp"], head["readout_mlp"]  # as written before the fields existed
    assert ModelSpec.model_validate(saved) == new
    assert new.heads[keys.TARGETS] == HeadSpec(kind="graph_scalar", readout="mean")
    with pytest.raises(ValueError, match="graph_scalar head's option"):
        HeadSpec(kind="edge_vector", encoder_mlp=True)


def test_the_readout_mlp_decoder_applies_an_mlp_after_the_mean_over_atoms():
    """Pre-training via Denoising App. B.1: MLP per atom, mean over atoms (GNS-TAT), then MLP;
    per-element references averaged beside it; permutation-invariant; the spec builds it."""
    from molden.models.spec import build_model, graph_head, model_spec

    torch.manual_seed(0)
    config = tiny(tat=True)
    backbone = build_gns(config).double()
    reference = torch.zeros(119, 1, dtype=torch.float64)
    reference[1], reference[6] = -0.5, -37.75  # exact in the float32 buffer
    head = GraphScalarHead(backbone.scalar_dim, readout="mean", readout_mlp=True, element_reference=reference).double()
    batch = example_batch(cutoff=CUTOFF)
    latents = backbone(batch)
    counts = batch.n_node.double()[:, None]
    pooled = torch.zeros(batch.num_graphs, backbone.scalar_dim, dtype=torch.float64).index_add_(
        0, batch.batch, head.mlp(latents.scalars[-1])) / counts
    offsets = torch.zeros(batch.num_graphs, 1, dtype=torch.float64).index_add_(0, batch.batch, reference[batch.numbers]) / counts
    close(head(latents, -1, batch), (head.readout_mlp(pooled) + offsets)[:, 0])
    m = Model(backbone, {keys.ENERGY: head}).eval()
    close(m(permuted(batch, permutation_within_graphs(batch, seed=2)))[keys.ENERGY], m(batch)[keys.ENERGY])

    spec = model_spec(config, {keys.TARGETS: graph_head(config, "readout_mlp", readout="mean")})
    built = build_model(spec).heads[keys.TARGETS]
    assert spec.heads[keys.TARGETS].readout_mlp and built.readout_mlp is not None and built.encoder_mlp is None
    with pytest.raises(ValueError, match="not both"):
        GraphScalarHead(16, encoder_mlp=True, readout_mlp=True)
