"""Prefill (256-token prompt) and decode speed, ondevice vs llama-cpp-python, same file, same threads, one process,
alternating repeats; decode also as a share of this machine's read bandwidth, measured in the same run.

    python benchmarks/runtime_vs_llama_cpp.py FILE.gguf THREADS [REPEATS] [--json]
    python benchmarks/runtime_vs_llama_cpp.py /tmp/ondevice-1b/llama-1b-random-q4_0.gguf 2 5   # benchmarks/make_1b_model.py

Bytes read per decoded token = every tensor of the file except an untied token_embd (only one row of it is read);
with tied embeddings token_embd is the output layer and is read whole. % of bandwidth = tok/s x those bytes /
the median read GB/s of benchmarks/bandwidth.py at the same thread count (taken before the repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np

import ondevice
from ondevice.formats.gguf import GGUFFile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import read_bandwidth  # noqa: E402  (a sibling script)

DECODE_STEPS = 64


def bytes_per_token(path: str) -> int:
    gguf = GGUFFile(path)
    try:
        tied = "output.weight" not in gguf.tensors
        return sum(info.nbytes for name, info in gguf.tensors.items() if tied or name != "token_embd.weight")
    finally:
        gguf.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="GGUF model file")
    parser.add_argument("threads", type=int)
    parser.add_argument("repeats", type=int, nargs="?", default=3)
    parser.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = parser.parse_args()
    src, threads = args.file, args.threads
    text = (ROOT / "ondevice" / "data" / "eval_text.txt").read_text()
    data = np.ones((1 << 30) // 8, np.uint64)
    read_bandwidth(data, threads, 1)
    bandwidth_gb_s = statistics.median(read_bandwidth(data, threads, 5))
    del data
    weight_bytes = bytes_per_token(src)
    model = ondevice.load(src, threads=threads, n_ctx=512)
    prompt = model.tokenize(text)[:256]
    llm = llama_cpp.Llama(model_path=src, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    rows = []
    for _ in range(args.repeats):
        model.reset()
        t = time.perf_counter()
        model._eval(prompt)
        ours_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(DECODE_STEPS):
            model._step(prompt[i % 50])
        ours_decode = time.perf_counter() - t
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        ref_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(DECODE_STEPS):
            llm.eval([prompt[i % 50]])
        ref_decode = time.perf_counter() - t
        row = {"ours_prefill": 256 / ours_prefill, "ours_decode": DECODE_STEPS / ours_decode,
               "ref_prefill": 256 / ref_prefill, "ref_decode": DECODE_STEPS / ref_decode}
        rows.append(row)
        print(f"threads {threads}: ondevice prefill {row['ours_prefill']:.0f} tok/s, decode {row['ours_decode']:.1f} "
              f"tok/s | llama.cpp prefill {row['ref_prefill']:.0f} tok/s, decode {row['ref_decode']:.1f} tok/s | "
              f"speed ratio prefill {ref_prefill / ours_prefill:.2f}x, decode {ref_decode / ours_decode:.2f}x",
              file=sys.stderr if args.json else sys.stdout)
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    summary = {
        "file": src, "threads": threads, "repeats": args.repeats, **median,
        "prefill_ratio": statistics.median(row["ours_prefill"] / row["ref_prefill"] for row in rows),
        "decode_ratio": statistics.median(row["ours_decode"] / row["ref_decode"] for row in rows),
        "bytes_per_token": weight_bytes, "read_gb_s": bandwidth_gb_s,
        "ours_decode_pct_bandwidth": 100 * median["ours_decode"] * weight_bytes / 1e9 / bandwidth_gb_s,
        "ref_decode_pct_bandwidth": 100 * median["ref_decode"] * weight_bytes / 1e9 / bandwidth_gb_s,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"median ratio (ondevice / llama.cpp speed): prefill {summary['prefill_ratio']:.2f}x, decode "
          f"{summary['decode_ratio']:.2f}x; decode reads {weight_bytes / 1e6:.0f} MB/token = "
          f"{summary['ours_decode_pct_bandwidth']:.0f}% (llama.cpp {summary['ref_decode_pct_bandwidth']:.0f}%) of "
          f"{bandwidth_gb_s:.1f} GB/s measured read bandwidth at {threads} threads")


if __name__ == "__main__":
    main()
