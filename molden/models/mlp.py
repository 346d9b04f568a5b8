"""Multi-layer perceptrons and activations shared by every backbone and head."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

Activation = Literal["ssp", "silu", "leaky_relu"]


class ShiftedSoftplus(nn.Module):
    """ssp(x) = ln(0.5 eˣ + 0.5) = softplus(x) − ln 2 (SchNet; Noisy Nodes §3.2): zero at zero."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) - math.log(2.0)


def activation(name: Activation) -> nn.Module:
    """The activation module named `name` (ssp: shifted softplus, silu: Swish as ForceNet)."""
    if name == "ssp":
        return ShiftedSoftplus()
    if name == "silu":
        return nn.SiLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Sequential):
    """`n_layers` linear layers with `act` between them, optionally LayerNorm on the output
    (GNS: 3-layer MLPs with shifted softplus followed by layer normalisation, Noisy Nodes §3.2)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int = 3,
        act: Activation = "ssp",
        layer_norm: bool = False,
    ):
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for k in range(n_layers):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < n_layers - 1:
                layers.append(activation(act))
        if layer_norm:
            layers.append(nn.LayerNorm(out_dim))
        super().__init__(*layers)
