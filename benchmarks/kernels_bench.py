"""Micro-benchmark of ondevice._kernels.matmul on the SmolLM2-135M shapes.

Reports, per weight type, shape (N x K), batch M and thread count: time per call, effective weight
bandwidth (weight bytes / time) and GFLOP/s (2*M*N*K / time).

For M=1 (decode) two numbers are given: "hot" re-reads one weight matrix, which then sits in L2/L3;
"cold" cycles through enough copies (> 96 MB) that every call streams its weights from DRAM, as a
real decode step does with a whole model. M=256 (prefill) is compute-bound, so only hot is shown.

    python benchmarks/kernels_bench.py                       # everything (a few minutes)
    python benchmarks/kernels_bench.py --types Q4_1 Q8_0 --m 1 --threads 2
    python benchmarks/kernels_bench.py --overhead            # per-call binding overhead only
    python benchmarks/kernels_bench.py --act-experiment      # q8 activations vs f32 dequant-dot (M=1)
    python benchmarks/kernels_bench.py --model-sim           # SmolLM2-135M-shaped decode/prefill step
    python benchmarks/kernels_bench.py --model-sim --llama-gguf SmolLM2-135M-Instruct.Q4_1.gguf
        # ... interleaved with llama-cpp-python on the real file, same threads (same machine state)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
import timeit

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from ondevice import _kernels as K

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N rows, K) of W
TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "Q4_0_X8", "Q4_K_X8", "Q4_1_X8", "Q8_0_X8", "Q6_K_X8"]
# the load-time repacked layouts (what the runtime multiplies Q4_0 / Q4_K with on AVX2)
REPACKED = {"Q4_0_X8": "Q4_0", "Q4_K_X8": "Q4_K", "Q4_1_X8": "Q4_1", "Q8_0_X8": "Q8_0", "Q6_K_X8": "Q6_K"}
COLD_BYTES = 96 << 20


def type_id(type_name: str) -> int:
    return int(getattr(K, type_name)) if type_name in REPACKED else int(QT[type_name])


def make_weights(type_name: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if type_name in REPACKED:
        base = make_weights(REPACKED[type_name], n, k, rng)
        packed = np.empty((n, K.row_nbytes(type_id(type_name), k)), np.uint8)
        K.repack(packed, base.reshape(n, -1), int(QT[REPACKED[type_name]]), k)
        return packed
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
    qtype = type_id(type_name)
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


# The alternative to quantizing activations: dequantize each Q4_1 block to f32 and FMA it with f32
# activations. Compiled here (not part of the library) and timed in C against the library's own
# od_matmul, single thread, thread CPU time, 4 weight rows in flight in both.
F32ACT_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void gemv_q4_1_f32act(float *out, const uint8_t *w, const float *x, int64_t n, int64_t k, float *xsum) {
    const int64_t nb = k / 32;
    for (int64_t b = 0; b < nb; b++) {
        float s = 0;
        for (int i = 0; i < 32; i++) s += x[32 * b + i];
        xsum[b] = s;
    }
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int64_t r = 0; r < n; r += 4) {
        __m256 acc[4];
        float off[4] = {0, 0, 0, 0};
        for (int i = 0; i < 4; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const __m256 x0 = _mm256_loadu_ps(x + 32 * b), x1 = _mm256_loadu_ps(x + 32 * b + 8);
            const __m256 x2 = _mm256_loadu_ps(x + 32 * b + 16), x3 = _mm256_loadu_ps(x + 32 * b + 24);
            for (int i = 0; i < 4; i++) {
                const uint8_t *blk = w + ((r + i) * nb + b) * 20;
                const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(*(const int *)blk));
                const __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
                const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
                __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), x0);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), x1, t);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), x2, t);
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), x3, t);
                acc[i] = _mm256_fmadd_ps(t, _mm256_broadcastss_ps(dm), acc[i]);
                off[i] += _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)) * xsum[b];
            }
        }
        for (int i = 0; i < 4; i++) out[r + i] = hsum(acc[i]) + off[i];
    }
}

typedef int (*matmul_fn)(float *, const void *, int, const float *, int64_t, int64_t, int64_t, int);

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* seconds per call; variant 0 = library (q8 activations), 1 = f32 dequant-dot */
double time_variant(int variant, matmul_fn lib, const uint8_t **copies, int n_copies, const float *x, float *out,
                    int64_t n, int64_t k, int reps) {
    float *xsum = malloc(sizeof(float) * (k / 32));
    double best = 1e30;
    for (int trial = 0; trial < 5; trial++) {
        const double t0 = cpu_now();
        for (int i = 0; i < reps; i++) {
            const uint8_t *w = copies[i % n_copies];
            if (variant == 0) lib(out, w, 3, x, 1, n, k, 0);
            else gemv_q4_1_f32act(out, w, x, n, k, xsum);
        }
        const double dt = (cpu_now() - t0) / reps;
        best = dt < best ? dt : best;
    }
    free(xsum);
    return best;
}
"""


