"""Micro-benchmark of ondevice._kernels.matmul on the SmolLM2-135M shapes.

Reports, per weight type, shape (N x K), batch M and thread count: time per call, effective weight
bandwidth (weight bytes / time) and GFLOP/s (2*M*N*K / time).

For M=1 (decode) two numbers are given: "hot" re-reads one weight matrix, which then sits in L2/L3;
"cold" cycles through enough copies (> 96 MB) that every call streams its weights from DRAM, as a
real decode step does with a whole model. M=256 (prefill) is compute-bound, so only hot is shown.

    python benchmarks/kernels_bench.py                       # everything (a few minutes)
    python benchmarks/kernels_bench.py --types Q4_1 Q8_0 --m 1 --threads 2
    python benchmarks/kernels_bench.py --overhead            # per-call binding overhead only
"""

from __future__ import annotations

import argparse
import time
import timeit

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from ondevice import _kernels as K

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N rows, K) of W
TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]
COLD_BYTES = 96 << 20


def make_weights(type_name: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    qtype = QT[type_name]
    dense = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if qtype == QT.F32:
        return dense.view(np.uint8)
    if qtype == QT.F16:
        return dense.astype(np.float16).view(np.uint8)
    if qtype in (QT.Q4_K, QT.Q6_K):
        # gguf-py has no K-quant quantizer; random codes with sane scales time the same
        row_bytes = K.row_nbytes(int(qtype), k)
        w = rng.integers(0, 256, size=(n, row_bytes), dtype=np.uint8)
        blocks = w.reshape(-1, 144 if qtype == QT.Q4_K else 210)
        scale = rng.uniform(1e-4, 1e-3, len(blocks)).astype(np.float16).view(np.uint8).reshape(-1, 2)
        if qtype == QT.Q4_K:
            blocks[:, 0:2] = scale
            blocks[:, 2:4] = scale
        else:
            blocks[:, 208:210] = scale
        return w
    return quants.quantize(dense, qtype)


def time_calls(fn, min_seconds: float = 0.3, max_calls: int = 20000) -> float:
    """Best-of-5 mean time per call, each repeat running >= min_seconds / 5."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = int(min(max_calls, max(1, min_seconds / 5 / once)))
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def bench_matmul(type_name: str, n: int, k: int, m: int, threads: int, cold: bool, rng: np.random.Generator) -> tuple[float, int]:
    qtype = int(QT[type_name])
    w = make_weights(type_name, n, k, rng)
    copies = [w]
    if cold:
        copies += [w.copy() for _ in range(max(0, COLD_BYTES // w.nbytes))]
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    K.set_threads(threads)
    state = {"i": 0}

    def call() -> None:
        i = state["i"]
        K.matmul(out, copies[i], qtype, x, k)
        state["i"] = (i + 1) % len(copies)

    seconds = time_calls(call, min_seconds=0.3 if m == 1 else 0.6)
    return seconds, w.nbytes


def per_call_overhead() -> None:
    """Python -> C round trip of tiny calls (the decode loop makes ~400 per token)."""
    x = np.ones((1, 576), np.float32)
    w = np.ones(576, np.float32)
    out = np.empty_like(x)
    q = np.ones((1, 9, 64), np.float32)
    pos = np.zeros(1, np.int32)
    n = 200000
    rms = min(timeit.repeat(lambda: K.rmsnorm(out, x, w, 1e-5), number=n, repeat=5)) / n
    rope = min(timeit.repeat(lambda: K.rope(q, pos, 10000.0, False), number=n, repeat=5)) / n
    add = min(timeit.repeat(lambda: K.add_inplace(out, x), number=n, repeat=5)) / n
    noop = min(timeit.repeat(lambda: K.get_threads(), number=n, repeat=5)) / n
    print(f"per-call: rmsnorm(1x576) {rms * 1e6:.2f} us, rope(1x9x64) {rope * 1e6:.2f} us, "
          f"add_inplace(576) {add * 1e6:.2f} us, get_threads() {noop * 1e6:.2f} us (bare call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--m", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=None, help="NxK, e.g. 576x1536")
    parser.add_argument("--overhead", action="store_true", help="only measure per-call overhead")
    parser.add_argument("--no-cold", action="store_true", help="skip the DRAM-streaming M=1 runs")
    args = parser.parse_args()
    print(f"isa={K.isa()} features='{K.cpu_features()}' physical_cores={K.physical_cores()}")
    per_call_overhead()
    if args.overhead:
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    default_threads = K.get_threads()
    print(f"{'type':5} {'N x K':>11} {'M':>4} {'thr':>3} {'mode':>4} {'us/call':>9} {'GB/s':>7} {'GFLOP/s':>8}")
    for type_name in args.types:
        for n, k in shapes:
            if type_name in ("Q4_K", "Q6_K") and k % 256:
                continue
            for m in args.m:
                for threads in args.threads:
                    modes = [False] if m > 1 or args.no_cold else [False, True]
                    for cold in modes:
                        seconds, nbytes = bench_matmul(type_name, n, k, m, threads, cold, rng)
                        gbs = nbytes / seconds / 1e9
                        gflops = 2.0 * m * n * k / seconds / 1e9
                        print(f"{type_name:5} {n:>5}x{k:<5} {m:>4} {threads:>3} {'cold' if cold else 'hot':>4} "
                              f"{seconds * 1e6:>9.1f} {gbs:>7.2f} {gflops:>8.1f}", flush=True)
    K.set_threads(default_threads)


if __name__ == "__main__":
    main()
