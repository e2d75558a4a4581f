"""MLX folders (`--to mlx`) through mlx-lm, as its users run them: mlx_lm.load, then mlx_lm's generate_step (its
prefill, its KV cache, greedy sampling) for speed, and the model's forward pass for logits.

On a CPU without a fast float16 path (mlx's CPU backend on x86), the floating parameters are upcast to float32
after loading (ondevice.runners.mlx_runner explains why); the packed quantized codes are left as they are. mlx has
no thread-count setting: `--threads` is recorded, not applied."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from ondevice.bench.backends.base import MLX, ArtifactRunnerBackend, Prompt, TokenClock
from ondevice.runners import ArtifactRunner


def cpu_compute_dtype() -> str | None:
    """float32 where mlx computes on a CPU without fast float16 (everything but Apple Silicon), else None."""
    return None if sys.platform == "darwin" and platform.machine() == "arm64" else "float32"


class MLXBackend(ArtifactRunnerBackend):
    name = "mlx"
    artifact_kinds = frozenset({MLX})
    returns_logits = True
    module = "mlx_lm"
    distribution = "mlx-lm"
    install_hint = "pip install 'mlx-lm[cpu]' (Linux) or mlx-lm (macOS)"

    @classmethod
    def version(cls) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"mlx-lm {version('mlx-lm')} / mlx {version('mlx')}"
        except PackageNotFoundError:
            return None

    def import_runtime(self) -> None:
        import mlx.core  # noqa: F401
        import mlx_lm.generate  # noqa: F401

    def open_runner(self, artifact: Path, *, threads: int, n_ctx: int) -> ArtifactRunner:
        from ondevice.runners.mlx_runner import MLXRunner

        return MLXRunner(artifact, compute_dtype=cpu_compute_dtype())

    def tokenize(self, text: str) -> list[int]:
        # mlx-lm's own encode (special tokens as the tokenizer adds them), what mlx_lm.generate feeds the model.
        tokenizer: Any = self._loaded().tokenizer  # type: ignore[attr-defined]
        return list(tokenizer.encode(text))

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        model: Any = self._loaded().model  # type: ignore[attr-defined]
        # generate_step makes a fresh KV cache, never stops at end-of-text, and is greedy without a sampler.
        steps = generate_step(mx.array(prompt.ids, dtype=mx.int32), model, max_tokens=n_gen)
        clock.start()
        for _token, _logprobs in steps:
            clock.tick()


BACKEND = MLXBackend
