"""This machine's memory read bandwidth per thread count: the limit decode speed is measured against (issue 17).

    python benchmarks/bandwidth.py [--threads 1 2] [--mib 1024] [--repeats 7] [--json]

Each thread streams its own slice of one large array with numpy's bitwise-or reduction over uint64 (vectorized C
that releases the GIL, one OR per 8 bytes: of the numpy reductions tried here it reads fastest, ~29 GB/s on one core
where a float32 sum gives ~24, i.e. it is the one limited by memory rather than by its own arithmetic). The array is far larger than the last-level cache, so
every pass reads DRAM. Reported: the median over the repeats, in GB/s (1e9 bytes per second), which is what
BENCHMARKS.md divides decode's bytes-per-second by.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np


def _read_after(barrier: threading.Barrier, part: np.ndarray) -> None:
    barrier.wait()
    np.bitwise_or.reduce(part)


def read_bandwidth(data: np.ndarray, threads: int, repeats: int) -> list[float]:
    """GB/s of `repeats` passes over `data` (uint64), split into `threads` contiguous slices read concurrently."""
    slices = np.array_split(data, threads)
    rates = []
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        workers = [threading.Thread(target=_read_after, args=(barrier, part)) for part in slices]
        for worker in workers:
            worker.start()
        barrier.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts to measure")
    parser.add_argument("--mib", type=int, default=1024, help="array size in MiB (default 1024, >> L3)")
    parser.add_argument("--repeats", type=int, default=7, help="passes per thread count (median reported)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    data = np.ones(args.mib * (1 << 20) // 8, dtype=np.uint64)  # written once, so every page is resident
    results = []
    for threads in args.threads:
        read_bandwidth(data, threads, 1)  # warm-up pass
        rates = read_bandwidth(data, threads, args.repeats)
        results.append({"threads": threads, "median_gb_s": statistics.median(rates), "max_gb_s": max(rates),
                        "min_gb_s": min(rates), "array_mib": args.mib, "repeats": args.repeats})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for row in results:
        print(f"threads {row['threads']}: read {row['median_gb_s']:.1f} GB/s median "
              f"(min {row['min_gb_s']:.1f}, max {row['max_gb_s']:.1f}; {row['repeats']} passes over {row['array_mib']} MiB)")


if __name__ == "__main__":
    main()
