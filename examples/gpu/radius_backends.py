"""molden's two CUDA radius-graph backends, Triton kernel against pure torch, and vesin-torch on
the GPU as the peer, on the cases of `molden benchmark --suite radius` (the same pairs (i, j, S)
checked first, then timed alternately, medians).

`python examples/gpu/radius_backends.py [--device cuda] [--repeats 7] [--out FILE.json]`

It exists to decide which backend "auto" takes on CUDA: BENCHMARKS.md records its output.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from molden.bench.radius_graph import _interleaved_ms, _vesin_torch_peer, benchmark_cases
from molden.graph import neighbor_list


def _sorted_rows(edge_index: torch.Tensor, unit_shifts: torch.Tensor) -> np.ndarray:
    rows = np.column_stack([edge_index.T.cpu().numpy(), unit_shifts.cpu().numpy()]).astype(np.int64)
    return rows[np.lexsort(rows.T[::-1])]


def compare_backends(device: str = "cuda", repeats: int = 7, dtype: torch.dtype = torch.float64) -> list[dict]:
    """One row per case: edges, whether both backends find the same (i, j, S), and each one's ms."""
    rows = []
    for case in benchmark_cases():
        positions = torch.tensor(np.concatenate([a.positions for a in case.systems]), device=device, dtype=dtype)
        cell = torch.tensor(np.stack([a.cell.array for a in case.systems]), device=device, dtype=dtype)
        pbc = torch.tensor(np.stack([a.pbc for a in case.systems]), device=device)
        n_node = [len(a) for a in case.systems]

        def runner(backend: str):
            def run():
                found = neighbor_list(positions, case.cutoff, cell=cell, pbc=pbc, n_node=n_node, backend=backend)
                torch.cuda.synchronize()
                return found
            return run

        found = {backend: _sorted_rows(*runner(backend)()) for backend in ("torch", "triton")}
        runs = [runner("torch"), runner("triton")]
        vesin = _vesin_torch_peer(case, device) if dtype == torch.float64 else None  # vesin-torch takes the inputs' dtype
        if vesin is not None and vesin.run is not None:
            found["vesin-torch"] = vesin.rows()
            runs.append(vesin.run)
        times = _interleaved_ms(runs, repeats)
        row = {"case": case.name, "n_atoms": sum(n_node), "cutoff_angstrom": case.cutoff, "n_edges": len(found["torch"]),
               "same_pairs": all(np.array_equal(found["triton"], other) for other in found.values()),
               "torch_ms": times[0], "triton_ms": times[1], "torch_over_triton": times[0] / times[1],
               "vesin_torch_ms": None, "vesin_torch_over_triton": None, "dtype": str(dtype).removeprefix("torch.")}
        if len(times) == 3:
            row.update(vesin_torch_ms=times[2], vesin_torch_over_triton=times[2] / times[1])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [row for dtype in (torch.float64, torch.float32) for row in compare_backends(args.device, args.repeats, dtype)]
    print(f"{'case':32} {'dtype':8} {'edges':>10} {'same':>5} {'torch ms':>9} {'triton ms':>9} {'torch/triton':>12}"
          f" {'vesin-torch ms':>14} {'vesin/triton':>12}")
    for r in rows:
        vesin = ("-", "-") if r["vesin_torch_ms"] is None else (f"{r['vesin_torch_ms']:.3f}", f"{r['vesin_torch_over_triton']:.2f}")
        print(f"{r['case']:32} {r['dtype']:8} {r['n_edges']:>10,} {str(r['same_pairs']):>5} {r['torch_ms']:>9.3f} "
              f"{r['triton_ms']:>9.3f} {r['torch_over_triton']:>12.2f} {vesin[0]:>14} {vesin[1]:>12}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
