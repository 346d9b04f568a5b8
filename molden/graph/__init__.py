"""Graph construction: radius graphs with periodic images (`radius_graph`, `neighbor_list`) and
edge vectors recomputed from positions (`edge_vectors`, `cartesian_shifts`)."""

from molden.graph.edges import cartesian_shifts, edge_vectors
from molden.graph.radius_graph import backend_for, edge_lengths, nearest_neighbors_mask, neighbor_list, radius_graph

__all__ = [
    "backend_for",
    "cartesian_shifts",
    "edge_lengths",
    "edge_vectors",
    "nearest_neighbors_mask",
    "neighbor_list",
    "radius_graph",
]
