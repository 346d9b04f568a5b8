"""The benchmarks run end to end and every peer finds molden's edges (no timing asserted)."""

from __future__ import annotations

from molden.bench.radius_graph import run_radius_graph_benchmark


def test_radius_graph_benchmark_peers_agree_with_molden_on_every_case():
    rows = run_radius_graph_benchmark(repeats=1, quick=True)
    timed = [r for r in rows if r["peer_ms"] is not None]
    assert {r["peer"] for r in timed} >= {"vesin", "ase"}
    assert all(r["agree"] for r in timed), [(r["case"], r["peer"]) for r in timed if not r["agree"]]
    assert all(r["molden_ms"] > 0 and r["ratio"] > 0 for r in timed)
