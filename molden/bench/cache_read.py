"""How fast an HDF5 graph cache feeds training: random-access reads and collated batches.

`python -m molden.bench.cache_read CACHE.h5 [--out result.json]` measures, on one file,
structures per second for (a) random single-structure reads from memory, (b) the same from
disk through HDF5's chunk cache (files too big for memory), and (c) shuffled batches of 128
collated into a `Batch`, the whole data path of a training step.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from molden.data import H5Dataset, collate


def _rate(fn, n_items: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_items / float(np.median(times))


def run_cache_read_benchmark(path: str | Path, n_reads: int = 5000, batch_size: int = 128, seed: int = 0) -> list[dict]:
    """Rows of {mode, structures_per_second} for one cache file."""
    rows = []
    in_memory = H5Dataset(path)
    on_disk = H5Dataset(path, in_memory_bytes=0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(in_memory))[:n_reads]
    in_memory[0]  # loads arrays once: a one-off cost, like opening the file
    for mode, data in (("random read, in memory", in_memory), ("random read, from disk", on_disk)):
        rows.append({"mode": mode, "structures_per_second": _rate(lambda: [data[int(k)] for k in order], len(order))})

    def batches():
        for start in range(0, len(order), batch_size):
            collate([in_memory[int(k)] for k in order[start : start + batch_size]], dtype=torch.float32)

    rows.append({"mode": f"shuffled batches of {batch_size}, collated", "structures_per_second": _rate(batches, len(order))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = run_cache_read_benchmark(args.cache, args.reads)
    for row in rows:
        print(f"{row['mode']:<40} {row['structures_per_second']:>12,.0f} structures/s")
    if args.out:
        args.out.write_text(json.dumps({"cache": str(args.cache), "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
