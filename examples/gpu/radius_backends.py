"""molden's two CUDA radius-graph backends, Triton kernel against pure torch, and vesin-torch on
the GPU as the peer, on the cases of `molden benchmark --suite radius` (the same pairs (i, j, S)
checked first, then timed alternately, medians): `molden.bench.radius_graph.compare_cuda_backends`.

`python examples/gpu/radius_backends.py [--device cuda] [--repeats 7] [--out FILE.json]`

It exists to decide which backend "auto" takes on CUDA: BENCHMARKS.md records its output.
"""

from __future__ import annotations

import argparse
import json

import torch

from molden.bench.radius_graph import compare_cuda_backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [row for dtype in (torch.float64, torch.float32) for row in compare_cuda_backends(args.device, args.repeats, dtype)]
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
