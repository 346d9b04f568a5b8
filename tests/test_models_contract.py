"""The model contract: heads, per-block decoding, conservative forces (keys, shapes, gradients).

Uses a minimal invariant test backbone so the contract is checked independently of GNS,
ForceNet and the equivariant backbone (each has its own tests).
"""

from __future__ import annotations

import pytest
import torch

from molden.models import AtomTypeHead, GraphScalarHead, Model, NodeVectorHead, keys
from tiny_models import PairBackbone, assert_forces_are_energy_gradients
from symmetry import TOLERANCE, example_batch, permutation_within_graphs, permuted, random_rotation, rotated


def _model(conservative: bool) -> Model:
    torch.manual_seed(0)
    backbone = PairBackbone()
    heads = {keys.ENERGY: GraphScalarHead(8), keys.NOISE: NodeVectorHead(8), keys.ATOM_LOGITS: AtomTypeHead(8)}
    return Model(backbone, heads, conservative_forces=conservative).double()


def test_predictions_have_documented_keys_and_shapes():
    batch = example_batch()
    out = _model(True)(batch, all_blocks=True)
    n, b = len(batch.positions), batch.num_graphs
    assert out[keys.ENERGY].shape == (b,)
    assert out[keys.FORCES].shape == (n, 3)
    assert out[keys.NOISE].shape == (n, 3)
    assert out[keys.ATOM_LOGITS].shape == (n, 119)
    assert out[keys.per_block(keys.NOISE)].shape == (2, n, 3)
    torch.testing.assert_close(out[keys.per_block(keys.ENERGY)][-1], out[keys.ENERGY])


def test_conservative_forces_equal_finite_differences_of_the_energy():
    assert_forces_are_energy_gradients(_model(True).eval(), example_batch(("molecule", "slab")), rtol=1e-6)


def test_conservative_forces_rotate_with_an_invariant_energy():
    model = _model(True).eval()
    batch = example_batch()
    r = random_rotation(3)
    out, turned = model(batch), model(rotated(batch, r))
    torch.testing.assert_close(turned[keys.ENERGY], out[keys.ENERGY], atol=TOLERANCE[torch.float64], rtol=0)
    torch.testing.assert_close(turned[keys.FORCES], out[keys.FORCES] @ r.T, atol=TOLERANCE[torch.float64], rtol=0)


def test_graph_readout_is_invariant_and_node_outputs_follow_a_permutation():
    model = _model(False).eval()
    batch = example_batch()
    perm = permutation_within_graphs(batch, seed=2)
    out, moved = model(batch), model(permuted(batch, perm))
    torch.testing.assert_close(moved[keys.ENERGY], out[keys.ENERGY])
    torch.testing.assert_close(moved[keys.NOISE], out[keys.NOISE][perm])


def test_forces_are_a_head_or_conservative_never_both():
    with pytest.raises(ValueError):
        Model(PairBackbone(), {keys.ENERGY: GraphScalarHead(8), keys.FORCES: NodeVectorHead(8)}, conservative_forces=True)
    with pytest.raises(ValueError):
        Model(PairBackbone(), {keys.NOISE: NodeVectorHead(8)}, conservative_forces=True)


def test_edge_vector_head_rotates_with_a_periodic_gns_and_needs_edge_latents():
    from molden.models import EdgeVectorHead
    from molden.models.gns import GNSConfig, build_gns

    torch.manual_seed(0)
    config = GNSConfig(latent_dim=8, mlp_hidden_dim=8, n_bessel=4, block_size=1, block_iterations=2, cutoff_angstrom=5.0)
    model = Model(build_gns(config), {keys.FORCES: EdgeVectorHead(8)}).double().eval()
    batch = example_batch(("slab", "bulk"))
    r = random_rotation(5)
    out, turned = model(batch, all_blocks=True), model(rotated(batch, r), all_blocks=True)
    tol = TOLERANCE[torch.float64]
    torch.testing.assert_close(turned[keys.FORCES], out[keys.FORCES] @ r.T, atol=tol, rtol=0)
    assert out[keys.per_block(keys.FORCES)].shape == (2, len(batch.positions), 3)
    with pytest.raises(ValueError, match="edge latents"):
        Model(PairBackbone(), {keys.FORCES: EdgeVectorHead(8)}).double()(batch)
