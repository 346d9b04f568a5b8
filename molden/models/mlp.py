"""Multi-layer perceptrons and activations shared by every backbone and head."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

Activation = Literal["ssp", "silu", "leaky_relu", "tailored_relu"]


class ShiftedSoftplus(nn.Module):
    """ssp(x) = ln(0.5 eˣ + 0.5) = softplus(x) − ln 2 (SchNet; Noisy Nodes §3.2): zero at zero."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) - math.log(2.0)


class TailoredReLU(nn.Module):
    """sqrt(2/(1+α²)) · LeakyReLU_α(x): a leaky ReLU scaled so that E[φ(x)²] = 1 for
    x ~ N(0, 1) (TAT keeps q values at 1; Pre-training via Denoising App. B.2), with negative
    slope α from `molden.models.gns_tat.tailored_relu_slope`."""

    def __init__(self, slope: float):
        super().__init__()
        self.slope = float(slope)
        self.scale = math.sqrt(2.0 / (1.0 + self.slope**2))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * nn.functional.leaky_relu(x, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope:.4f}"


def activation(name: Activation, slope: float = 0.0) -> nn.Module:
    """The activation module named `name` (ssp: shifted softplus, silu: Swish as ForceNet,
    tailored_relu: TAT's with negative slope `slope`)."""
    if name == "tailored_relu":
        return TailoredReLU(slope)
    if name == "ssp":
        return ShiftedSoftplus()
    if name == "silu":
        return nn.SiLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Sequential):
    """`n_layers` linear layers with `act` between them, optionally LayerNorm on the output
    (GNS: 3-layer MLPs with shifted softplus followed by layer normalisation, Noisy Nodes §3.2).
    `slope` is the negative slope of a tailored ReLU (GNS-TAT)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int = 3,
        act: Activation = "ssp",
        layer_norm: bool = False,
        slope: float = 0.0,
    ):
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for k in range(n_layers):
            layers.append(nn.Linear(dims[k], dims[k + 1]))
            if k < n_layers - 1:
                layers.append(activation(act, slope))
        if layer_norm:
            layers.append(nn.LayerNorm(out_dim))
        super().__init__(*layers)
