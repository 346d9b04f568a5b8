"""A model described as data: the backbone's config plus each head's kind and size, so a
checkpoint rebuilds its model without the training code (`molden.models.checkpoint`).

Which head decodes vectors depends on the backbone: PaiNN's l=1 channels (`NodeVectorHead`
with `vector_dim`), GNS's edge latents (`EdgeVectorHead`: the node-scalar head fits forces
poorly on GNS, tests/test_learning.py), ForceNet's node MLP (its paper's force decoder).
`vector_head` picks it, so every task asks for "a vector head" and gets the right one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from molden.errors import MoldenConfigError
from molden.models import forcenet, gns, painn
from molden.models.heads import AtomTypeHead, EdgeVectorHead, GraphScalarHead, Head, NodeVectorHead
from molden.models.mlp import Activation
from molden.models.model import Model
from molden.models.presets import BackboneConfig, build_backbone, preset

HeadKind = Literal["graph_scalar", "node_vector", "edge_vector", "atom_type"]

_FAMILIES: dict[str, type[BaseModel]] = {
    "gns": gns.GNSConfig,
    "forcenet": forcenet.ForceNetConfig,
    "painn": painn.PaiNNConfig,
}


class HeadSpec(BaseModel):
    """One head: its kind and sizes (input sizes come from the backbone)."""

    model_config = ConfigDict(extra="forbid")

    kind: HeadKind
    n_out: int = Field(1, ge=1, description="outputs of a graph_scalar head (targets)")
    readout: Literal["sum", "mean"] = Field("sum", description="graph_scalar: sum (extensive, eV) or mean (intensive)")
    squeeze: bool = Field(True, description="graph_scalar with one output: [B] instead of [B, 1]")
    n_layers: int = Field(3, ge=1, description="linear layers of the head's MLP")
    act: Activation = Field("ssp", description="the head MLP's activation")
    element_reference: list[float] | None = Field(
        None, description="graph_scalar with one output: fixed per-element offsets added per atom (119 values, index = Z; eV for energies)")
    hidden_dim: int | None = Field(None, ge=1,
                                   description="hidden width of the head's MLPs (features); None: the head's input width")
    encoder_mlp: bool = Field(False, description="graph_scalar: a second MLP of the encoder's latents, summed with the "
                              "processor's (Noisy Nodes §3.2's graph decoder; GNS only)")
    readout_mlp: bool = Field(False, description="graph_scalar: an MLP after the sum (mean) over atoms of the per-atom "
                              "MLP (Pre-training via Denoising App. B.1's graph decoder)")

    @model_validator(mode="after")
    def _graph_decoder_options(self) -> HeadSpec:
        for name in ("encoder_mlp", "readout_mlp"):
            if getattr(self, name) and self.kind != "graph_scalar":
                raise ValueError(f"{name} is a graph_scalar head's option, not a {self.kind} head's")
        if self.encoder_mlp and self.readout_mlp:
            raise ValueError("a graph_scalar head has encoder_mlp or readout_mlp, not both")
        return self


class ModelSpec(BaseModel):
    """Backbone family and config, named heads, and how forces are made."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["gns", "forcenet", "painn"]
    backbone: dict = Field(description="the backbone config's fields (GNSConfig, ForceNetConfig or PaiNNConfig)")
    heads: dict[str, HeadSpec]
    conservative_forces: bool = Field(False, description="forces = −∂E/∂positions of the energy head")
    preset: str | None = Field(None, description="the preset the backbone config started from, for the record")

    @model_validator(mode="after")
    def _valid_backbone(self) -> ModelSpec:
        _FAMILIES[self.family].model_validate(self.backbone)
        return self

    def backbone_config(self) -> BackboneConfig:
        return _FAMILIES[self.family].model_validate(self.backbone)


def family_of(config: BackboneConfig) -> str:
    for name, cls in _FAMILIES.items():
        if isinstance(config, cls):
            return name
    raise MoldenConfigError(f"unknown backbone config {type(config).__name__}")


def backbone_from_preset(name: str, **changes) -> BackboneConfig:
    """Preset `name` with some fields changed (unknown fields are an error naming them)."""
    config = preset(name)
    unknown = sorted(set(changes) - set(type(config).model_fields))
    if unknown:
        raise MoldenConfigError(f"preset {name!r} ({type(config).__name__}) has no field(s) {unknown}")
    try:
        return type(config).model_validate({**config.model_dump(), **changes})
    except ValidationError as error:
        # The preset itself is valid, so the change is what is wrong: name it as the user wrote
        # it (the CLI's --change FIELD=VALUE), not as a backbone field with no option of its own.
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        what = f"{field}={changes[field]!r}" if field in changes else ", ".join(f"{k}={v!r}" for k, v in changes.items())
        message = first["msg"].removeprefix("Value error, ")
        raise MoldenConfigError(f"invalid change {what} to preset {name!r}: {message[:1].lower()}{message[1:]}") from None


