"""Run an MLX folder (`--to mlx`) the way users do: mlx_lm.load, the model's own KV cache, mlx-lm's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import MissingExtraError, OndeviceError
from ondevice.runners import ArtifactRunner


class MLXRunner(ArtifactRunner):
    """compute_dtype="float32" upcasts the floating parameters (norms, scales, biases; exact) after loading:
    mlx's CPU backend on x86 has no fast float16 path (SmolLM2-135M int4: ~10 s per token in float16, ~0.5 s
    in float32 here). The packed codes are untouched, so the quantized layers still run through mlx's kernels."""

    def __init__(self, folder: str | Path, *, compute_dtype: str | None = None) -> None:
        try:
            import mlx.core as mx
            from mlx_lm import load
            from mlx_lm.models.cache import make_prompt_cache
        except ImportError:
            raise MissingExtraError('running MLX artifacts needs mlx-lm: pip install "mlx-lm[cpu]" '
                                    "(on Linux) or mlx-lm (on macOS)") from None
        self._mx = mx
        self._make_cache = make_prompt_cache
        try:
            self.model, self.tokenizer = load(str(folder))
        except (OSError, ValueError, KeyError) as exc:
            raise OndeviceError(f"mlx-lm could not load {folder}: {exc}") from None
        if compute_dtype is not None:
            self.model.set_dtype(getattr(mx, compute_dtype))
        self.vocab_size = int(self.model.args.vocab_size)
        self.eos_ids = sorted(self.tokenizer.eos_token_ids)
        self._cache: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self._cache = self._make_cache(self.model)

    def forward(self, tokens: list[int]) -> np.ndarray:
        mx = self._mx
        logits = self.model(mx.array([tokens], dtype=mx.int32), cache=self._cache)
        logits = logits[0].astype(mx.float32)
        mx.eval(logits)
        return np.array(logits)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
