"""One-thread matmul rate by process CPU time, for comparing kernels on a shared machine.

    python benchmarks/kernel_cpu_rate.py --types Q4_1_X8,Q4_1,Q6_K_X8,Q6_K --m 1,4,64,256 [--shape 512x2048]

`time.process_time()` around a loop on one thread counts only this process's CPU time, so it stays within a few
percent while other jobs load the machine (wall time does not). The matrix is small enough to stay in cache: this
measures instructions, not memory (decode on a whole model is bounded by DRAM as well). A name ending in _X8 is the
load-time repacked layout of the base type (skipped where this code path has no kernel for it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType as QT

from ondevice import _kernels as K


def weights(type_name: str, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, int] | None:
    base = int(QT[type_name.removesuffix("_X8")])
    rows = np.empty((n, K.row_nbytes(base, k)), np.uint8)
    K.quantize_rows(rows, rng.standard_normal((n, k)).astype(np.float32), base, k)
    if not type_name.endswith("_X8"):
        return rows, base
    packed_type = K.repacked_type(base)
    if packed_type is None:
        return None
    packed = np.empty((n, K.row_nbytes(packed_type, k)), np.uint8)
    K.repack(packed, rows, base, k)
    return packed, packed_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="Q4_0_X8,Q4_1_X8,Q4_K_X8,Q6_K_X8,Q8_0")
    parser.add_argument("--m", default="1,4,64", help="activation rows per call, comma-separated")
    parser.add_argument("--shape", default="512x2048", help="N x K of the weight matrix")
    parser.add_argument("--rounds", type=int, default=5, help="the best of this many timed loops is reported")
    args = parser.parse_args()
    n, k = (int(v) for v in args.shape.split("x"))
    rng = np.random.default_rng(0)
    K.set_threads(1)
    print(f"isa {K.isa()}, {n} x {k}, one thread, best of {args.rounds} (process CPU time)")
    for type_name in args.types.split(","):
        made = weights(type_name, n, k, rng)
        if made is None:
            print(f"{type_name:8s} no kernel on this code path")
            continue
        w, wtype = made
        for m in (int(v) for v in args.m.split(",")):
            x = rng.standard_normal((m, k)).astype(np.float32)
            out = np.empty((m, n), np.float32)
            calls = max(20, 2000 // m)
            K.matmul(out, w, wtype, x, k)
            best = float("inf")
            for _ in range(args.rounds):
                start = time.process_time()
                for _ in range(calls):
                    K.matmul(out, w, wtype, x, k)
                best = min(best, (time.process_time() - start) / calls)
            print(f"{type_name:8s} M={m:<4d} {best * 1e6:9.1f} us  {w.nbytes / best / 1e9:6.2f} GB/s  "
                  f"{2 * m * n * k / best / 1e9:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
