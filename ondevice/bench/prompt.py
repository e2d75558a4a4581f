"""Benchmark prompts of an exact token count, cut from the bundled public-domain text."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ondevice.bench.backends.base import Backend, Prompt
from ondevice.errors import OndeviceError

EVAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "eval_text.txt"


@lru_cache(maxsize=1)
def bundled_text() -> str:
    return EVAL_TEXT.read_text(encoding="utf-8")


def exact_prompt(backend: Backend, n_tokens: int, text: str | None = None) -> Prompt:
    """A prefix of the bundled text that the backend's tokenizer turns into exactly n_tokens ids (its BOS, if
    it adds one, included). Cutting at a token boundary and re-tokenizing can merge or split a token, so the
    cut is nudged until the count is exact."""
    text = text or bundled_text()
    specials = len(backend.tokenize(""))  # what the tokenizer adds to any text (a BOS)
    want = n_tokens - specials
    if want < 1:
        raise OndeviceError(f"a prompt of {n_tokens} tokens is too short: the tokenizer adds {specials} by itself")
    body = backend.tokenize(text)[specials:]
    source = text
    while len(body) < want + 8:  # long prompts: the text again, as many times as needed
        source += "\n\n" + text
        body = backend.tokenize(source)[specials:]
    cut = want
    tried: set[int] = set()
    for _ in range(64):
        tried.add(cut)
        candidate = backend.detokenize(body[:cut])
        ids = backend.tokenize(candidate)
        if len(ids) == n_tokens:
            return Prompt(text=candidate, ids=ids)
        step = n_tokens - len(ids)
        cut = max(1, cut + step)
        if cut in tried:  # oscillating around a merge: walk away from it one token at a time
            cut = max(1, min(tried) - 1) if step < 0 else max(tried) + 1
        if cut > len(body):
            break
    raise OndeviceError(f"could not cut the bundled text into a prompt of exactly {n_tokens} tokens")
