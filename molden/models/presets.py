"""Every backbone preset by name: the papers' sizes and their scaled-down CPU twins.

`build_backbone(config)` dispatches on the config's type, so a saved config (YAML, checkpoint)
rebuilds its backbone without knowing which family it came from.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from pydantic import BaseModel

from molden.errors import MoldenConfigError
from molden.models import forcenet, gns, painn
from molden.models.backbone import Backbone

BackboneConfig = Union[gns.GNSConfig, forcenet.ForceNetConfig, painn.PaiNNConfig]

def gns_tat_cpu() -> gns.GNSConfig:
    """`gns_tat_pcqm_paper` scaled to pre-train in minutes on 2 cores: 64 latents, 16 Bessel,
    2 layers × 3 block iterations (the paper's iteration count, so every decoded block is
    denoised as in App. B.2), with the polynomial envelope of the other CPU presets."""
    return gns.gns_tat_pcqm_paper().model_copy(update=dict(latent_dim=64, mlp_hidden_dim=64, n_bessel=16, block_size=2,
                                                           envelope="polynomial"))


PRESETS: dict[str, Callable[[], BackboneConfig]] = {
    **gns.PRESETS,
    "gns_tat_cpu": gns_tat_cpu,
    "forcenet_paper": forcenet.forcenet_paper,
    "forcenet_cpu": forcenet.forcenet_cpu,
    **painn.PRESETS,
}

# Where each preset's sizes come from (each preset function's docstring says more).
SOURCES: dict[str, str] = {
    "gns_qm9_paper": "Noisy Nodes Table 10 (QM9)",
    "gns_oc20_paper": "Noisy Nodes Table 9 (OC20)",
    "gns_tat_pcqm_paper": "Pre-training via Denoising Table 3 (PCQM4Mv2)",
    "gns_qm9_cpu": "gns_qm9_paper scaled down for 2 CPU cores",
    "gns_oc20_cpu": "gns_oc20_paper scaled down for 2 CPU cores",
    "gns_tat_cpu": "gns_tat_pcqm_paper scaled down for 2 CPU cores",
    "forcenet_paper": "ForceNet App. C-D (11.3 M with its force head, Table 2)",
    "forcenet_cpu": "forcenet_paper scaled down for 2 CPU cores",
    "painn_paper": "PaiNN (Schütt et al. 2021), the DeNS Table 4 baseline",
    "painn_cpu": "painn_paper scaled down for 2 CPU cores",
}

_BUILDERS: dict[type, Callable[[BackboneConfig], Backbone]] = {
    gns.GNSConfig: gns.build_gns,
    forcenet.ForceNetConfig: forcenet.build_forcenet,
    painn.PaiNNConfig: painn.build_painn,
}


def preset(name: str) -> BackboneConfig:
    """The config of preset `name`, or `MoldenConfigError` listing the presets."""
    if name not in PRESETS:
        raise MoldenConfigError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def build_backbone(config: BackboneConfig) -> Backbone:
    """The backbone of `config` (any family)."""
    return _BUILDERS[type(config)](config)


def count_parameters(config: BackboneConfig) -> int:
    """Trainable parameters of the backbone of `config`, counted on the meta device (nothing
    allocated, so paper-sized presets are counted in milliseconds)."""
    with torch.device("meta"):
        backbone = build_backbone(config)
    return sum(p.numel() for p in backbone.parameters() if p.requires_grad)


class PresetSummary(BaseModel):
    """One row of `molden models`."""

    name: str
    family: str
    parameters: int
    equivariant: bool
    description: str


def describe_presets() -> list[PresetSummary]:
    """Name, family, parameter count and source of every preset."""
    rows = []
    for name, make in PRESETS.items():
        config = make()
        with torch.device("meta"):
            backbone = build_backbone(config)
        rows.append(PresetSummary(
            name=name,
            family=type(backbone).__name__,
            parameters=sum(p.numel() for p in backbone.parameters() if p.requires_grad),
            equivariant=bool(backbone.equivariant),
            description=SOURCES.get(name, ""),
        ))
    return rows
