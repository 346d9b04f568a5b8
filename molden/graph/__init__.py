"""Graph construction: radius graphs with periodic images (`radius_graph`, `neighbor_list`)."""

from molden.graph.radius_graph import backend_for, edge_lengths, nearest_neighbors_mask, neighbor_list, radius_graph

__all__ = ["backend_for", "edge_lengths", "nearest_neighbors_mask", "neighbor_list", "radius_graph"]
