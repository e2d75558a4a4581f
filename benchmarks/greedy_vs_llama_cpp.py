"""Greedy 64-token chat replies of ondevice vs llama.cpp on the same GGUF; each divergence with its top-2 gap.

    python benchmarks/greedy_vs_llama_cpp.py [FILE.gguf]     (default: the bundled SmolLM2 Q4_1)

Also the baseline of how much llama.cpp agrees with itself: the same file with the prompt evaluated one token
at a time (n_batch=1) instead of in one batch changes only the float summation order of attention, yet with
8-bit activations such differences are amplified by rounding flips, layer after layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    import llama_cpp
    from test_runtime import PROMPTS

    import ondevice
    from ondevice.hub import resolve_model

    path = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    llm_one = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_batch=1, n_ubatch=1, verbose=False)
    model = ondevice.load(path, n_ctx=512)
    eos = model.codec.eos_ids
    diverged = self_diverged = 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        tokens = model.prompt_tokens(messages)
        list(model.generate(messages, max_tokens=64, temperature=0))
        ours = [t for t in model.last_stats.tokens if t not in eos]
        theirs = greedy(llm, tokens, eos)
        if greedy(llm_one, tokens, eos) != theirs:
            self_diverged += 1
            print(f"llama.cpp n_batch=1 vs default: diverged on {prompt!r}")
        if ours == theirs:
            print(f"identical  {prompt!r}")
            continue
        diverged += 1
        at = next(i for i, (a, b) in enumerate(zip(ours + [-1], theirs + [-1], strict=False)) if a != b)
        logits = model.logits(tokens + theirs[:at])[-1]
        top = np.sort(logits)
        print(f"diverged   {prompt!r} at token {at}: top-2 gap {top[-1] - top[-2]:.3f} "
              f"({(top[-1] - top[-2]) / logits.std():.1%} of the logit std)")
    print(f"{diverged} of {len(PROMPTS)} replies diverged from llama.cpp; "
          f"llama.cpp itself (n_batch=1 vs default): {self_diverged} of {len(PROMPTS)}")


def greedy(llm, tokens: list[int], eos: set[int], n: int = 64) -> list[int]:
    out: list[int] = []
    for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if t in eos or len(out) >= n:
            break
        out.append(t)
    return out


if __name__ == "__main__":
    main()
