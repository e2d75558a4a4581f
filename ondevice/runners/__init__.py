"""Small adapters that run converted artifacts in their own runtimes (mlx / mlx-lm, onnxruntime).

They exist to prove the artifacts work where users run them (tests) and to time them (bench). Each runner keeps
a KV cache: `forward(tokens)` appends tokens and returns their logits, `reset()` empties the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import numpy as np


class ArtifactRunner(ABC):
    vocab_size: int

    @abstractmethod
    def reset(self) -> None:
        """Forget the cached tokens."""

    @abstractmethod
    def forward(self, tokens: list[int]) -> np.ndarray:
        """Run `tokens` after the cached ones; (len(tokens), vocab) float32 logits. The cache grows by them."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids for a chat, rendered with the artifact's chat template (generation prompt added)."""

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) float32 logits of every position, from an empty cache."""
        self.reset()
        return self.forward(list(tokens))

    def greedy(self, prompt: list[int], n: int, *, stop_ids: Iterable[int] = (),
               on_token: Callable[[int], None] | None = None) -> list[int]:
        """Greedy continuation of `prompt` (one prefill, then one cached step per token), at most n tokens;
        stops after a token in stop_ids (which is included)."""
        stop = set(stop_ids)
        self.reset()
        last = self.forward(list(prompt))[-1]
        out: list[int] = []
        while len(out) < n:
            token = int(np.argmax(last))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or len(out) == n:
                break
            last = self.forward([token])[-1]
        return out

    def close(self) -> None:  # noqa: B027 (optional hook: most runtimes free everything on garbage collection)
        """Release the runtime's resources."""

    def __enter__(self) -> ArtifactRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
