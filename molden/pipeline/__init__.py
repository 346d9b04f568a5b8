"""Pipelines that join readers (`molden.data`) and graph building (`molden.graph`).

`molden.data` and `molden.graph` stand alone; what needs both (preprocess: read → build graphs
→ write the cache) lives here, above them.
"""
