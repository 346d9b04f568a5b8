"""PaiNN: an equivariant message-passing backbone with scalar and l=1 vector features.

Schütt, Unke & Gastegger (2021), "Equivariant message passing for the prediction of tensorial
properties and molecular spectra", §3 (eqs. 7–12): each atom carries F invariant scalars s and
F vectors v (l=1, [N, 3, F]); a *message* block mixes neighbours' features through a radial
filter and the edge direction, an *update* block mixes the vector channels of one atom. The
vectors are polar (built from edge directions and, with DeNS, input forces), so under any
orthogonal R (rotation or reflection) v → R v while s, and hence energies, are unchanged;
forces and noise predicted from v flip with positions under a reflection.

It is the compact stand-in for DeNS's Equiformer/eSCN (DeNS §3.2): with `batch.force_inputs`
set, the force f of each atom is encoded as DeNS §3.2.2 eq. 5 with L ≤ 1 — the l=1 part
|f|·f/|f| = f through a learned per-channel SO(3)-linear map added to v, the l=0 part |f|
through a linear map (no bias) added to s — so zero rows ("no force encoded") add nothing and
the encoding is rotation-equivariant.

Block iteration (Noisy Nodes §3.2, as GNS): `block_size` unshared interaction layers (message +
update) form a block, applied `block_iterations` times with shared weights; `Latents` holds one
entry per block iteration (after the block's last layer), so the PaiNN paper's three unshared
layers are `block_size=3, block_iterations=1` (one entry), and per-layer decoding with shared
weights is `block_size=1, block_iterations=K` (K entries).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from molden.data.batch import Batch
from molden.errors import MoldenConfigError
from molden.graph import edge_vectors
from molden.models.backbone import Backbone, Latents
from molden.models.heads import N_ATOM_TYPES
from molden.models.mlp import MLP, Activation
from molden.models.radial_basis import bessel_basis, cosine_cutoff

N_TAGS = 3  # OC20: 0 sub-surface, 1 surface, 2 adsorbate
_NORM_EPS = 1e-8  # keeps ‖V v‖ differentiable where v = 0 (every atom before the first message)


class PaiNNConfig(BaseModel):
    """Hyper-parameters of `PaiNN` (defaults: the PaiNN paper's QM9/MD17 model, §4)."""

    model_config = ConfigDict(extra="forbid")

    features: int = Field(128, ge=1, description="F: scalar channels and l=1 vector channels per atom")
    n_radial: int = Field(20, ge=1, description="Bessel radial basis functions of the edge length")
    cutoff_angstrom: float = Field(
        5.0, gt=0, description="radial cutoff, Å; edges of the batch's graph longer than this are ignored"
    )
    block_size: int = Field(3, ge=1, description="M: unshared interaction layers (message + update) in a block")
    block_iterations: int = Field(1, ge=1, description="N: times the block is applied (block iteration, N×M steps)")
    activation: Activation = Field("silu", description="activation of the scalar MLPs (PaiNN: SiLU)")
    tags_and_fixed: bool = Field(
        True, description="add OC20 tag (when the batch has tags) and fixed-atom embeddings to the scalars"
    )
    force_encoding: bool = Field(True, description="accept DeNS force inputs (§3.2.2, eq. 5, L <= 1)")


def painn_paper() -> PaiNNConfig:
    """The PaiNN paper's model (Schütt et al. 2021, §4 QM9/MD17: F = 128, 3 unshared
    interaction layers, 20 radial basis functions, 5 Å cosine cutoff, SiLU): 584,064 backbone
    parameters. Kept at the published size, the PaiNN that DeNS itself lists as an MD17
    baseline (DeNS Table 4), rather than scaled to Equiformer's 3.5 M (Lmax = 2, Table 4):
    a bigger PaiNN would be neither the paper's model nor affordable on CPU."""
    return PaiNNConfig()


def painn_cpu() -> PaiNNConfig:
    """Scaled-down PaiNN that trains in minutes on 2 cores: F = 32, 12 radial functions, one
    layer applied 3 times (3 decoded block iterations for Noisy Nodes / DeNS)."""
    return PaiNNConfig(features=32, n_radial=12, block_size=1, block_iterations=3)


class PaiNNMessage(nn.Module):
    """PaiNN §3 eqs. 7–8: Δsᵢ = Σⱼ φₛ(sⱼ)∘Wₛ(rᵢⱼ), Δvᵢ = Σⱼ vⱼ∘φᵥᵥ(sⱼ)∘Wᵥᵥ(rᵢⱼ) +
    φᵥᵣ(sⱼ)∘Wᵥᵣ(rᵢⱼ) r̂ᵢⱼ, with W a linear map of the radial basis times the cutoff."""

    def __init__(self, features: int, n_radial: int, act: Activation):
        super().__init__()
        self.features = features
        self.phi = MLP(features, features, 3 * features, n_layers=2, act=act)
        self.filter = nn.Linear(n_radial, 3 * features)

    def forward(self, s: Tensor, v: Tensor, radial: Tensor, envelope: Tensor, unit: Tensor, edge_index: Tensor):
        i, j = edge_index
        # φ per atom then gathered: N MLP rows instead of E.
        x = self.phi(s)[j] * (self.filter(radial) * envelope[:, None])
        ds, dvv, dvr = x.split(self.features, dim=1)
        dv = v[j] * dvv[:, None, :] + unit[:, :, None] * dvr[:, None, :]
        s = s + torch.zeros_like(s).index_add_(0, i, ds)
        v = v + torch.zeros_like(v).index_add_(0, i, dv)
        return s, v


class PaiNNUpdate(nn.Module):
    """PaiNN §3 eqs. 9–11: U, V linear maps over vector channels (no bias, so equivariant);
    Δv = a_vv ∘ Uv, Δs = a_sv ∘ ⟨Uv, Vv⟩ + a_ss with a = MLP(s, ‖Vv‖)."""

    def __init__(self, features: int, act: Activation):
        super().__init__()
        self.features = features
        self.u = nn.Linear(features, features, bias=False)
        self.v = nn.Linear(features, features, bias=False)
        self.mlp = MLP(2 * features, features, 3 * features, n_layers=2, act=act)

    def forward(self, s: Tensor, v: Tensor):
        uv, vv = self.u(v), self.v(v)  # [N, 3, F]: the maps act on channels, not on x, y, z
        norm = torch.sqrt((vv * vv).sum(dim=1) + _NORM_EPS)
        a_vv, a_sv, a_ss = self.mlp(torch.cat([s, norm], dim=1)).split(self.features, dim=1)
        return s + a_sv * (uv * vv).sum(dim=1) + a_ss, v + a_vv[:, None, :] * uv


class PaiNN(Backbone):
    """PaiNN backbone (Schütt et al. 2021 §3) with DeNS force encoding (§3.2.2); see the module
    docstring. Latents: `scalars` [N, F] and `vectors` [N, 3, F] per block iteration, Cartesian
    (`vector_frame` None)."""

    equivariant = True

    def __init__(self, config: PaiNNConfig):
        super().__init__()
        self.config = config
        f = config.features
        self.scalar_dim = f
        self.vector_dim = f
        self.embedding = nn.Embedding(N_ATOM_TYPES, f)  # row 0: the learned mask token
        if config.tags_and_fixed:
            self.tag_embedding = nn.Embedding(N_TAGS, f)
            self.fixed_embedding = nn.Embedding(2, f)
        if config.force_encoding:
            # Eq. 5 with L <= 1: SO3_Linear on one l=0 channel |f| and one l=1 channel f.
            self.force_scalar = nn.Linear(1, f, bias=False)
            self.force_vector = nn.Linear(1, f, bias=False)
        layers = range(config.block_size)
        self.messages = nn.ModuleList(PaiNNMessage(f, config.n_radial, config.activation) for _ in layers)
        self.updates = nn.ModuleList(PaiNNUpdate(f, config.activation) for _ in layers)

    def embed(self, batch: Batch, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Initial scalars [N, F] (atom type, tags, fixed, |f|) and vectors [N, 3, F] (zero, or
        the encoded input forces)."""
        s = self.embedding(batch.numbers)
        if self.config.tags_and_fixed:
            s = s + self.fixed_embedding(batch.fixed.long())
            if batch.tags is not None:
                s = s + self.tag_embedding(batch.tags)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        if batch.force_inputs is not None:
            if not self.config.force_encoding:
                raise MoldenConfigError("this PaiNN was built with force_encoding=False but the batch has force inputs")
            forces = batch.force_inputs.to(dtype)
            s = s + self.force_scalar(forces.norm(dim=1, keepdim=True))
            v = v + self.force_vector(forces[:, :, None])
        return s, v

    def forward(self, batch: Batch, *, all_blocks: bool = False) -> Latents:
        """Latents of the last block iteration, or of every one when `all_blocks`."""
        if not batch.has_graph:
            raise MoldenConfigError("PaiNN needs a batch with a graph (build it with molden.graph first)")
        dtype = self.embedding.weight.dtype
        vectors = edge_vectors(batch).to(dtype)
        distances = vectors.norm(dim=1)
        unit = vectors / distances[:, None]
        cutoff = self.config.cutoff_angstrom
        radial = bessel_basis(distances, self.config.n_radial, cutoff)
        envelope = cosine_cutoff(distances, cutoff)  # also zeroes edges beyond the cutoff

        s, v = self.embed(batch, dtype)
        scalars, vector_list = [], []
        for _ in range(self.config.block_iterations):
            for message, update in zip(self.messages, self.updates):
                s, v = message(s, v, radial, envelope, unit, batch.edge_index)
                s, v = update(s, v)
            scalars.append(s)
            vector_list.append(v)
        if not all_blocks:
            scalars, vector_list = scalars[-1:], vector_list[-1:]
        return Latents(scalars=scalars, vectors=vector_list)


PRESETS = {f.__name__: f for f in (painn_paper, painn_cpu)}


def build_painn(config: PaiNNConfig | None = None) -> PaiNN:
    """A `PaiNN` backbone from `config` (default: `painn_paper()`)."""
    return PaiNN(config or painn_paper())


def count_parameters(config: PaiNNConfig) -> int:
    """Trainable parameters of the backbone of `config`, counted without allocating them."""
    with torch.device("meta"):
        model = build_painn(config)
    return sum(p.numel() for p in model.parameters())


__all__ = ["PRESETS", "PaiNN", "PaiNNConfig", "PaiNNMessage", "PaiNNUpdate", "build_painn", "count_parameters",
           "painn_cpu", "painn_paper"]
