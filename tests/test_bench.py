"""The radius-graph benchmark measures what it claims: molden's public `radius_graph` against
every peer on every case, each peer having found exactly molden's pairs (no timing asserted)."""

from __future__ import annotations

import math

import pytest

from molden.bench.radius_graph import benchmark_cases, run_radius_graph_benchmark

EXPECTED_PEERS = {"vesin", "matscipy", "ase", "torch-cluster", "vesin.torch", "nvalchemiops"}


@pytest.mark.slow
def test_radius_graph_benchmark_has_a_row_per_case_and_peer_and_every_peer_finds_molden_pairs():
    rows = run_radius_graph_benchmark(repeats=1, quick=True)
    cases = [(c.name, c.cutoff) for c in benchmark_cases(quick=True)]
    for case in cases:
        got = {r["peer"] for r in rows if (r["case"], r["cutoff_angstrom"]) == case}
        assert got == EXPECTED_PEERS, (case, got)
    timed = [r for r in rows if r["peer_ms"] is not None]
    # vesin, ASE and nvalchemi-toolkit-ops are installed wherever the tests run (`[test]`):
    # they are timed on every case.
    for peer in ("vesin", "ase", "nvalchemiops"):
        assert {(r["case"], r["cutoff_angstrom"]) for r in timed if r["peer"] == peer} == set(cases)
    assert all(r["agree"] is True for r in timed), [(r["case"], r["peer"]) for r in timed if not r["agree"]]
    assert all(r["molden_function"] == "radius_graph" for r in rows)
    assert all(math.isfinite(r["ratio"]) and r["ratio"] == r["peer_ms"] / r["molden_ms"] for r in timed)
    untimed = [r for r in rows if r["peer_ms"] is None]
    assert all(r["note"] for r in untimed), "a peer not timed must say why"


def test_benchmark_peers_that_are_missing_say_how_to_install_them(monkeypatch):
    import molden.bench.radius_graph as bench

    monkeypatch.setattr(bench, "_importable", lambda module: False)
    case = bench.benchmark_cases(quick=True)[2]  # molecules: torch-cluster would apply
    peers = bench._peer_runners(case, "cpu")
    for name in ("torch-cluster", "vesin.torch", "nvalchemiops"):
        assert peers[name].run is None and "pip install" in peers[name].note
