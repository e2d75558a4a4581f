"""The empty backend: no model, every token is available instantly. What it measures is the harness's own
cost (the timing loop, the clock, the worker protocol), to check it is negligible next to a real decode.
Not part of the default backend set; ask for it with `--backend null`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ondevice.bench.backends.base import ARTIFACT_KINDS, Backend, Prompt, TokenClock


class NullBackend(Backend):
    name = "null"
    artifact_kinds = frozenset(ARTIFACT_KINDS)
    listed = False

    @classmethod
    def version(cls) -> str | None:
        from ondevice import __version__

        return __version__

    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        pass

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))  # one token per byte

    def detokenize(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return 256

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        # The same loop shape as the real adapters (a token stream, a tick and a count per token).
        count = 0
        clock.start()
        for _token in _instant_tokens():
            clock.tick()
            count += 1
            if count >= n_gen:
                break


def _instant_tokens() -> Iterator[int]:
    while True:
        yield 0


BACKEND = NullBackend
