"""Token sampling: logit bias, repetition penalty, temperature, top-k, top-p, min-p (llama.cpp's order), greedy at
temp 0."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ondevice.errors import OndeviceError


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling every surface uses when the caller names none: the Python API, `ondevice run`/`chat`, the
    server's requests, its web pages (via /web-config.json) and app-bundle manifests. Change them only here.

    Chosen on the bundled SmolLM2-135M-Instruct (Q4_1): its model card samples at temperature 0.2, top_p 0.9;
    greedy decoding answers "What is the capital of France?" with a French list, and llama.cpp's 0.8 says
    Paris in only 7 of 10 seeds; 0.2 with a mild repeat penalty says it in 38 of 40 (tests/test_sampling_defaults.py).
    """

    max_tokens: int = 256
    temperature: float = 0.2
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.05
    repeat_penalty: float = 1.1

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


DEFAULTS = SamplingDefaults()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    min_p: float = DEFAULTS.min_p
    repeat_penalty: float = DEFAULTS.repeat_penalty
    repeat_last_n: int = 64
    seed: int | None = None
    # (token id, bias) pairs added to the logits first, OpenAI's logit_bias: -100 bans a token, +100 all but forces it
    logit_bias: tuple[tuple[int, float], ...] = ()

    def validate(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise OndeviceError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise OndeviceError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OndeviceError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise OndeviceError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repeat_penalty > 0:
            raise OndeviceError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        for token, bias in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise OndeviceError(f"logit_bias: token ids must be integers >= 0, got {token!r}")
            if isinstance(bias, bool) or not (isinstance(bias, (int, float)) and -100 <= bias <= 100):
                raise OndeviceError(f"logit_bias: a bias must be a number in [-100, 100], got {bias!r} for {token}")


BAN = -100.0  # OpenAI's "ban": the token is never sampled, not merely unlikely


def logit_bias_pairs(logit_bias: dict | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{token id (int or its decimal string): bias} as SamplingParams holds it, ids checked against the vocabulary."""
    if not logit_bias:
        return ()
    if not isinstance(logit_bias, dict):
        raise OndeviceError("logit_bias must be a mapping of token id to bias")
    pairs = []
    for key, bias in logit_bias.items():
        token = int(key) if isinstance(key, str) and key.isdecimal() else key
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise OndeviceError(f"logit_bias: {str(key)[:40]!r} is not a token id of this model (0..{vocab_size - 1})")
        pairs.append((token, bias))
    return tuple(pairs)


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        # logit_bias as arrays once, not a Python loop per sampled token
        self._bias_ids = np.array([t for t, b in params.logit_bias if b > BAN], dtype=np.int64)
        self._bias_values = np.array([b for _, b in params.logit_bias if b > BAN], dtype=np.float32)
        self._banned = np.array([t for t, b in params.logit_bias if b <= BAN], dtype=np.int64)

    def sample(self, logits: np.ndarray, history: list[int], allowed: np.ndarray | None = None) -> int:
        """Pick the next token. `allowed` is an optional boolean mask (structured output)."""
        p = self.params
        logits = logits.astype(np.float32, copy=True)
        if p.logit_bias:
            np.add.at(logits, self._bias_ids, self._bias_values)  # add.at: an id given twice gets both biases
            logits[self._banned] = -np.inf
        if allowed is not None:
            logits[~allowed] = -np.inf
        if p.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        candidates = np.flatnonzero(np.isfinite(logits))
        if candidates.size == 0:
            raise OndeviceError("no token is allowed at this step")
        scores = logits[candidates]
        if p.top_k and p.top_k < candidates.size:
            keep = np.argpartition(-scores, p.top_k - 1)[: p.top_k]
            candidates, scores = candidates[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")
        candidates, scores = candidates[order], scores[order]
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            candidates, scores = candidates[:cut], scores[:cut]
        if p.min_p > 0:
            keep = np.exp(scores - scores[0]) >= p.min_p
            candidates, scores = candidates[keep], scores[keep]
        scaled = (scores - scores[0]) / p.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        return int(self.rng.choice(candidates, p=probs))
