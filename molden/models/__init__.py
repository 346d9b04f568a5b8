"""Models: a backbone (`Batch` → per-block node latents) plus named heads (latents →
predictions), as fairchem's backbone/head split without its registry.

`Model.forward(batch) -> dict[str, Tensor]` with the keys of `molden.models.keys`.
"""

from molden.models.backbone import Backbone, Latents
from molden.models.heads import AtomTypeHead, EdgeVectorHead, GraphScalarHead, Head, NodeVectorHead
from molden.models.model import Model
from molden.models.presets import PRESETS, build_backbone, count_parameters, preset

__all__ = [
    "PRESETS", "AtomTypeHead", "EdgeVectorHead", "Backbone", "GraphScalarHead", "Head", "Latents", "Model", "NodeVectorHead",
    "build_backbone", "count_parameters", "preset",
]
