"""Names of the predictions a `Model` returns: every key of `Model.forward`'s dict, with its
shape and unit, in one place (as schnetpack's `properties.py`).

A head is registered under one of these names (or a name of the user's); `Model.forward`
returns `predictions[name]` from the last block iteration and, with `all_blocks=True`,
`predictions[per_block(name)]` stacked over block iterations ([K, ...], Noisy Nodes §3.2:
every block is decoded during training, the last one at evaluation).
"""

from __future__ import annotations

from typing import Final

ENERGY: Final[str] = "energy"
"""[B] total energy, eV (graph scalar head, sum readout)."""

FORCES: Final[str] = "forces"
"""[N, 3] forces, eV/Å: a direct node-vector head, or −∂E/∂positions (conservative)."""

TARGETS: Final[str] = "targets"
"""[B, T] graph-level targets (QM9 properties, IS2RE relaxed energy) in the normalised units
the objective trains on (the objective converts back to physical units)."""

NOISE: Final[str] = "noise"
"""[N, 3] predicted noise divided by its σ (dimensionless; denoising, DeNS)."""

POSITION_DELTA: Final[str] = "position_delta"
"""[N, 3] predicted displacement to the target positions, Å (Noisy Nodes IS2RS relative
target, §3.3), before the objective's normalisation is undone."""

ATOM_LOGITS: Final[str] = "atom_logits"
"""[N, 119] unnormalised log-probabilities of each atom's type (index = atomic number; masked
atom-type prediction in pre-training via denoising, App. H)."""

NODE_LATENTS: Final[str] = "node_latents"
"""[N, F] the backbone's last node latents (for frozen-backbone fine-tuning, probing)."""

_BLOCKS_SUFFIX: Final[str] = "@blocks"


def per_block(name: str) -> str:
    """The key of `name` stacked over block iterations: [K, ...]."""
    return name + _BLOCKS_SUFFIX
