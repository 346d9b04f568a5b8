"""One PNG chart per benchmark suite (`molden benchmark`), drawn from the suite's rows.

- radius: time against atoms on log-log axes for the bulk-crystal series, one line per tool
  (the scaling plot), beside the peer / molden time ratio of every other case;
- train: each preset's step split into data, corrupt (noise + graph) and compute;
- io: structures/s of each way of reading the cache, against what training consumes;
- relax: structure-steps/s of each relaxer at each batch size.

Only peers that found molden's exact result are drawn (the suites flag the others).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from molden.train.plots import save_png

if TYPE_CHECKING:
    from molden.bench.suites import SuiteResult


def suite_chart(result: SuiteResult, machine: dict, path: Path) -> None:
    """Draw `result`'s chart into the PNG file `path` (written whole or not at all)."""
    from matplotlib.figure import Figure

    draw = {"radius": _radius, "train": _train, "io": _io, "relax": _relax}[result.name]
    figure = Figure(figsize=(13, 5), layout="constrained")
    draw(figure, result.rows)
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    figure.suptitle(f"{result.title}\n{machine.get('cpu', '')}, {machine.get('torch_threads')} threads{gpu}, "
                    f"torch {machine.get('torch')}, {machine.get('utc', machine.get('date', ''))}", fontsize=9)
    save_png(figure, path)


def _radius(figure, rows: list[dict]) -> None:
    from molden.bench.radius_graph import scaling_case

    scaling, ratios = figure.subplots(1, 2)
    series = [r for r in rows if scaling_case(r) and r["agree"]]
    molden: dict[int, list[float]] = defaultdict(list)
    peers: dict[str, dict[int, float]] = defaultdict(dict)
    for r in series:
        molden[r["n_atoms"]].append(r["molden_ms"])
        peers[r["peer"]][r["n_atoms"]] = r["peer_ms"]
    atoms = sorted(molden)
    scaling.plot(atoms, [statistics.median(molden[n]) for n in atoms], "o-", linewidth=2.2, label="molden", color="black")
    for name, times in sorted(peers.items()):
        n = sorted(times)
        scaling.plot(n, [times[k] for k in n], "s--", label=name)
    scaling.set(xscale="log", yscale="log", xlabel="atoms (bulk fcc Cu)", ylabel="ms per radius graph",
                title=f"scaling, cutoff {series[0]['cutoff_angstrom']:g} Å" if series else "scaling")
    scaling.grid(True, which="both", alpha=0.3)
    scaling.legend(fontsize=8)
    others = [r for r in rows if not scaling_case(r) and r["agree"]]
    labels = [f"{r['case']} ({r['cutoff_angstrom']:g} Å) vs {r['peer']}" for r in others]
    ratios.barh(range(len(others)), [r["ratio"] for r in others], color="tab:blue")
    ratios.set_yticks(range(len(others)), labels, fontsize=7)
    ratios.axvline(1.0, color="black", linewidth=1)
    ratios.set(xscale="log", xlabel="peer time / molden time (> 1: molden faster)")
    ratios.invert_yaxis()


def _train(figure, rows: list[dict]) -> None:
    steps, shares = figure.subplots(1, 2)
    names = [r["preset"] for r in rows]
    left = [0.0] * len(rows)
    for key, label, colour in (("data_ms", "data", "tab:orange"), ("corrupt_ms", "noise + graph", "tab:red"),
                               ("compute_ms", "compute", "tab:blue")):
        values = [r[key] for r in rows]
        steps.barh(names, values, left=left, label=label, color=colour)
        left = [a + b for a, b in zip(left, values)]
    steps.set(xlabel="ms per training step")
    steps.legend(fontsize=8)
    shares.barh(names, [r["data_graph_percent"] for r in rows], color="tab:red")
    shares.axvline(5.0, color="black", linestyle="--", linewidth=1, label="goal 5 %")
    shares.set(xlabel="data + graph, % of the step")
    shares.legend(fontsize=8)


def _io(figure, rows: list[dict]) -> None:
    axis = figure.subplots()
    axis.barh([r["mode"] for r in rows], [r["structures_per_second"] for r in rows], color="tab:green")
    if rows:
        consumed = rows[0]["structures_per_second"] / rows[0]["headroom"]
        axis.axvline(consumed, color="black", linestyle="--", label=f"fastest training step: {consumed:,.0f}/s")
        axis.legend(fontsize=8)
    axis.set(xscale="log", xlabel="structures per second")
    axis.invert_yaxis()


def _relax(figure, rows: list[dict]) -> None:
    rates, direct = figure.subplots(1, 2)
    drawn = [r for r in rows if r.get("structure_steps_per_s") and r.get("agree") is not False]
    labels = [f"{r['tool']} {r['method']}, {r['n_systems']} systems" for r in drawn]
    rates.barh(labels, [r["structure_steps_per_s"] for r in drawn],
               color=["black" if r["tool"] == "molden" else "tab:blue" for r in drawn])
    rates.set(xlabel="structure-steps per second (molden black)")
    rates.invert_yaxis()
    speedups = [r for r in rows if r.get("direct_speedup")]
    direct.bar([str(r["n_systems"]) for r in speedups], [r["direct_speedup"] for r in speedups], color="tab:green")
    direct.set(xlabel="systems", ylabel=f"direct prediction speed-up over {rows[0]['steps'] if rows else ''} L-BFGS steps")