VectorDecoder = Literal["auto", "edges", "nodes"]
GraphDecoder = Literal["auto", "one_mlp", "two_mlps", "readout_mlp"]


def vector_head(config: BackboneConfig, decoder: VectorDecoder = "auto") -> HeadSpec:
    """The head that decodes [N, 3] vectors (forces, noise, position deltas) for this backbone:
    "edges", GNS's `EdgeVectorHead`; "nodes", an MLP of each atom's latents (`NodeVectorHead`,
    Noisy Nodes §3.2's node decoder); "auto", edges for GNS (`gns.py` says why), else nodes."""
    is_gns = isinstance(config, gns.GNSConfig)
    if decoder == "edges" and not is_gns:
        raise MoldenConfigError(f"vector_decoder 'edges' needs a GNS backbone (edge latents), not {type(config).__name__}")
    if decoder == "edges" or (decoder == "auto" and is_gns):
        return HeadSpec(kind="edge_vector")
    if is_gns:
        return HeadSpec(kind="node_vector")
    return HeadSpec(kind="node_vector", act=config.activation)


def graph_readout(config: BackboneConfig, extensive: bool) -> Literal["sum", "mean"]:
    """GNS-TAT decodes graphs by mean (Pre-training via Denoising App. B.2); otherwise sum for
    extensive targets (energies) and mean for intensive ones (HOMO, gap, dipole moment)."""
    if isinstance(config, gns.GNSConfig) and config.tat:
        return "mean"
    return "sum" if extensive else "mean"


def graph_head(config: BackboneConfig, decoder: GraphDecoder = "auto", *, readout: Literal["sum", "mean"], n_out: int = 1,
               squeeze: bool = True, element_reference: list[float] | None = None) -> HeadSpec:
    """The head that decodes one value per structure (energies, QM9 targets) for this backbone:
    "one_mlp", one MLP of each atom's graph latents (for GNS, encoder + processor latents:
    `gns.py`); "two_mlps", Noisy Nodes §3.2's sum of an MLP of the processor's latents and
    one of the encoder's (GNS only); "readout_mlp", Pre-training via Denoising App. B.1's MLP
    of each atom's latents, the readout, then another MLP; "auto", one_mlp."""
    if decoder == "two_mlps" and not isinstance(config, gns.GNSConfig):
        raise MoldenConfigError(f"graph_decoder 'two_mlps' needs a GNS backbone (encoder latents), not {type(config).__name__}")
    return HeadSpec(kind="graph_scalar", n_out=n_out, squeeze=squeeze, readout=readout, element_reference=element_reference,
                    encoder_mlp=decoder == "two_mlps", readout_mlp=decoder == "readout_mlp")


def decoder_width(config: BackboneConfig) -> int | None:
    """The hidden width of the heads' MLPs when it is not their input width: GNS's
    `mlp_hidden_dim` (the tables' "MLP hidden sizes" hold for every MLP, decoders included);
    None (the input width) for the other backbones and where the two agree, so the specs
    of runs saved before the field existed compare equal."""
    if isinstance(config, gns.GNSConfig) and config.mlp_hidden_dim != config.latent_dim:
        return config.mlp_hidden_dim
    return None


def _build_head(spec: HeadSpec, backbone) -> Head:
    scalar_dim, mlp = backbone.scalar_dim, dict(hidden_dim=spec.hidden_dim, act=spec.act)
    if spec.kind == "graph_scalar":
        return GraphScalarHead(scalar_dim, spec.n_out, n_layers=spec.n_layers, readout=spec.readout, squeeze=spec.squeeze,
                               element_reference=spec.element_reference, encoder_mlp=spec.encoder_mlp,
                               readout_mlp=spec.readout_mlp, **mlp)
    if spec.kind == "node_vector":
        return NodeVectorHead(scalar_dim, backbone.vector_dim, n_layers=spec.n_layers, **mlp)
    if spec.kind == "edge_vector":
        return EdgeVectorHead(scalar_dim, n_layers=spec.n_layers, **mlp)
    return AtomTypeHead(scalar_dim, n_layers=min(spec.n_layers, 2), **mlp)


def build_model(spec: ModelSpec) -> Model:
    """The (untrained) model of `spec`."""
    backbone = build_backbone(spec.backbone_config())
    heads = {name: _build_head(head, backbone) for name, head in spec.heads.items()}
    return Model(backbone, heads, conservative_forces=spec.conservative_forces)


def model_spec(config: BackboneConfig, heads: dict[str, HeadSpec], *, conservative_forces: bool = False,
               preset_name: str | None = None) -> ModelSpec:
    width = decoder_width(config)
    heads = {name: head if head.hidden_dim is not None or width is None else head.model_copy(update={"hidden_dim": width})
             for name, head in heads.items()}
    return ModelSpec(family=family_of(config), backbone=config.model_dump(mode="json"), heads=heads,
                     conservative_forces=conservative_forces, preset=preset_name)
