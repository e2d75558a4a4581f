"""Batched decoding of parallel requests (issue 15), measured side by side in one run on one GGUF:

1. API level, n_gen tokens per sequence (end-of-text banned, greedy), prefill included: ondevice's Batch with
   1 and 4 sequences vs llama.cpp's llama_batch/llama_decode with 1 and 4 seq_ids (llama-cpp-python low-level
   API), same prompt tokens, same threads. Aggregate completion tok/s and the 4-vs-1 ratio of each.
2. Server level: `ondevice serve --parallel 4` in-process, a lone streaming client vs 4 concurrent streaming
   clients (temperature 0, max_tokens n_gen): aggregate completion tok/s and each stream's time to first token.
3. Prompt cache: TTFT of a request whose ~300-token system prompt an earlier request already evaluated vs the
   first (cold) one.

    PYTHONPATH=. python benchmarks/serve_parallel.py [--model PATH] [--threads 2] [--n-gen 128] [--repeat 3]

Best of --repeat for each figure (the machine may be shared: compare the ratios, printed at the end as JSON).
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import ondevice
from ondevice.bench.backends.ondevice_runtime import EndOfTextBan
from ondevice.runtime.batch import Batch
from ondevice.server import Limits, create_server

QUESTIONS = ["Write a long story about a dragon who learns to cook.", "Explain how a CPU cache works, in detail.",
             "Describe a walk through a busy market in Marrakech.", "Tell me the history of the bicycle."]


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def ondevice_batch(model: Any, n_seq: int, n_gen: int, exact: bool = True) -> float:
    """Aggregate completion tok/s of n_seq sequences in one Batch (fresh slots: no prompt reuse). exact=False packs
    all rows in one pass (the tiled matrix-matrix path when more than exact_rows)."""
    batch = Batch(model, n_seq, exact=exact)
    start = time.perf_counter()
    seqs = [batch.submit(messages(QUESTIONS[i]), max_tokens=n_gen, temperature=0,
                         token_filter=EndOfTextBan(model.spec.vocab_size, set(model.codec.eos_ids))) for i in range(n_seq)]
    for _ in batch.run():
        pass
    elapsed = time.perf_counter() - start
    return sum(s.stats.generated_tokens for s in seqs) / elapsed


def _no_log(level: int, text: bytes, user_data: Any) -> None:
    pass


def _quiet_callback() -> Any:
    import llama_cpp as L

    return L.llama_log_callback(_no_log)


_QUIET: Any = None


def llama_cpp_batch(path: Path, prompts: list[list[int]], n_gen: int, threads: int) -> float:
    """The same with llama.cpp: each prompt prefilled as its own sequence, then one llama_decode per step holding
    one token of every sequence; greedy, end-of-text never chosen."""
    import llama_cpp as L

    global _QUIET
    _QUIET = _QUIET or _quiet_callback()  # kept alive: llama.cpp holds the pointer
    L.llama_log_set(_QUIET, None)  # its per-graph debug lines would be timed too
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    lmodel = L.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = L.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 2048, 512, 512
    cparams.n_seq_max, cparams.n_threads, cparams.n_threads_batch = max(1, len(prompts)), threads, threads
    ctx = L.llama_init_from_model(lmodel, cparams)
    vocab = L.llama_model_get_vocab(lmodel)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    eos = [L.llama_vocab_eos(vocab)]
    batch = L.llama_batch_init(512, 0, len(prompts))

    def decode(rows: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
        for i, (tok, pos, seq, want) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        batch.n_tokens = len(rows)
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(i: int) -> int:
        row = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float)),
                                    shape=(n_vocab,)).copy()
        row[eos] = -np.inf
        return int(row.argmax())

    try:
        start = time.perf_counter()
        last = []
        for seq, tokens in enumerate(prompts):
            decode([(t, p, seq, p == len(tokens) - 1) for p, t in enumerate(tokens)])
            last.append(greedy(len(tokens) - 1))
        positions = [len(t) for t in prompts]
        for _ in range(n_gen - 1):
            decode([(last[s], positions[s], s, True) for s in range(len(prompts))])
            last = [greedy(s) for s in range(len(prompts))]
            positions = [p + 1 for p in positions]
        elapsed = time.perf_counter() - start
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(lmodel)
    return len(prompts) * n_gen / elapsed


def stream(url: tuple[str, int], body: dict) -> tuple[float, int, float]:
    """(time to first content chunk, completion tokens, end time) of one streaming chat request."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(*url, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    ttft, tokens = 0.0, 0
    while True:
        line = resp.fp.readline()
        if not line:
            break
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if not ttft and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        elif line.startswith(b"data: [DONE]"):
            break
    conn.close()
    return ttft, tokens, time.perf_counter()


