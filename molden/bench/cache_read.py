"""How fast an HDF5 graph cache feeds training: random-access reads and collated batches.

`python -m molden.bench.cache_read CACHE.h5 [--out result.json]` measures, on one file,
structures per second for (a) random single-structure reads from memory, (b) the same from
disk (files too big for memory), (c) block-shuffled reads from disk (`BlockShuffleSampler`,
the order training uses on such files), and (d) shuffled batches of 128 collated into a
`Batch`, the whole data path of a training step, from memory and block-shuffled from disk.

`python -m molden.bench.cache_read CACHE.h5 --memory [--workers 2]` measures instead the peak
memory of one epoch through a `DataLoader` with worker processes (fork and spawn), each case in
a fresh Python process: the peak over time of the summed RSS of the main process and its
workers, and of their summed PSS (proportional set size: a page shared by n processes counts
1/n in each, so memory shared between workers is counted once). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def run_cache_read_benchmark(path: str | Path, n_reads: int = 5000, batch_size: int = 128, seed: int = 0,
                             workers: int = 2) -> list[dict]:
    """Rows of {mode, structures_per_second} for one cache file; with `workers` > 0 also the
    training loop's own DataLoader (`molden.train.data.loader`) with that many worker processes."""
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
    if workers:
        cases.append((f"shuffled batches of {batch_size}, training DataLoader, {workers} workers",
                      lambda: _through_training_loader(path, order, batch_size, workers)))
    for mode, fn in cases:
        rows.append({"mode": mode, "structures_per_second": _rate(fn, len(order))})
    return rows


def _through_training_loader(path: str | Path, indices: np.ndarray, batch_size: int, workers: int) -> None:
    """One pass of the training loop's DataLoader (worker start-up included, as every epoch
    pays it) over `indices` in batches of `batch_size`."""
    from molden.train.config import DataConfig
    from molden.train.data import loader

    config = DataConfig(path=Path(path), max_graphs=batch_size, workers=workers)
    plan = [indices[k : k + batch_size].tolist() for k in range(0, len(indices), batch_size)]
    n = sum(batch.num_graphs for batch in loader(H5Dataset(path), plan, config, torch.float32, pin=False))
    assert n == len(indices), (n, len(indices))


def _memory_case(path: str, context: str, workers: int, batch_size: int, touch_first: bool,
                 sidecar: str | None = None) -> None:
    """One epoch of collated batches through a DataLoader (run in a fresh process)."""
    from torch.utils.data import DataLoader

    data = H5Dataset(path, sidecar=sidecar) if sidecar else H5Dataset(path)
    if touch_first:  # a user who looks at one structure before training
        data[0]
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        multiprocessing_context=context, persistent_workers=False)
    n = sum(batch.num_graphs for batch in loader)
    assert n == len(data), (n, len(data))


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _rss_pss_bytes(pid: int) -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except OSError:
        return 0, 0
    return int(fields["Rss"].split()[0]) << 10, int(fields["Pss"].split()[0]) << 10


def run_worker_memory_benchmark(path: str | Path, workers: int = 2, batch_size: int = 128,
                                contexts: tuple[str, ...] = ("fork", "spawn"), sidecar: str | Path | None = None) -> list[dict]:
    """Peak summed RSS and PSS (bytes) of one DataLoader epoch, per start method and start state
    (and, with `sidecar`, reading a memory-mapped decompressed copy made beforehand)."""
    rows = []
    cases = [(c, t, None) for c in contexts for t in (False, True)]
    if sidecar:
        H5Dataset(path, sidecar=sidecar)  # written once, outside the measurement
        cases += [(c, False, str(sidecar)) for c in contexts]
    for context, touch_first, side in cases:
        command = [sys.executable, "-m", "molden.bench.cache_read", str(path), "--memory-case", context,
                   "--workers", str(workers), "--batch-size", str(batch_size)] + (["--touch-first"] if touch_first else [])
        command += ["--sidecar", side] if side else []
        child = subprocess.Popen(command)
        peak_rss = peak_pss = peak_main = 0
        start = time.perf_counter()
        while child.poll() is None:
            pids = _tree(child.pid)
            sizes = [_rss_pss_bytes(p) for p in pids]
            peak_rss = max(peak_rss, sum(r for r, _ in sizes))
            peak_pss = max(peak_pss, sum(p for _, p in sizes))
            peak_main = max(peak_main, sizes[0][0])
            time.sleep(0.02)
        if child.returncode:
            raise RuntimeError(f"{command} exited with {child.returncode}")
        rows.append({"context": context, "workers": workers, "parent_read_first": touch_first, "sidecar": side,
                     "peak_rss_sum_bytes": peak_rss, "peak_pss_sum_bytes": peak_pss,
                     "peak_main_rss_bytes": peak_main, "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory", action="store_true", help="peak memory of a DataLoader epoch instead of speed")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: no DataLoader case)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--memory-case", choices=["fork", "spawn"], help=argparse.SUPPRESS)
    parser.add_argument("--touch-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sidecar", type=Path, help="with --memory: also measure a memory-mapped sidecar in this folder")
    args = parser.parse_args()
    if args.memory_case:
        _memory_case(str(args.cache), args.memory_case, args.workers, args.batch_size, args.touch_first,
                     str(args.sidecar) if args.sidecar else None)
        return
    if args.memory:
        rows = run_worker_memory_benchmark(args.cache, args.workers, args.batch_size, sidecar=args.sidecar)
        for row in rows:
            print(f"{row['context']:<6} {'sidecar' if row['sidecar'] else 'default':<8} parent read first: {row['parent_read_first']!s:<5} "
                  f"peak RSS sum {row['peak_rss_sum_bytes'] / 2**20:>7,.0f} MiB  "
                  f"peak PSS sum {row['peak_pss_sum_bytes'] / 2**20:>7,.0f} MiB  "
                  f"main {row['peak_main_rss_bytes'] / 2**20:>6,.0f} MiB  {row['seconds']:.0f} s")
        if args.out:
            args.out.write_text(json.dumps({"cache": str(args.cache), "rows": rows}, indent=2))
        return
    rows = run_cache_read_benchmark(args.cache, args.reads, args.batch_size, workers=args.workers)
    for row in rows:
        print(f"{row['mode']:<40} {row['structures_per_second']:>12,.0f} structures/s")
    if args.out:
        args.out.write_text(json.dumps({"cache": str(args.cache), "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
