"""ForceNet (Hu et al. 2021, "ForceNet: A Graph Neural Network for Large-Scale Quantum
Calculations"), as a `Backbone`: node latents from conditional-filter message passing over a
spherical-harmonic × sine basis of a 7-d edge feature; forces are decoded directly by a
`NodeVectorHead` (§2: "the decoder uses an MLP to directly predict per-atom forces").

Per layer (§2 eqs. 1–2), for an edge from sender s to receiver t:

    m_st = α(|d_st|) · F_e(h_s, F_b(B(e_st)), h_t) ⊙ F_d(h_s),   m_t = w ⊙ F_d(h_t),
    h_t ← h_t + F_n(m_t + Σ_s m_st),   α(r) = cos(π r / 2c) for r < c, 0 beyond,

with e_st = (n_st, p_st / c), n_st the unit edge direction and p_st = (r, r − a_s, r − a_t,
r − a_s − a_t) with Slater's atomic radii a (`atomic_radii`), and B the spherical basis of
App. A: B = Y_L(n_st) ⊗ (W_rad sin(1.1^j p_st / c) + b_rad), L² × 4 numbers (L = 3, J = 50:
B = 36, App. D). Swish activations throughout (§2 (c)); F_n is a 1-hidden-layer MLP with batch
normalisation (§2); every weight Xavier-uniform, biases zero (App. D).

Not rotation-equivariant by construction (§2, "Rotation data augmentation"): the angular basis
Y_l≥1(n_st) is a function of Cartesian directions, so turning the input changes every latent and
the predicted forces do not turn with it; the paper trains with random rotations instead (the
objective's option). With `n_sph_degrees = 1` only Y_0 (a constant) remains and the latents are
exactly rotation-invariant (the paper's "Only-dist" ablation, App. F.2.2 (1)).

Choices the paper leaves open, as its released code does unless noted:
- The receiver is `edge_index[0]`, the sender `edge_index[1]`; d = pos[s] + shift − pos[t]
  (`molden.graph.edge_vectors`).
- p_st is not clamped to ≥ 10⁻³ as the released code does (close pairs of large atoms have
  r < a_s + a_t: a clamp flattens those features and zeroes their gradient; the sine basis
  is defined for negative inputs).
- Spherical harmonics are computed in torch (`spherical_harmonics`), differentiable, so
  conservative forces flow through the angular basis too (the released code evaluates them in
  numpy, outside autograd), and orthonormal real harmonics rather than Re/Im of the complex ones.
- Node inputs (App. D): "element_properties" encodes period, group, Slater and covalent radii
  and atomic mass of each element, each scaled to [0, 1] over Z = 1–100, with the same sine
  basis and a linear map. The released code uses 9 properties (electronegativity, ionisation
  energy, … from its own table) that ASE does not hold; "embedding" is its learned-embedding
  alternative. Masked atoms (number 0) get −1 for every property and radius 0.
- Batch normalisation in F_n (§2) couples the graphs of a training batch through its
  statistics (in eval mode it does not); `normalization="layer"` keeps graphs independent.
- DeNS force encoding (`force_encoding`): ForceNet has no vector features, so the
  corrupted atoms' input forces f (`Batch.force_inputs`) and their norm |f| are concatenated
  to the node input features before the input projection (implemented as a bias-free linear
  map of (f, |f|) added to the initial embedding, which is the same thing). This is the
  non-equivariant analogue of DeNS §3.2.2 (which embeds |f| Y(f/|f|) in an equivariant
  network): the encoding turns with the input only as well as ForceNet itself does.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from ase.data import atomic_masses, covalent_radii
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from molden.data.batch import Batch
from molden.graph import edge_vectors
from molden.models.atomic_radii import RadiiSource, atomic_radii_angstrom
from molden.models.backbone import Backbone, Latents
from molden.models.heads import GraphScalarHead, NodeVectorHead
from molden.models.mlp import MLP, Activation, activation
from molden.models.spherical_harmonics import n_functions, real_spherical_harmonics

_N_ELEMENTS = 119  # index = atomic number; 0 is the mask token


class ForceNetConfig(BaseModel):
    """ForceNet hyper-parameters (ForceNet §2, App. A, C, D)."""

    model_config = ConfigDict(extra="forbid")

    hidden_dim: int = Field(512, ge=1, description="D: node and hidden feature size (App. C: 512)")
    n_layers: int = Field(5, ge=1, description="message-passing layers (App. C: 5)")
    cutoff_angstrom: float = Field(6.0, gt=0, description="c: radius of the neighbourhood and of α, Å (§2: 6)")
    n_frequencies: int = Field(50, ge=1, description="J: sine frequencies 1.1^j, j = 0 … J−1 (App. D: 50)")
    n_sph_degrees: int = Field(
        3, ge=1, le=4, description="L: spherical-harmonic degrees 0 … L−1, L² functions (App. D: 3 → 9)"
    )
    edge_mlp_hidden_layers: int = Field(
        2, ge=0, description="hidden layers of the filter MLP F_e (the released code: 2)"
    )
    activation: Activation = Field("silu", description="non-linearity (§2 (c): Swish = silu)")
    normalization: Literal["batch", "layer", "none"] = Field(
        "batch", description="normalisation inside F_n (§2: batch normalisation)"
    )
    node_features: Literal["element_properties", "embedding"] = Field(
        "element_properties", description="node input: sine basis of element properties (App. D) or a learned embedding"
    )
    radii: RadiiSource = Field("slater", description="atomic radii of p_st: Slater 1964 (§2) or ASE covalent")
    force_encoding: bool = Field(
        False,
        description="concatenate Batch.force_inputs (eV/Å) and their norm to the node input (DeNS §3.2.2 analogue)",
    )


def forcenet_paper() -> ForceNetConfig:
    """ForceNet of the paper (App. C: 5 layers, 512 channels; App. D: L = 3, J = 50, c = 6 Å
    from §2; Swish; spherical basis)."""
    return ForceNetConfig()


def forcenet_cpu() -> ForceNetConfig:
    """A scaled-down ForceNet that trains in minutes on 2 CPU cores (same architecture;
    64 channels, 3 layers, J = 16, c = 5 Å)."""
    return ForceNetConfig(hidden_dim=64, n_layers=3, n_frequencies=16, cutoff_angstrom=5.0)


def _sine_basis(x: Tensor, frequencies: Tensor) -> Tensor:
    """[..., F·J] sin(1.1^j x) of every column of `x` [..., F] (App. A, "Sine")."""
    return torch.sin(x[..., :, None] * frequencies).flatten(-2)


def _element_properties() -> np.ndarray:
    """[119, 5] period, group, Slater radius, covalent radius and mass per atomic number, each
    min–max scaled over Z = 1–100 (App. D: "normalize each dimension to lie between 0 and 1");
    row 0 (masked atom) is −1."""
    z = np.arange(_N_ELEMENTS)
    period = np.searchsorted(np.array([2, 10, 18, 36, 54, 86, 118]), z, side="left") + 1
    first = np.array([1, 1, 3, 11, 19, 37, 55, 87])[period]  # first atomic number of each period
    position = z - first + 1
    group = np.select(
        [period == 1, period <= 3, period <= 5, position <= 2, position <= 17],
        [np.where(z == 1, 1, 18), np.where(position <= 2, position, position + 10), position, position, 3],
        position - 14,
    )
    table = np.stack(
        [period, group, atomic_radii_angstrom("slater"), covalent_radii[:_N_ELEMENTS], atomic_masses[:_N_ELEMENTS]],
        axis=1,
    ).astype(np.float64)
    low, high = table[1:101].min(0), table[1:101].max(0)
    table = (table - low) / (high - low)
    table[0] = -1.0
    return table


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    return nn.LayerNorm(dim) if kind == "layer" else nn.Identity()


class ConditionalFilterLayer(nn.Module):
    """One ForceNet message-passing layer (§2 eqs. 1–2): a filter conditioned on the edge basis
    and both end atoms' latents, times the sender's transformed latents."""

    def __init__(self, dim: int, basis_dim: int, config: ForceNetConfig):
        super().__init__()
        self.basis = nn.Linear(basis_dim, dim)  # F_b
        self.filter = MLP(3 * dim, dim, dim, config.edge_mlp_hidden_layers + 1, config.activation)  # F_e
        self.transform = nn.Linear(dim, dim)  # F_d
        self.self_weight = nn.Parameter(torch.empty(1, dim))  # w of m_t
        self.update = nn.Sequential(  # F_n
            nn.Linear(dim, dim), _norm(config.normalization, dim), activation(config.activation), nn.Linear(dim, dim)
        )

    def forward(self, h: Tensor, basis: Tensor, envelope: Tensor, receiver: Tensor, sender: Tensor) -> Tensor:
        """New node latents [N, D] from latents `h` [N, D], edge basis [E, B], α [E]."""
        filters = self.filter(torch.cat([self.basis(basis), h[sender], h[receiver]], dim=1)) * envelope[:, None]
        hd = self.transform(h)
        aggregated = torch.zeros_like(hd).index_add_(0, receiver, filters * hd[sender])
        return h + self.update(self.self_weight * hd + aggregated)


class ForceNet(Backbone):
    """ForceNet encoder (§2): `Latents.scalars` holds the node latents after each layer (all
    with `all_blocks`, else the last); Cartesian frame, no vector features, not equivariant."""

    equivariant = False
    vector_dim = 0

    def __init__(self, config: ForceNetConfig):
        super().__init__()
        self.config = config
        self.scalar_dim = config.hidden_dim
        dim, n_freq = config.hidden_dim, config.n_frequencies
        self.register_buffer("frequencies", 1.1 ** torch.arange(n_freq, dtype=torch.float32))
        self.register_buffer("radii", torch.tensor(atomic_radii_angstrom(config.radii), dtype=torch.float32))
        if config.node_features == "element_properties":
            self.register_buffer("element_properties", torch.tensor(_element_properties(), dtype=torch.float32))
            self.embed = nn.Linear(self.element_properties.shape[1] * n_freq, dim)
        else:
            self.embed = nn.Embedding(_N_ELEMENTS, dim)
        self.force_embed = nn.Linear(4, dim, bias=False) if config.force_encoding else None
        self.radial = nn.Linear(4 * n_freq, 4)  # W_rad, b_rad of App. A (S = 4)
        basis_dim = 4 * n_functions(config.n_sph_degrees)
        self.layers = nn.ModuleList(ConditionalFilterLayer(dim, basis_dim, config) for _ in range(config.n_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases (App. D)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_uniform_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.self_weight)

    def _node_inputs(self, batch: Batch) -> Tensor:
        if self.config.node_features == "element_properties":
            h = self.embed(_sine_basis(self.element_properties[batch.numbers], self.frequencies))
        else:
            h = self.embed(batch.numbers)
        if self.force_embed is not None and batch.force_inputs is not None:
            f = batch.force_inputs.to(h.dtype)
            h = h + self.force_embed(torch.cat([f, f.norm(dim=1, keepdim=True)], dim=1))
        return h

    def edge_basis(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The spherical basis B(e_st) [E, 4 L²] (App. A) and the envelope α [E] (§2)."""
        if batch.edge_index is None:
            raise ValueError("ForceNet needs a batch with a graph (edge_index)")
        c = self.config.cutoff_angstrom
        vectors = edge_vectors(batch)
        r = vectors.norm(dim=1)
        receiver, sender = batch.edge_index
        a_t, a_s = self.radii[batch.numbers[receiver]], self.radii[batch.numbers[sender]]
        p = torch.stack([r, r - a_s, r - a_t, r - a_s - a_t], dim=1) / c
        radial = self.radial(_sine_basis(p, self.frequencies))  # [E, 4]
        angular = real_spherical_harmonics(vectors, self.config.n_sph_degrees)  # [E, L²]
        basis = (angular[:, :, None] * radial[:, None, :]).flatten(1)
        envelope = torch.where(r < c, torch.cos(0.5 * math.pi * r / c), torch.zeros_like(r))
        return basis, envelope

    def forward(self, batch: Batch, *, all_blocks: bool = False) -> Latents:
        """Node latents [N, D] after every layer (`all_blocks`) or the last (ForceNet §2)."""
        basis, envelope = self.edge_basis(batch)
        receiver, sender = batch.edge_index
        h = self._node_inputs(batch)
        out = []
        for layer in self.layers:
            h = layer(h, basis, envelope, receiver, sender)
            out.append(h)
        return Latents(scalars=out if all_blocks else out[-1:])


def build_forcenet(config: ForceNetConfig) -> ForceNet:
    """The ForceNet backbone of `config`."""
    return ForceNet(config)


def forcenet_force_head(config: ForceNetConfig) -> NodeVectorHead:
    """The direct force decoder (§2): an MLP of each node's latents to 3 numbers, eV/Å. Three
    Swish layers, as the released code's projection + 2-layer decoder (less its batch norm)."""
    return NodeVectorHead(config.hidden_dim, n_layers=3, act=config.activation)


def forcenet_energy_head(config: ForceNetConfig) -> GraphScalarHead:
    """An energy head (sum over atoms, eV) for S2EF energies or conservative forces."""
    return GraphScalarHead(config.hidden_dim, act=config.activation, readout="sum")
