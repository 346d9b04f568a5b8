"""Heads: latents of one block iteration → one prediction. Swap heads to fine-tune a
pre-trained backbone (fairchem's backbone/head split)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from molden.data.batch import Batch
from molden.graph.edges import edge_vectors
from molden.models.backbone import Latents
from molden.models.mlp import MLP, Activation

N_ATOM_TYPES = 119  # index = atomic number; 0 is the mask token


class Head(nn.Module):
    """Base class: `forward(latents, block, batch)` decodes block iteration `block` (−1: last)."""

    def forward(self, latents: Latents, block: int, batch: Batch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GraphScalarHead(Head):
    """[B, n_out] (or [B] when `n_out == 1` and `squeeze`): an MLP on each node's graph latents,
    summed or averaged over each graph's atoms (sum for extensive energies, mean for intensive
    targets such as HOMO).

    With `encoder_mlp`, Noisy Nodes §3.2's graph decoder: one MLP of the processor's node
    latents plus another of the encoder's (`latents.encoder_scalars`), each summed (or
    averaged), plus a bias per structure (`graph_bias`, b_P + b_E). The paper's linear maps
    W_P, W_E after the sums are folded into each MLP's last layer: a linear map commutes with
    the sum.

    With `readout_mlp`, Pre-training via Denoising App. B.1's: an MLP of each atom's processor
    latents to `in_dim` features, summed (GNS-TAT: averaged) over the graph, then another MLP
    of the result; the element references are summed (averaged) beside it.
    """

    def __init__(self, in_dim: int, n_out: int = 1, *, hidden_dim: int | None = None, n_layers: int = 3,
                 act: Activation = "ssp", readout: Literal["sum", "mean"] = "sum", squeeze: bool = True,
                 slope: float = 0.0, element_reference: Tensor | None = None, encoder_mlp: bool = False,
                 readout_mlp: bool = False):
        super().__init__()
        if encoder_mlp and readout_mlp:
            raise ValueError("a graph head has an encoder MLP or a readout MLP, not both")
        hidden = hidden_dim or in_dim
        self.mlp = MLP(in_dim, hidden, in_dim if readout_mlp else n_out, n_layers, act, slope=slope)
        self.encoder_mlp = MLP(in_dim, hidden, n_out, n_layers, act, slope=slope) if encoder_mlp else None
        self.graph_bias = nn.Parameter(torch.zeros(n_out)) if encoder_mlp else None
        self.readout_mlp = MLP(in_dim, hidden, n_out, n_layers, act, slope=slope) if readout_mlp else None
        self.readout = readout
        self.n_out = n_out
        self.squeeze = squeeze and n_out == 1
        # Fixed per-element offsets [119, n_out] added to each atom's output (a sum readout's
        # E = Σ_atoms (mlp + E0[Z]), MACE's E0s): the network learns the small residual.
        reference = torch.zeros(N_ATOM_TYPES, n_out) if element_reference is None else torch.as_tensor(element_reference, dtype=torch.float32).reshape(N_ATOM_TYPES, n_out)
        self.register_buffer("element_reference", reference)

    def forward(self, latents: Latents, block: int, batch: Batch) -> Tensor:
        reference = self.element_reference.to(latents.scalars[block].dtype)[batch.numbers]
        if self.readout_mlp is not None:
            out = self.readout_mlp(self._pool(self.mlp(latents.scalars[block]), batch)) + self._pool(reference, batch)
        elif self.encoder_mlp is not None:
            if latents.encoder_scalars is None:
                raise ValueError("GraphScalarHead with encoder_mlp needs a backbone that returns encoder latents (GNS)")
            per_atom = self.mlp(latents.scalars[block]) + self.encoder_mlp(latents.encoder_scalars) + reference
            out = self._pool(per_atom, batch) + self.graph_bias
        else:
            out = self._pool(self.mlp((latents.graph_scalars or latents.scalars)[block]) + reference, batch)
        return out[:, 0] if self.squeeze else out

    def _pool(self, per_atom: Tensor, batch: Batch) -> Tensor:
        """[N, C] → [B, C]: the sum (or mean) over each graph's atoms, in float32 at least (bf16
        sums of hundreds of atoms lose the energy's last digits)."""
        dtype = torch.promote_types(per_atom.dtype, torch.float32)
        out = per_atom.new_zeros(batch.num_graphs, per_atom.shape[1], dtype=dtype).index_add_(0, batch.batch, per_atom.to(dtype))
        if self.readout == "mean":
            out = out / batch.n_node.to(out.dtype)[:, None]
        return out