def activation_experiment() -> None:
    """Q4_1 GEMV (M=1, 1 thread): q8 activations + integer dots vs f32 dequantize-and-FMA."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib_path = os.path.join(tmp, "f32act.c"), os.path.join(tmp, "f32act.so")
        with open(src, "w") as f:
            f.write(F32ACT_SOURCE)
        subprocess.run(["gcc", "-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC", src, "-o", lib_path], check=True)
        exp = ctypes.CDLL(lib_path)
        kernels = ctypes.CDLL(K.__file__)
        exp.time_variant.restype = ctypes.c_double
        exp.time_variant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        matmul_ptr = ctypes.cast(kernels.od_matmul, ctypes.c_void_p)
        K.set_threads(1)
        rng = np.random.default_rng(0)
        print("activation format experiment, Q4_1, M=1, 1 thread (GB/s of weights; higher is better)")
        for n, k in [(576, 576), (1536, 576), (576, 1536)]:
            w = make_weights("Q4_1", n, k, rng)
            x = rng.standard_normal(k).astype(np.float32)
            out = np.empty(n, np.float32)
            check = np.empty(n, np.float32)
            for cold in (False, True):
                copies = [w] + ([w.copy() for _ in range(COLD_BYTES // w.nbytes)] if cold else [])
                ptrs = (ctypes.c_void_p * len(copies))(*[c.ctypes.data for c in copies])
                reps = max(len(copies), 2000 if not cold else len(copies))
                rates = []
                for variant in (0, 1):
                    dest = out if variant == 0 else check
                    seconds = exp.time_variant(variant, matmul_ptr, ptrs, len(copies), x.ctypes.data, dest.ctypes.data,
                                               n, k, reps)
                    rates.append(w.nbytes / seconds / 1e9)
                assert np.allclose(out, check, rtol=2e-2, atol=2e-2 * np.abs(check).max())
                print(f"  {n:>5}x{k:<5} {'cold' if cold else 'hot ':4}  q8-activations {rates[0]:6.2f} GB/s   "
                      f"f32-dequant {rates[1]:6.2f} GB/s")


def model_simulation(threads_list: list[int], llama_gguf: str | None = None) -> None:
    """Kernel-only tok/s ceiling: SmolLM2-135M shapes (Q4_1 layers, Q8_0 tied embedding/output), the
    call sequence of a llama decoder step with numpy glue as thin as a runtime's. Random weights."""
    rng = np.random.default_rng(0)
    d_model, n_head, n_kv, head_dim, ffn, vocab, n_layer, ctx = 576, 9, 3, 64, 1536, 49152, 30, 1024
    q41, q80 = int(QT.Q4_1), int(QT.Q8_0)
    proto = {name: make_weights("Q4_1", n, k, rng) for name, (n, k) in {
        "wq": (576, 576), "wk": (192, 576), "wv": (192, 576), "wo": (576, 576),
        "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}.items()}
    layers = [{name: w.copy() for name, w in proto.items()} for _ in range(n_layer)]  # distinct memory, like a model
    embd = make_weights("Q8_0", vocab, d_model, rng)
    norm = np.ones(d_model, np.float32)
    k_cache = np.zeros((n_layer, n_kv, ctx, head_dim), np.float32)
    v_cache = np.zeros_like(k_cache)
    total = sum(w.nbytes for layer in layers for w in layer.values()) + embd.nbytes
    print(f"model-sim: {total / 1e6:.0f} MB of weights, {n_layer} layers")

    def step(tokens: np.ndarray, pos0: int, last_only: bool) -> int:
        m = len(tokens)
        x = np.empty((m, d_model), np.float32)
        h = np.empty_like(x)
        q = np.empty((m, n_head * head_dim), np.float32)
        kk = np.empty((m, n_kv * head_dim), np.float32)
        vv = np.empty_like(kk)
        attn = np.empty_like(q)
        gate = np.empty((m, ffn), np.float32)
        up = np.empty_like(gate)
        pos = np.arange(pos0, pos0 + m, dtype=np.int32)
        K.get_rows(x, embd, q80, tokens, d_model)
        for li, layer in enumerate(layers):
            K.rmsnorm(h, x, norm, 1e-5)
            K.matmul(q, layer["wq"], q41, h, d_model)
            K.matmul(kk, layer["wk"], q41, h, d_model)
            K.matmul(vv, layer["wv"], q41, h, d_model)
            q3, k3 = q.reshape(m, n_head, head_dim), kk.reshape(m, n_kv, head_dim)
            K.rope(q3, pos, 100000.0, False)
            K.rope(k3, pos, 100000.0, False)
            k_cache[li, :, pos0 : pos0 + m] = k3.transpose(1, 0, 2)
            v_cache[li, :, pos0 : pos0 + m] = vv.reshape(m, n_kv, head_dim).transpose(1, 0, 2)
            K.attention(attn, q3, k_cache[li], v_cache[li], pos0, 0.125)
            K.matmul(x, layer["wo"], q41, attn, d_model, True)
            K.rmsnorm(h, x, norm, 1e-5)
            K.matmul(gate, layer["gate"], q41, h, d_model)
            K.matmul(up, layer["up"], q41, h, d_model)
            K.silu_mul(gate, gate, up)
            K.matmul(x, layer["down"], q41, gate, ffn, True)
        rows = h[m - 1 :] if last_only else h
        K.rmsnorm(rows, x[m - 1 :] if last_only else x, norm, 1e-5)
        logits = np.empty((len(rows), vocab), np.float32)
        K.matmul(logits, embd, q80, rows, d_model)
        return K.argmax(logits[-1])

    def run_ours(threads: int) -> tuple[float, list[float]]:
        K.set_threads(threads)
        prompt = rng.integers(0, vocab, 256).astype(np.int32)
        step(prompt[:8], 0, True)  # warm-up
        best_prefill = 1e9
        for _ in range(3):
            start = time.perf_counter()
            token = step(prompt, 0, True)
            best_prefill = min(best_prefill, time.perf_counter() - start)
        times = []
        for i in range(64):
            start = time.perf_counter()
            token = step(np.array([token], np.int32), 256 + i, True)
            times.append(time.perf_counter() - start)
        return best_prefill, times

    def report(name: str, threads: int, prefill: float, times: list[float]) -> None:
        median = float(np.median(times))
        print(f"  {name:9} threads={threads}: prefill 256 tokens {prefill * 1e3:5.0f} ms = {256 / prefill:4.0f} tok/s; "
              f"decode at pos 256-320: median {median * 1e3:6.2f} ms = {1 / median:5.1f} tok/s (best {1 / min(times):5.1f})",
              flush=True)

    for threads in threads_list:
        for _round in range(2 if llama_gguf else 1):
            prefill, times = run_ours(threads)
            report("kernels", threads, prefill, times)
            if llama_gguf:
                prefill, times = run_llama_cpp(llama_gguf, threads, rng)
                report("llama.cpp", threads, prefill, times)


def run_llama_cpp(path: str, threads: int, rng: np.random.Generator) -> tuple[float, list[float]]:
    """Same measurement with llama-cpp-python on a real GGUF: 256-token prompt (best of 3), then 64
    single-token evals (logits of the last token only, like the simulation; no sampling, where the
    simulation adds an argmax of ~0.05 ms)."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=256, verbose=False)
    prompt = [int(t) for t in rng.integers(3, llm.n_vocab(), 256)]
    best_prefill = 1e9
    for _ in range(3):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        best_prefill = min(best_prefill, time.perf_counter() - start)
    times = []
    for token in rng.integers(3, llm.n_vocab(), 64):  # the token value does not change the cost
        start = time.perf_counter()
        llm.eval([int(token)])
        times.append(time.perf_counter() - start)
    del llm
    return best_prefill, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--m", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=None, help="NxK, e.g. 576x1536")
    parser.add_argument("--overhead", action="store_true", help="only measure per-call overhead")
    parser.add_argument("--no-cold", action="store_true", help="skip the DRAM-streaming M=1 runs")
    parser.add_argument("--act-experiment", action="store_true", help="q8 activations vs f32 dequant-dot")
    parser.add_argument("--model-sim", action="store_true", help="SmolLM2-135M-shaped decode and prefill")
    parser.add_argument("--llama-gguf", default=None, help="with --model-sim: also time llama-cpp-python on this file")
    args = parser.parse_args()
    if args.model_sim:
        model_simulation(args.threads, args.llama_gguf)
        return
    if args.act_experiment:
        activation_experiment()
        return
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
            if type_name in ("Q4_K", "Q6_K", "Q4_K_X8") and k % 256:
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
