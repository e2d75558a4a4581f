"""Prompt-lookup drafting for speculative decoding (no second model).

Extraction, rewriting and summarizing replies copy long runs of the prompt. `PromptLookup.draft` finds the most
recent earlier occurrence of the last n tokens of the history (n from `max_ngram` down to `min_ngram`) and
proposes the tokens that followed it. With structured output (json_schema, tools), the tokens the grammar forces
next (keys, separators, the closing at the token limit) are drafted first (`TokenFilter.forced_tokens`). The runtime then evaluates the pending token and the draft in one forward pass
(`LanguageModel._decode_loop`), samples every row with the same sampler as plain decoding, keeps the rows while
the sampled token equals the drafted one, and rolls the KV cache back over the rest.

Why the output is the same as plain decoding, at every temperature: each emitted token is sampled once, in order,
from logits that are bit-identical to a single-token step (the runtime verifies at most `exact_rows` tokens per
pass: up to that many rows, the C kernels give every row the bits of a one-row call, the OD_MATMUL_EXACT_ROWS
contract), with the same history and the same random stream. A draft only decides how many of those logits one
pass computes.
"""

from __future__ import annotations

# off: plain decoding; grammar: draft only what a schema/tool grammar forces (no effect without one);
# lookup: that, then prompt lookup; draft: that, then a draft model's greedy tokens (load(..., draft=...))
SPECULATE_MODES = ("off", "grammar", "lookup", "draft")
# On where it pays, measured (docs/BENCHMARKS.md §11): grammar drafts are accepted ~95% of the time and sped up
# every structured reply measured (issue extraction, tool calls); prompt lookup pays only on replies that copy.
DEFAULT_SPECULATE = "grammar"


def check_speculate(mode: str | None) -> str:
    """A speculation mode (None: DEFAULT_SPECULATE); anything else is an error (one line)."""
    from ondevice.errors import OndeviceError

    if mode is None:
        return DEFAULT_SPECULATE
    if mode not in SPECULATE_MODES:
        raise OndeviceError(f"speculate must be one of {', '.join(SPECULATE_MODES)}; got {str(mode)[:40]!r}")
    return mode


def model_draft(draft_model: object, history: list[int], k: int) -> list[int]:
    """Up to k greedy tokens of a smaller (or differently quantized) model with the same vocabulary. Its KV cache
    follows the history by prefix reuse, so each call evaluates only what was accepted since the last one."""
    import numpy as np

    if k <= 0 or len(history) + k > draft_model.n_ctx:
        return []
    logits, _ = draft_model._eval(history)
    out: list[int] = []
    for i in range(k):
        token = int(np.argmax(logits))
        if token in draft_model.codec.eos_ids:
            break
        out.append(token)
        if i + 1 < k:
            logits = draft_model._step(token)
    return out


class PromptLookup:
    """Drafts by n-gram lookup over a growing token history (the prompt, then every accepted token).

    A match of a single token is too weak a hint to pay for the rows it adds to a pass (measured on the rewrite
    task: min_ngram 2 beats 1), so by default n >= 2.

    An index maps each n-gram (n = min_ngram..max_ngram) to where it last ended, so a draft costs O(max_ngram)
    whatever the history length. The index lags the history by one token, so the history's own tail is never
    its own match.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._last_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending at positions <= this are indexed

    def _sync(self, history: list[int]) -> None:
        for end in range(self._indexed + 1, len(history)):  # every end position but the last
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._last_end[tuple(history[end - n:end])] = end
        self._indexed = max(self._indexed, len(history) - 1)

    def draft(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the history's last n tokens, longest n
        first; [] when nothing matches."""
        if k <= 0 or len(history) < 2:
            return []
        self._sync(history)
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            end = self._last_end.get(tuple(history[-n:]))
            if end is not None:
                return history[end:end + k]
        return []


class DraftLength:
    """How many tokens prompt lookup or a draft model guesses per pass. A rejected guess costs a verification row
    (compute-bound on small models) and, with a draft model, its steps; so the length follows what was accepted:
    all of the last guess accepted -> two more next time (up to the pass's limit), a rejection -> one more than the
    accepted prefix."""

    def __init__(self, limit: int, start: int = 2) -> None:
        self.limit = limit
        self.length = min(start, limit)
        self._guessed = 0
        self._accepted = 0

    def drafted(self, drafts: list[int]) -> list[int]:
        self._guessed, self._accepted = len(drafts), 0
        return drafts

    def accepted(self) -> None:
        self._accepted += 1

    def next(self) -> int:
        """The length of the next guess, from how the last one fared."""
        if self._guessed:
            full = self._accepted >= self._guessed
            self.length = min(self.limit, self.length + 2) if full else max(1, self._accepted + 1)
            self._guessed = 0
        return self.length
