"""Tailored Activation Transformation for GNS (Pre-training via Denoising App. B.2).

What GNS-TAT changes, in the paper's words (App. B.2), and where each lives in molden:

1. "we replace GNS's activation functions with TAT's transformed Leaky-ReLU activation
   functions (or 'Tailored ReLUs'), which we compute with TAT's parameter set to 0.8, and its
   'subnetwork maximizing function' defined on the edge network": `TailoredReLU` and
   `tailored_relu_slope` (here).
2. "we also replace each sum involving shortcut connections with weighted sums, whose weights
   are 0.9 and 1/(1+0.9²) for the shortcut and non-shortcut branches respectively":
   `GNSConfig.tat_shortcut_weight` / `tat_branch_weight` (molden/models/gns.py). As printed
   these two weights do not preserve q values (0.9² + 0.5525² = 1.115, not 1, unlike DKS/TAT's
   normalised sums); we use the printed numbers and let the c-map below normalise them.
3. "We retain the use of layer normalization layers in the edge/vertex update functions, but
   move them to before the first fully-connected layer": `InteractionLayer` in gns.py.
4. "a standard Gaussian fan-in initialization for the weights, and a zero initialization for
   the biases, with Edge-Delta used only for the first linear layer of the edge update
   functions": `fan_in_init`, `edge_delta_init` (here).
5. Edge-Delta (§3.3, App. B.2): "initializes to zero the weights that multiply incoming vertex
   features in the edge update functions (and treats these weights as absent for the purpose
   of computing the initial weight variance)": `edge_delta_init`.
6. "we replace the sum used to aggregate vertex features in the DECODER with an average":
   `GNS.graph_readout` is "mean" (build the `GraphScalarHead` with it).
"""

from __future__ import annotations

import math

import torch
from torch import nn



def tailored_relu_c_map(c: float, slope: float) -> float:
    """The c map of `TailoredReLU`: the output cosine similarity of two unit-q Gaussian inputs
    with cosine similarity c, c + (1−α)²/(π(1+α²)) (sqrt(1−c²) − c·arccos c)."""
    c = min(max(c, -1.0), 1.0)
    return c + (1.0 - slope) ** 2 / (math.pi * (1.0 + slope**2)) * (math.sqrt(1.0 - c * c) - c * math.acos(c))


def edge_network_c0(slope: float, *, plain_activations: int, residual_layers: int, branch_activations: int,
                    shortcut_weight: float, branch_weight: float) -> float:
    """C_f(0) of the edge network (App. B.2, footnote 7: the rest of the network is ignored):
    `plain_activations` activations of the edge encoder, then `residual_layers` weighted
    residual layers whose branch holds `branch_activations` activations. A weighted sum's c
    value is the q-weighted mean of its inputs' c values."""
    c = 0.0
    for _ in range(plain_activations):
        c = tailored_relu_c_map(c, slope)
    s2, b2 = shortcut_weight**2, branch_weight**2
    for _ in range(residual_layers):
        branch = c
        for _ in range(branch_activations):
            branch = tailored_relu_c_map(branch, slope)
        c = (s2 * c + b2 * branch) / (s2 + b2)
    return c


def tailored_relu_slope(eta: float = 0.8, **network) -> float:
    """The negative slope α in [0, 1] with C_f(0) = η for the edge network described by
    `network` (the keyword arguments of `edge_network_c0`): TAT's condition for Leaky ReLUs.

    C_f(0) falls monotonically from its ReLU value (α = 0) to 0 (α = 1, linear). A network too
    shallow to reach η even with a ReLU gets α = 0.
    """
    if edge_network_c0(0.0, **network) <= eta:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection to float precision
        mid = 0.5 * (lo + hi)
        if edge_network_c0(mid, **network) > eta:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@torch.no_grad()
def fan_in_init(module: nn.Module) -> None:
    """Every `nn.Linear` in `module`: weights ~ N(0, 1/fan_in), biases 0 (TAT's init)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))
            if layer.bias is not None:
                layer.bias.zero_()


@torch.no_grad()
def edge_delta_init(first_linear: nn.Linear, edge_features: int) -> None:
    """Edge-Delta: the first linear layer of an edge update sees [edge, vertex, vertex]; the
    weights on the vertex inputs start at zero (they still train) and the edge weights get
    variance 1/`edge_features`, as if the vertex inputs were absent."""
    first_linear.weight.zero_()
    first_linear.weight[:, :edge_features].normal_(0.0, 1.0 / math.sqrt(edge_features))
    if first_linear.bias is not None:
        first_linear.bias.zero_()
