"""How fast an HDF5 graph cache feeds training: random-access reads and collated batches.

`python -m molden.bench.cache_read CACHE.h5 [--out result.json]` measures, on one file,
structures per second for (a) random single-structure reads from memory, (b) the same from
disk (files too big for memory), (c) block-shuffled reads from disk (`BlockShuffleSampler`,
the order training uses on such files), and (d) shuffled batches of 128 collated into a
`Batch`, the whole data path of a training step, from memory and block-shuffled from disk.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from molden.data import H5Dataset, collate
from molden.data.sampling import BlockShuffleSampler


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
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(in_memory))[:n_reads]
    in_memory[0]  # loads arrays once: a one-off cost, like opening the file

    def on_disk() -> H5Dataset:  # a fresh dataset per repeat: no blocks cached from the last one
        return H5Dataset(path, in_memory_bytes=0)

    def reads(data: H5Dataset, indices) -> None:
        for k in indices:
            data[int(k)]

    def block_order() -> np.ndarray:
        return BlockShuffleSampler(on_disk(), seed=seed).order()[:n_reads]

    def batches(data: H5Dataset, indices) -> None:
        for start in range(0, len(indices), batch_size):
            collate([data[int(k)] for k in indices[start : start + batch_size]], dtype=torch.float32)

    cases = [
        ("random reads, in memory", lambda: reads(in_memory, order)),
        ("random reads, from disk", lambda: reads(on_disk(), order)),
        ("block-shuffled reads, from disk", lambda: reads(on_disk(), block_order())),
        (f"shuffled batches of {batch_size}, in memory, collated", lambda: batches(in_memory, order)),
        (f"block-shuffled batches of {batch_size}, from disk, collated", lambda: batches(on_disk(), block_order())),
    ]
    for mode, fn in cases:
        rows.append({"mode": mode, "structures_per_second": _rate(fn, len(order))})
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
