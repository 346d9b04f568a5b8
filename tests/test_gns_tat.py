"""GNS-TAT (Pre-training via Denoising App. B.2): what the `tat` flag changes, and TAT's
activation and slope."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from molden.models.gns import InteractionLayer, build_gns, gns_oc20_cpu
from molden.models.gns_tat import edge_network_c0, tailored_relu_c_map, tailored_relu_slope
from molden.models.mlp import TailoredReLU
from molden.models.mlp import ShiftedSoftplus
from symmetry import example_batch


def tiny(tat: bool, **update):
    base = dict(latent_dim=16, mlp_hidden_dim=24, n_bessel=8, block_size=2, block_iterations=2, tat=tat)
    return gns_oc20_cpu().model_copy(update={**base, **update})


def _kinds(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules()}


def test_the_tat_flag_swaps_shifted_softplus_for_tailored_relus_and_the_readout_for_a_mean():
    gns, tat = build_gns(tiny(False)), build_gns(tiny(True))
    assert ShiftedSoftplus in _kinds(gns) and TailoredReLU not in _kinds(gns)
    assert TailoredReLU in _kinds(tat) and ShiftedSoftplus not in _kinds(tat)
    assert (gns.graph_readout, tat.graph_readout) == ("sum", "mean")


def test_tat_moves_layer_norm_before_the_first_linear_layer_of_each_update():
    gns, tat = InteractionLayer(tiny(False)), InteractionLayer(tiny(True), 0.3)
    for fn in (tat.edge_fn, tat.node_fn):
        assert isinstance(fn[0], nn.LayerNorm) and isinstance(fn[1][0], nn.Linear)
    for fn in (gns.edge_fn, gns.node_fn):
        assert isinstance(fn[0], nn.Linear) and isinstance(fn[-1], nn.LayerNorm)


def test_edge_delta_zeroes_the_vertex_weights_of_the_first_edge_layer_which_still_train():
    f = 16
    layer = InteractionLayer(tiny(True, latent_dim=f, mlp_hidden_dim=400), 0.3)
    first = layer.edge_fn[1][0]
    assert torch.all(first.weight[:, f:] == 0) and torch.all(first.bias == 0)
    # fan-in Gaussian over the edge inputs only: variance 1/F
    assert abs(float(first.weight[:, :f].var()) * f - 1.0) < 0.15
    later = layer.node_fn[1][0]
    assert abs(float(later.weight.var()) * later.in_features - 1.0) < 0.15 and torch.all(later.bias == 0)
    nodes, edges = torch.randn(5, f), torch.randn(8, f)
    receivers, senders = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), torch.tensor([1, 2, 3, 4, 0, 2, 3, 4])
    new_nodes, new_edges = layer(nodes, edges, receivers, senders)
    (new_nodes.sum() + new_edges.square().sum()).backward()
    assert first.weight.grad[:, f:].abs().sum() > 0


def test_tat_shortcuts_are_weighted_sums_with_the_papers_weights():
    config = tiny(True)
    layer = InteractionLayer(config, 0.3)
    nodes, edges = torch.randn(3, 16), torch.randn(4, 16)
    receivers, senders = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    new_nodes, new_edges = layer(nodes, edges, receivers, senders)
    update = layer.edge_fn(torch.cat([edges, nodes[receivers], nodes[senders]], 1))
    torch.testing.assert_close(new_edges, 0.9 * edges + update / (1 + 0.9**2))
    received = torch.zeros_like(nodes).index_add_(0, receivers, update)
    torch.testing.assert_close(new_nodes, 0.9 * nodes + layer.node_fn(torch.cat([nodes, received], 1)) / (1 + 0.9**2))
    plain = InteractionLayer(tiny(False))
    new_nodes, new_edges = plain(nodes, edges, receivers, senders)
    torch.testing.assert_close(new_edges, edges + plain.edge_fn(torch.cat([edges, nodes[receivers], nodes[senders]], 1)))


def test_tailored_relu_keeps_unit_q_values_and_its_c_map_matches_sampling():
    g = torch.Generator().manual_seed(0)
    slope, c = 0.3, 0.4
    x = torch.randn(400_000, generator=g, dtype=torch.float64)
    y = c * x + math.sqrt(1 - c * c) * torch.randn(400_000, generator=g, dtype=torch.float64)
    act = TailoredReLU(slope)
    assert abs(float(act(x).square().mean()) - 1.0) < 0.01
    assert abs(float((act(x) * act(y)).mean()) - tailored_relu_c_map(c, slope)) < 0.01


def test_the_slope_gives_the_edge_network_c_f_of_zero_equal_to_eta():
    network = dict(plain_activations=2, residual_layers=30, branch_activations=2, shortcut_weight=0.9,
                   branch_weight=1 / 1.81)
    slope = tailored_relu_slope(0.8, **network)
    assert 0 < slope < 1
    assert edge_network_c0(slope, **network) == pytest.approx(0.8, abs=1e-9)
    shallow = dict(network, residual_layers=1)
    assert tailored_relu_slope(0.8, **shallow) == 0.0  # cannot reach η even as a ReLU
    assert build_gns(tiny(True, block_size=10, block_iterations=3)).tat_slope == pytest.approx(slope)


def test_gns_tat_runs_forward_with_mean_readout_and_per_block_latents():
    backbone = build_gns(tiny(True)).double()
    latents = backbone(example_batch(), all_blocks=True)
    assert latents.n_blocks == 2 and torch.isfinite(latents.scalars[-1]).all()
