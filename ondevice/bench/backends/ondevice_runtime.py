"""ondevice's own runtime (C kernels), through its public API: ondevice.load(), generate(), logits()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ondevice.bench.backends.base import GGUF, Backend, Prompt, TokenClock
from ondevice.errors import OndeviceError
from ondevice.runtime.kv import DEFAULT_KV_CACHE, KV_CACHE_DTYPES, kv_element_bytes


class EndOfTextBan:
    """A generate() token filter that forbids end-of-text (so exactly n tokens are generated, as llama-bench
    does) and ticks the harness clock, if given, as each token is sampled."""

    def __init__(self, vocab_size: int, eos_ids: set[int], clock: TokenClock | None = None) -> None:
        self.mask = np.ones(vocab_size, dtype=bool)
        self.mask[list(eos_ids)] = False
        self.tick = clock.tick if clock is not None else None

    def allowed(self, *_: Any) -> np.ndarray:
        return self.mask

    def accept(self, token: int) -> None:
        if self.tick is not None:
            self.tick()

    def is_finished(self) -> bool:
        return False


class OndeviceBackend(Backend):
    name = "ondevice"
    artifact_kinds = frozenset({GGUF})
    returns_logits = True
    module = "ondevice._kernels"
    distribution = "ondevice"
    install_hint = "the C extension is built by `pip install -e .`"
    kv_bytes_per_element = kv_element_bytes(DEFAULT_KV_CACHE)  # what load() keeps by default (f16)
    kv_cache_types = tuple(KV_CACHE_DTYPES)

    def __init__(self) -> None:
        self.model: Any = None

    @classmethod
    def version(cls) -> str | None:
        from ondevice import __version__

        return __version__

    def import_runtime(self) -> None:
        import ondevice._kernels  # noqa: F401
        import ondevice.runtime.model  # noqa: F401

    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        import ondevice

        self.model = ondevice.load(artifact, threads=threads, n_ctx=n_ctx, kv_cache=self.kv_cache)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.model.detokenize(ids)

    @property
    def vocab_size(self) -> int:
        return int(self.model.spec.vocab_size)

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        model = self.model
        ban = EndOfTextBan(self.vocab_size, set(model.codec.eos_ids), clock)
        model.reset()  # no prefix reuse between repeats: every repeat prefills the whole prompt
        clock.start()
        # Plain greedy, as every backend decodes in a bench (no repeat penalty: llama.cpp's runs without one).
        for _ in model.generate(prompt.text, max_tokens=n_gen, temperature=0.0, repeat_penalty=1.0,
                                token_filter=ban):
            pass
        stats = model.last_stats
        if stats.prompt_tokens != len(prompt.ids) or stats.generated_tokens != n_gen:
            raise OndeviceError(f"ondevice runtime evaluated {stats.prompt_tokens} prompt tokens and generated "
                                f"{stats.generated_tokens} (wanted {len(prompt.ids)} and {n_gen})")

    def logits(self, tokens: list[int]) -> np.ndarray:
        return np.asarray(self.model.logits(list(tokens)), dtype=np.float32)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None


BACKEND = OndeviceBackend
