"""One-thread attention kernel time by process CPU time, for comparing kernels on a shared machine.

    python benchmarks/attention_rate.py                      # SmolLM2's heads: 9 query / 3 KV, head dim 64
    python benchmarks/attention_rate.py --heads 4/1 --head-dim 256 --kv f32

One call of `_kernels.attention` per case (one layer's attention), the best of `--rounds` timed loops, by
`time.process_time()` so other jobs on the machine do not count. Cases: decode (1 query row) after 300 and 1500
keys, a 4-row verification pass after 300, and a 512-token prefill.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ondevice import _kernels as K

CASES = ((1, 300), (4, 300), (1, 1500), (512, 0))  # (query rows, keys already cached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default="9/3", help="query heads / KV heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--kv", choices=("f16", "f32"), default="f16", help="KV cache element type")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    h, hkv = (int(v) for v in args.heads.split("/"))
    d, ctx = args.head_dim, 2048
    rng = np.random.default_rng(0)
    dtype = np.float16 if args.kv == "f16" else np.float32
    k_cache = rng.standard_normal((hkv, ctx, d)).astype(dtype)
    v_cache = rng.standard_normal((hkv, ctx, d)).astype(dtype)
    K.set_threads(1)
    print(f"isa {K.isa()}, {h}/{hkv} heads, head dim {d}, {args.kv} cache, one thread, best of {args.rounds}")
    for rows, pos0 in CASES:
        q = rng.standard_normal((rows, h, d)).astype(np.float32)
        out = np.empty((rows, h * d), np.float32)
        calls = max(3, 3000 * 300 // (rows * (pos0 + rows)))
        best = float("inf")
        for _ in range(args.rounds):
            start = time.process_time()
            for _ in range(calls):
                K.attention(out, q, k_cache, v_cache, pos0, 1.0 / np.sqrt(d))
            best = min(best, (time.process_time() - start) / calls)
        print(f"{rows:4d} row(s) after {pos0:5d} keys  {best * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
