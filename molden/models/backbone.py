"""The backbone contract: a `Batch` in, node latents per block iteration out.

Every backbone (GNS, GNS-TAT, ForceNet, the equivariant one) is an `nn.Module` subclass of
`Backbone`. It computes edge vectors itself from `batch.positions`, `batch.cell` and
`batch.unit_shifts` (`molden.graph.edge_vectors`) on the batch's device, so positions that
differ from the cached ones (noised, relaxed) are always honoured, and the conservative forces
of `Model` flow through them. It never mutates the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from molden.data.batch import Batch


@dataclass(frozen=True)
class Latents:
    """What a backbone hands to heads.

    Attributes:
        scalars: one [N, F] tensor per decoded block iteration (K >= 1), last = final;
            rotation-invariant node features.
        vectors: one [N, 3, V] tensor per block iteration (rotation-equivariant l=1
            features, in Å-free units), or None for backbones without vector features.
        graph_scalars: one [N, F] tensor per block iteration that a graph-level readout should
            sum (GNS's graph decoder sums the encoder and every processor layer, Noisy Nodes
            §3.2); defaults to `scalars` when None.
        vector_frame: [N, 3, 3] per-atom matrix that takes a head's 3-vector from the frame the
            backbone worked in to Cartesian (`cartesian = vector_frame @ v`), or None when the
            backbone works in Cartesian coordinates. GNS on periodic systems works in the
            cell's basis (Noisy Nodes §5.1, A(GNN(A⁻¹ν))) and sets it.
        edges: one [E, F] tensor of edge latents per block iteration (edges in the batch's
            `edge_index` order), or None for backbones without edge latents; `EdgeVectorHead`
            reads them.
        edge_weights: [E] smooth cutoff weight of each edge (1 inside, 0 at the cutoff), or
            None: a head summing over edges multiplies by it, so an edge entering the graph
            changes nothing abruptly.
        encoder_scalars: [N, F] node latents of the encoder, before any message passing, for a
            graph decoder with an MLP of its own on them (Noisy Nodes §3.2:
            W_E Σ MLP_E(a^Enc) beside W_P Σ MLP_P(a^Proc)), or None for backbones without.
    """

    scalars: list[Tensor]
    vectors: list[Tensor] | None = None
    graph_scalars: list[Tensor] | None = None
    vector_frame: Tensor | None = None
    edges: list[Tensor] | None = None
    edge_weights: Tensor | None = None
    encoder_scalars: Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.scalars)


class Backbone(nn.Module):
    """Base class of backbones. Subclasses set `scalar_dim`, `vector_dim` (0 if none) and
    `equivariant` (True when `vectors` rotate with the input and `scalars` are invariant)."""

    scalar_dim: int
    vector_dim: int = 0
    equivariant: bool = False

    def forward(self, batch: Batch, *, all_blocks: bool = False) -> Latents:  # pragma: no cover - abstract
        """Latents of the last block iteration, or of every one when `all_blocks`."""
        raise NotImplementedError
