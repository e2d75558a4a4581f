"""Prefill (256-token prompt) and decode speed, ondevice vs llama-cpp-python, same file, same threads, one process,
alternating repeats.

    python benchmarks/runtime_vs_llama_cpp.py FILE.gguf THREADS [REPEATS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import llama_cpp

import ondevice

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    src, threads = sys.argv[1], int(sys.argv[2])
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    text = (ROOT / "ondevice" / "data" / "eval_text.txt").read_text()
    model = ondevice.load(src, threads=threads, n_ctx=512)
    prompt = model.tokenize(text)[:256]
    llm = llama_cpp.Llama(model_path=src, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          verbose=False)
    ratios = []
    for _ in range(repeats):
        model.reset()
        t = time.perf_counter()
        model._eval(prompt)
        ours_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(64):
            model._step(prompt[i % 50])
        ours_decode = time.perf_counter() - t
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        ref_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(64):
            llm.eval([prompt[i % 50]])
        ref_decode = time.perf_counter() - t
        ratios.append((ref_prefill / ours_prefill, ref_decode / ours_decode))
        print(f"threads {threads}: ondevice prefill {256 / ours_prefill:.0f} tok/s, decode {64 / ours_decode:.1f} "
              f"tok/s | llama.cpp prefill {256 / ref_prefill:.0f} tok/s, decode {64 / ref_decode:.1f} tok/s | "
              f"speed ratio prefill {ratios[-1][0]:.2f}x, decode {ratios[-1][1]:.2f}x")
    ratios.sort()
    mid = ratios[len(ratios) // 2]
    print(f"median ratio (ondevice / llama.cpp speed): prefill {mid[0]:.2f}x, decode {mid[1]:.2f}x")


if __name__ == "__main__":
    main()