def server_streams(url: tuple[str, int], n_clients: int, n_gen: int) -> tuple[float, list[float]]:
    """Aggregate completion tok/s of n_clients concurrent streams, and their TTFTs."""
    results: list[Any] = [None] * n_clients
    bodies = [{"messages": messages(QUESTIONS[i % len(QUESTIONS)] + f" (take {time.time_ns()})"),
               "max_tokens": n_gen, "temperature": 0} for i in range(n_clients)]

    def one(i: int) -> None:
        results[i] = stream(url, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(r[2] for r in results)
    return sum(r[1] for r in results) / (end - start), [r[0] for r in results]


def prompt_cache_ttft(model: Any, url: tuple[str, int]) -> dict[str, float]:
    """TTFT of a request sharing a ~300-token system prompt with an earlier one vs the earlier (cold) one."""
    rules = " ".join(f"Rule {i}: answer politely, briefly and accurately about topic number {i}." for i in range(24))
    system = f"You are a helpful assistant for a hardware store. {rules}"
    n_system = len(model.tokenize(system))
    tag = str(time.time_ns())  # a system prompt no earlier run left in a slot
    cold = stream(url, {"messages": [{"role": "system", "content": tag + system},
                                     {"role": "user", "content": "Do you sell hammers?"}], "max_tokens": 4})[0]
    warm = stream(url, {"messages": [{"role": "system", "content": tag + system},
                                     {"role": "user", "content": "What time do you open?"}], "max_tokens": 4})[0]
    return {"system_prompt_tokens": n_system, "cold_ttft_s": cold, "warm_ttft_s": warm}


def main() -> None:
    from ondevice.hub import DEFAULT_MODEL, pull

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args()
    path = args.model or pull(DEFAULT_MODEL, quiet=True)
    model = ondevice.load(path, threads=args.threads, n_ctx=2048)
    out: dict[str, Any] = {"model": Path(path).name, "threads": args.threads, "n_gen": args.n_gen,
                           "exact_rows": model.transformer.exact_rows}
    configs = {"ondevice_api_1": lambda: ondevice_batch(model, 1, args.n_gen),
               "ondevice_api_4": lambda: ondevice_batch(model, 4, args.n_gen),
               "ondevice_api_4_one_pass": lambda: ondevice_batch(model, 4, args.n_gen, exact=False)}
    if not args.skip_llama_cpp:
        prompts = [model.prompt_tokens(messages(q)) for q in QUESTIONS]
        configs["llama_cpp_api_1"] = lambda: llama_cpp_batch(path, prompts[:1], args.n_gen, args.threads)
        configs["llama_cpp_api_4"] = lambda: llama_cpp_batch(path, prompts, args.n_gen, args.threads)
    for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every configuration alike
        for name, run in configs.items():
            out[name] = max(out.get(name, 0.0), run())
    server = create_server(model, "127.0.0.1", 0, parallel=4, limits=Limits(max_tokens=1024))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = server.server_address[:2]
        for _ in range(args.repeat):  # interleaved as above
            out["server_1"] = max(out.get("server_1", 0.0), server_streams(url, 1, args.n_gen)[0])
            tok_s, ttfts = server_streams(url, 4, args.n_gen)
            if tok_s > out.get("server_4", 0.0):
                out["server_4"], out["server_4_ttft_s"] = tok_s, sorted(round(t, 3) for t in ttfts)
        out["server_1_ttft_s"] = min(stream(url, {"messages": messages(QUESTIONS[0] + f" {i}"), "max_tokens": 2})[0]
                                     for i in range(args.repeat))
        caches = [prompt_cache_ttft(model, url) for _ in range(args.repeat)]
        out["prompt_cache"] = min(caches, key=lambda c: c["warm_ttft_s"])
    finally:
        server.close()
    out["ratio_ondevice_api_4_vs_1"] = out["ondevice_api_4"] / out["ondevice_api_1"]
    out["ratio_server_4_vs_1"] = out["server_4"] / out["server_1"]
    if "llama_cpp_api_4" in out:
        out["ratio_llama_cpp_api_4_vs_1"] = out["llama_cpp_api_4"] / out["llama_cpp_api_1"]
        out["ratio_ondevice_vs_llama_cpp_4"] = out["ondevice_api_4"] / out["llama_cpp_api_4"]
    cache = out["prompt_cache"]
    out["ratio_prompt_cache_ttft"] = cache["cold_ttft_s"] / cache["warm_ttft_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
