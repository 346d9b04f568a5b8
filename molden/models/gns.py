"""GNS (Noisy Nodes §3.2) and GNS-TAT (Pre-training via Denoising App. B.2), one flag apart.

Encoder → Processor → (heads). Shapes: N atoms, E edges, B graphs, F = `latent_dim`.

Encoder (§3.2). Nodes: a learned embedding of the atomic number (0 = masked type), plus an
OC20 tag embedding when the batch has tags, concatenated with the fixed-atom flag and, with
`force_encoding`, the encoded force and its norm (below); an MLP with LayerNorm maps this to F.
Edges (i, j) carry d = pos[j] + shift − pos[i] (Å): the radial Bessel basis of |d|
(`radial_basis.bessel_basis`) and the direction d/|d|; an MLP with LayerNorm maps them to F.

Periodic systems (Noisy Nodes §5.1, with `periodic_basis`): the direction is taken in the
lattice's basis, f/|f| with f = d A⁻¹, the six cell features are appended to every edge (zeros
for molecules), and `Latents.vector_frame` = Aᵀ maps a vector head's output back to
Cartesian, A(GNN(A⁻¹ν)) as in the paper (see `gns_periodic`). Two choices differ: A is the
canonical reduced basis of the lattice (`lattice_reduction`), not the cell as given, so that
equivalent unit cells give the same outputs (within the limits below); and the Bessel basis
is of the Cartesian |d|, not of |f|, so that the cutoff R keeps its meaning in Å and the
radial features do not depend on the cell at all. Consequences, each tested:
- translation invariance of everything (only differences of positions enter);
- periodic graphs, whole system rotated or reflected with its cell: scalar outputs invariant,
  vector outputs (through `vector_frame`) and conservative forces equivariant;
- molecules: d/|d| is Cartesian, so GNS is NOT rotation invariant for them (as in the paper,
  which has "no equivariance or invariance symmetries"; train with rotation augmentation);
- an atom wrapped back into the cell gives the same outputs (the graph's vectors are equal);
- an equivalent unit cell (M A, M integer with det ±1) gives the same outputs without
  `periodic_basis`, and with it: the same outputs for bulk cells with det M = +1 (generic,
  i.e. triclinic, lattices); for det M = −1 the outputs of the crystal inverted through a
  point, vectors negated (the same energies for centrosymmetric crystals); for slabs, M on
  the two periodic rows, the outputs of the slab or of the slab half-turned about its normal;
  for lattices with more symmetry (cubic, hexagonal, ...) the outputs of the crystal turned by a
  symmetry of its lattice, which equal the original energies when the atoms share that
  symmetry (a perfect fcc crystal). `lattice_reduction` explains why no basis chosen from the
  cell alone can do better while turning with rotations and reflections.

Smooth cutoff (`envelope="polynomial"`): each edge's message to its receiver, in every
interaction layer, is multiplied by DimeNet's polynomial envelope u(|d|/R) (p = 6,
`radial_basis.polynomial_envelope`), which vanishes with its first two derivatives at R. An
edge entering or leaving the graph (rebuilt after noise, or moving atoms) then changes no
node latent, and the energy and conservative forces are continuous as |d| crosses R, provided
the graph's cutoff is at least R (edges beyond R get weight 0). The edge latents themselves
are returned with the envelope as `Latents.edge_weights`, which `EdgeVectorHead` multiplies by.
Noisy Nodes' GNS has no envelope, so the paper presets keep "none"; the CPU presets use it.

DeNS force encoding on this non-equivariant backbone (`force_encoding`): the input force
F (`batch.force_inputs`, dimensionless: `molden.objectives.dens.encoded_forces`) enters as the 3 numbers of F in the graph's frame (Cartesian
for molecules, F A⁻¹ for periodic graphs) and its Cartesian norm |F|, concatenated to the node
features: the non-equivariant analogue of DeNS §3.2.2, which projects F to spherical harmonics
times |F| on an equivariant network. A batch without force inputs encodes zeros.

Processor (§3.2): a block of M unshared interaction-network layers (`block_size`) applied N
times (`block_iterations`), N × M message-passing steps. Each layer: edge update from
[e_ij, v_i, v_j], node update from [v_i, Σ_j e'_ij] (sum over the edges received by i), 3-layer
MLPs with shifted softplus followed by LayerNorm, residuals on nodes and edges.
`forward(batch, all_blocks=True)` returns the node latents after every block iteration.

Decoder: `Latents.graph_scalars[k]` = encoder node latents + processor node latents after
iteration k, for a `GraphScalarHead` to decode with one MLP (molden's default, `graph_decoder:
one_mlp`): the encoder's latents reach the readout directly, past the processor. §3.2's graph
decoder is W_P Σ MLP_P(a^Proc) + W_E Σ MLP_E(a^Enc), two MLPs: `graph_decoder: two_mlps`
(`--graph-decoder two_mlps`) reads the processor's latents and `Latents.encoder_scalars`
apart. Pre-training via Denoising App. B.1 decodes the processor's latents by an MLP, the sum
(GNS-TAT: mean) over atoms and another MLP: `graph_decoder: readout_mlp`. Decoder MLPs are
`mlp_hidden_dim` wide, as every MLP of the tables. Per-atom vectors (forces, Noisy Nodes'
noise and position targets) are decoded by `EdgeVectorHead`
(`molden.models.spec.vector_head`): an MLP of each edge's latents weighs the unit vector to
the neighbour. §3.2's node decoder is an MLP of the node latents; the edge readout replaces it
by default because a non-equivariant GNS fits small Cartesian vectors from node latents poorly
(tests/test_learning.py), so the denoising loss reaches the node latents through the edges.
The paper's decoder is a choice away (`vector_decoder: nodes`, `--vector-decoder nodes`).

GNS-TAT (`tat=True`): the App. B.2 changes listed in `gns_tat`: Tailored ReLUs, weighted
shortcuts, LayerNorm before the first layer of each update, Gaussian fan-in init with zero
biases and Edge-Delta, and a mean decoder readout (`graph_readout`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from molden.data.batch import Batch
from molden.errors import MoldenConfigError
from molden.graph import edge_vectors
from molden.models.backbone import Backbone, Latents
from molden.models.gns_periodic import cell_features, periodic_frames, to_frame
from molden.models.gns_tat import edge_delta_init, fan_in_init, tailored_relu_slope
from molden.models.heads import N_ATOM_TYPES
from molden.models.mlp import MLP
from molden.models.radial_basis import bessel_basis, polynomial_envelope

N_TAGS = 3  # OC20: 0 sub-surface, 1 surface, 2 adsorbate


class GNSConfig(BaseModel):
    """GNS / GNS-TAT hyper-parameters (Noisy Nodes Tables 9-10, Pre-training via Denoising
    Tables 3-4)."""

    model_config = ConfigDict(extra="forbid")

    latent_dim: int = Field(512, gt=0, description="node and edge latent size F (features)")
    mlp_hidden_dim: int = Field(1024, gt=0, description="hidden width of every MLP (features)")
    mlp_layers: int = Field(3, ge=2, description="linear layers per MLP")
    n_bessel: int = Field(512, gt=0, description="radial Bessel functions of |d|")
    cutoff_angstrom: float = Field(5.0, gt=0, description="R of the Bessel basis, Å: the graph's cutoff")
    block_size: int = Field(10, gt=0, description="M: unshared message-passing layers in a block")
    block_iterations: int = Field(1, gt=0, description="N: times the block is applied (N×M steps)")
    periodic_basis: bool = Field(
        True, description="Noisy Nodes §5.1: directions in the cell's basis and 6 cell features per edge"
    )
    cell_feature_scale_angstrom: float = Field(10.0, gt=0, description="unit of the cell features, Å")
    envelope: Literal["none", "polynomial"] = Field(
        "none", description="smooth cutoff: 'polynomial' weighs each message by DimeNet's envelope of |d|/R (p = 6) "
        "so the energy is continuous as an edge crosses R; 'none' as in the paper")
    force_encoding: bool = Field(False, description="DeNS §3.2.2: encode batch.force_inputs (DeNS's bounded, dimensionless force inputs) in the nodes")
    tat: bool = Field(False, description="GNS-TAT (Pre-training via Denoising App. B.2)")
    tat_eta: float = Field(0.8, gt=0, lt=1, description="TAT's C_f(0) target for the edge network")
    tat_shortcut_weight: float = Field(0.9, gt=0, description="TAT weight of the shortcut branch")
    tat_branch_weight: float = Field(1 / (1 + 0.9**2), gt=0, description="TAT weight of the residual branch")


def gns_qm9_paper() -> GNSConfig:
    """Noisy Nodes Table 10 (QM9): latents 512, MLP hidden 1024, 3 layers, 512 Bessel
    functions, 10 message-passing layers × 2 block iterations (the text's best QM9 model is
    3 × 10, §5). The connectivity radius is not in the table: 5 Å (our choice)."""
    return GNSConfig(latent_dim=512, mlp_hidden_dim=1024, n_bessel=512, cutoff_angstrom=5.0,
                     block_size=10, block_iterations=2, periodic_basis=False)


def gns_oc20_paper() -> GNSConfig:
    """Noisy Nodes Table 9 (OC20): latents 512, MLP hidden 512, 512 Bessel functions, 50
    message-passing layers × 1 block iteration (the best IS2RE model of §5 is 10 × 10),
    periodic basis and cell features (§5.1). Radius not in the table: 6 Å (our choice)."""
    return GNSConfig(latent_dim=512, mlp_hidden_dim=512, n_bessel=512, cutoff_angstrom=6.0,
                     block_size=50, block_iterations=1, periodic_basis=True)


def gns_tat_pcqm_paper() -> GNSConfig:
    """Pre-training via Denoising Table 3 (GNS-TAT on PCQM4Mv2): latents 512, MLP hidden 1024,
    3 layers, Tailored ReLU, 10 message-passing layers × 3 block iterations, mean decoder.
    Bessel count and radius are not in the table: 512 (Noisy Nodes Table 10) and 5 Å."""
    return GNSConfig(latent_dim=512, mlp_hidden_dim=1024, n_bessel=512, cutoff_angstrom=5.0,
                     block_size=10, block_iterations=3, periodic_basis=False, tat=True)


def gns_qm9_cpu() -> GNSConfig:
    """`gns_qm9_paper` scaled to train in minutes on 2 cores: 64 latents, 16 Bessel, 2 × 2, and
    the polynomial envelope (not in the paper: energies continuous under rebuilt graphs)."""
    return gns_qm9_paper().model_copy(update=dict(latent_dim=64, mlp_hidden_dim=64, n_bessel=16,
                                                  block_size=2, block_iterations=2, envelope="polynomial"))


def gns_oc20_cpu() -> GNSConfig:
    """`gns_oc20_paper` scaled to train in minutes on 2 cores: 64 latents, 16 Bessel, 2 × 2, and
    the polynomial envelope (not in the paper: energies continuous under rebuilt graphs)."""
    return gns_oc20_paper().model_copy(update=dict(latent_dim=64, mlp_hidden_dim=64, n_bessel=16,
                                                   block_size=2, block_iterations=2, envelope="polynomial"))


PRESETS = {f.__name__: f for f in (gns_qm9_paper, gns_oc20_paper, gns_tat_pcqm_paper, gns_qm9_cpu, gns_oc20_cpu)}


def _tat_mlp(in_dim: int, hidden: int, out_dim: int, n_layers: int, slope: float) -> MLP:
    return MLP(in_dim, hidden, out_dim, n_layers, "tailored_relu", slope=slope)


class InteractionLayer(nn.Module):
    """One message-passing step (an interaction network with residuals, §3.2 / App. B).

    GNS: e' = e + LN(MLP_e([e, v_i, v_j])), v' = v + LN(MLP_v([v, Σ_j LN(MLP_e(...))_ij])).
    GNS-TAT: e' = s e + b MLP_e(LN([e, v_i, v_j])), v' = s v + b MLP_v(LN([v, Σ_j ...])), with
    Tailored ReLUs, fan-in init and Edge-Delta on MLP_e's first layer.
    """

    def __init__(self, config: GNSConfig, tat_slope: float | None = None):
        super().__init__()
        f, h, n = config.latent_dim, config.mlp_hidden_dim, config.mlp_layers
        if config.tat:
            self.edge_fn = nn.Sequential(nn.LayerNorm(3 * f), _tat_mlp(3 * f, h, f, n, tat_slope))
            self.node_fn = nn.Sequential(nn.LayerNorm(2 * f), _tat_mlp(2 * f, h, f, n, tat_slope))
            fan_in_init(self)
            edge_delta_init(self.edge_fn[1][0], f)
            self.shortcut, self.branch = config.tat_shortcut_weight, config.tat_branch_weight
        else:
            self.edge_fn = MLP(3 * f, h, f, n, "ssp", layer_norm=True)
            self.node_fn = MLP(2 * f, h, f, n, "ssp", layer_norm=True)
            self.shortcut, self.branch = 1.0, 1.0

    def forward(self, nodes: Tensor, edges: Tensor, receivers: Tensor, senders: Tensor,
                edge_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """New (nodes [N, F], edges [E, F]); `edge_weights` [E] (the envelope) scale each edge's
        message to its receiver, not the edge's own residual update."""
        update = self.edge_fn(torch.cat([edges, nodes[receivers], nodes[senders]], dim=1))
        messages = update if edge_weights is None else update * edge_weights[:, None].to(update.dtype)
        received = torch.zeros_like(nodes).index_add_(0, receivers, messages)
        node_update = self.node_fn(torch.cat([nodes, received], dim=1))
        return self.shortcut * nodes + self.branch * node_update, self.shortcut * edges + self.branch * update