class NodeVectorHead(Head):
    """[N, 3] per-atom vectors (noise, position deltas, direct forces).

    On a backbone with vector features, a linear map of the l=1 channels gated by an MLP of the
    scalars: rotation-equivariant. Otherwise an MLP of the scalars to 3 numbers, mapped to
    Cartesian by `latents.vector_frame` when the backbone worked in another basis.
    """

    def __init__(self, in_dim: int, vector_dim: int = 0, *, hidden_dim: int | None = None, n_layers: int = 3,
                 act: Activation = "ssp", slope: float = 0.0):
        super().__init__()
        self.vector_dim = vector_dim
        if vector_dim:
            self.gate = MLP(in_dim, hidden_dim or in_dim, vector_dim, n_layers, act, slope=slope)
            self.mix = nn.Linear(vector_dim, 1, bias=False)
        else:
            self.mlp = MLP(in_dim, hidden_dim or in_dim, 3, n_layers, act, slope=slope)

    def forward(self, latents: Latents, block: int, batch: Batch) -> Tensor:
        scalars = latents.scalars[block]
        if self.vector_dim:
            if latents.vectors is None:
                raise ValueError("NodeVectorHead with vector_dim > 0 needs a backbone with vector features")
            vectors = latents.vectors[block] * self.gate(scalars)[:, None, :]  # [N, 3, V]
            return self.mix(vectors)[..., 0]
        out = self.mlp(scalars)
        if latents.vector_frame is not None:
            out = torch.einsum("nij,nj->ni", latents.vector_frame, out)
        return out


class EdgeVectorHead(Head):
    """[N, 3] per-atom vectors as Σ_j w(e_ij) d̂_ij: an MLP of each edge's latents weighs the
    Cartesian unit vector to its neighbour (the force readout of edge-based models).

    Frame-free, so a non-equivariant backbone does not have to assemble a small vector out of
    the nearly cancelling, nonlinear sum of ~50 neighbours' features (the `NodeVectorHead`
    scalar branch fits rattled-slab EMT forces poorly: tests/test_learning.py); rotation-
    equivariant whenever the edge latents are invariant. Needs `latents.edges`.
    """

    def __init__(self, edge_dim: int, *, hidden_dim: int | None = None, n_layers: int = 3, act: Activation = "ssp",
                 slope: float = 0.0):
        super().__init__()
        self.mlp = MLP(edge_dim, hidden_dim or edge_dim, 1, n_layers, act, slope=slope)

    def forward(self, latents: Latents, block: int, batch: Batch) -> Tensor:
        if latents.edges is None:
            raise ValueError("EdgeVectorHead needs a backbone that returns edge latents (GNS)")
        d = edge_vectors(batch)
        unit = d / d.norm(dim=1, keepdim=True).clamp_min(1e-9)
        weight = self.mlp(latents.edges[block]).to(unit.dtype)
        if latents.edge_weights is not None:  # the backbone's smooth cutoff
            weight = weight * latents.edge_weights.to(unit.dtype)[:, None]
        weighted = weight * unit
        return torch.zeros_like(batch.positions).index_add_(0, batch.edge_index[0], weighted)


class AtomTypeHead(Head):
    """[N, 119] logits of each atom's type (masked atom-type prediction)."""

    def __init__(self, in_dim: int, *, hidden_dim: int | None = None, n_layers: int = 2, act: Activation = "ssp",
                 slope: float = 0.0):
        super().__init__()
        self.mlp = MLP(in_dim, hidden_dim or in_dim, N_ATOM_TYPES, n_layers, act, slope=slope)

    def forward(self, latents: Latents, block: int, batch: Batch) -> Tensor:
        return self.mlp(latents.scalars[block])