class Encoding(NamedTuple):
    """What the encoder hands to the processor."""

    nodes: Tensor  # [N, F] node latents
    edges: Tensor  # [E, F] edge latents
    frame: Tensor | None  # [N, 3, 3] per-atom vector frame (Aᵀ), None without `periodic_basis`
    edge_weights: Tensor | None  # [E] envelope of |d|/R, None without an envelope


class GNS(Backbone):
    """The GNS / GNS-TAT backbone (module docstring). Build with `build_gns(config)`."""

    equivariant = False
    vector_dim = 0

    def __init__(self, config: GNSConfig):
        super().__init__()
        self.config = config
        f, h, n = config.latent_dim, config.mlp_hidden_dim, config.mlp_layers
        self.scalar_dim = f
        self.atom_embedding = nn.Embedding(N_ATOM_TYPES, f)
        self.tag_embedding = nn.Embedding(N_TAGS, f)
        node_in = f + 1 + (4 if config.force_encoding else 0)
        edge_in = config.n_bessel + 3 + (6 if config.periodic_basis else 0)
        self.tat_slope: float | None = None
        if config.tat:
            # TAT's slope from the edge network: the edge encoder's activations, then N×M
            # weighted residual layers whose edge MLP holds mlp_layers − 1 activations.
            self.tat_slope = tailored_relu_slope(
                config.tat_eta, plain_activations=n - 1, residual_layers=config.block_size * config.block_iterations,
                branch_activations=n - 1, shortcut_weight=config.tat_shortcut_weight,
                branch_weight=config.tat_branch_weight,
            )
            self.node_encoder = nn.Sequential(_tat_mlp(node_in, h, f, n, self.tat_slope), nn.LayerNorm(f))
            self.edge_encoder = nn.Sequential(_tat_mlp(edge_in, h, f, n, self.tat_slope), nn.LayerNorm(f))
            fan_in_init(self.node_encoder)
            fan_in_init(self.edge_encoder)
        else:
            self.node_encoder = MLP(node_in, h, f, n, "ssp", layer_norm=True)
            self.edge_encoder = MLP(edge_in, h, f, n, "ssp", layer_norm=True)
        self.block = nn.ModuleList(InteractionLayer(config, self.tat_slope) for _ in range(config.block_size))

    @property
    def graph_readout(self) -> Literal["sum", "mean"]:
        """How a graph head should aggregate `graph_scalars`: sum (GNS), mean (GNS-TAT, App. B.2)."""
        return "mean" if self.config.tat else "sum"

    def encode(self, batch: Batch) -> Encoding:
        """Node and edge latents, the per-atom vector frame and the edge weights (`Encoding`)."""
        config = self.config
        d = edge_vectors(batch)
        dtype = d.dtype
        length = d.norm(dim=1)
        receivers = batch.edge_index[0]
        frame = inverse = frames = None
        if config.periodic_basis:
            frames = periodic_frames(batch, dtype)
            inverse = torch.linalg.inv_ex(frames).inverse  # inv_ex: no host sync on a device
            d = to_frame(d, inverse, batch.batch[receivers])
            frame = frames.transpose(1, 2)[batch.batch]
        edge_parts = [bessel_basis(length, config.n_bessel, config.cutoff_angstrom), d / d.norm(dim=1, keepdim=True)]
        if frames is not None:
            features = cell_features(frames, batch.pbc, config.cell_feature_scale_angstrom)
            edge_parts.append(features[batch.batch[receivers]])
        edges = self.edge_encoder(torch.cat(edge_parts, dim=1))

        atoms = self.atom_embedding(batch.numbers)
        if batch.tags is not None:
            atoms = atoms + self.tag_embedding(batch.tags)
        node_parts = [atoms, batch.fixed.to(dtype)[:, None]]
        if config.force_encoding:
            node_parts.append(self._encoded_forces(batch, dtype, inverse))
        elif batch.force_inputs is not None:
            raise MoldenConfigError("the batch carries force inputs (DeNS) but the GNS was built without force_encoding")
        nodes = self.node_encoder(torch.cat(node_parts, dim=1))
        weights = None if config.envelope == "none" else polynomial_envelope(length, config.cutoff_angstrom)
        return Encoding(nodes, edges, frame, weights)

    @staticmethod
    def _encoded_forces(batch: Batch, dtype: torch.dtype, inverse: Tensor | None) -> Tensor:
        """[N, 4]: the input force in the graph's frame and its Cartesian norm, eV/Å (zeros
        without force inputs)."""
        if batch.force_inputs is None:
            return batch.positions.new_zeros(len(batch.positions), 4, dtype=dtype)
        forces = batch.force_inputs.to(dtype)
        in_frame = forces if inverse is None else to_frame(forces, inverse, batch.batch)
        return torch.cat([in_frame, forces.norm(dim=1, keepdim=True)], dim=1)

    def forward(self, batch: Batch, *, all_blocks: bool = False) -> Latents:
        """Latents after the last block iteration, or after each of the N when `all_blocks`."""
        if not batch.has_graph:
            raise MoldenConfigError("GNS needs a batch with a graph (build it with molden.graph first)")
        nodes, edges, frame, weights = self.encode(batch)
        encoded = nodes
        receivers, senders = batch.edge_index
        outputs: list[Tensor] = []
        edge_outputs: list[Tensor] = []
        for _ in range(self.config.block_iterations):
            for layer in self.block:
                nodes, edges = layer(nodes, edges, receivers, senders, weights)
            outputs.append(nodes)
            edge_outputs.append(edges)
        if not all_blocks:
            outputs, edge_outputs = outputs[-1:], edge_outputs[-1:]
        return Latents(scalars=outputs, graph_scalars=[encoded + o for o in outputs], vector_frame=frame,
                       edges=edge_outputs, edge_weights=weights, encoder_scalars=encoded)


def build_gns(config: GNSConfig) -> GNS:
    """The GNS (or GNS-TAT, `config.tat`) backbone of `config`."""
    return GNS(config)


def count_parameters(config: GNSConfig) -> int:
    """Trainable parameters of the backbone of `config`, counted without allocating them."""
    with torch.device("meta"):
        model = build_gns(config)
    return sum(p.numel() for p in model.parameters())


__all__ = ["GNS", "Encoding", "GNSConfig", "InteractionLayer", "PRESETS", "build_gns", "count_parameters",
           "gns_oc20_cpu", "gns_oc20_paper", "gns_qm9_cpu", "gns_qm9_paper", "gns_tat_pcqm_paper"]
