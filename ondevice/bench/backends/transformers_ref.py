"""Hugging Face transformers on CPU (float32): the reference that `ondevice eval --ref` compares against when the
reference is a Hugging Face folder; it also benchmarks such a folder like any other backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ondevice.bench.backends.base import HF, Backend, Prompt, TokenClock


class TransformersBackend(Backend):
    name = "transformers"
    artifact_kinds = frozenset({HF})
    returns_logits = True
    module = "transformers"
    distribution = "transformers"
    install_hint = "pip install transformers (and torch)"
    kv_bytes_per_element = 4  # float32 model, float32 cache

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None

    def import_runtime(self) -> None:
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(artifact)
        self.model = AutoModelForCausalLM.from_pretrained(artifact, torch_dtype=torch.float32).eval()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        import torch

        with torch.inference_mode():
            clock.start()
            out = self.model(torch.tensor([prompt.ids]), use_cache=True)
            for step in range(n_gen):
                token = int(out.logits[0, -1].argmax())
                clock.tick()
                if step + 1 == n_gen:
                    break
                out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)

    def logits(self, tokens: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.tensor([list(tokens)])).logits[0].float().numpy()

    def close(self) -> None:
        self.model = None
        self.tokenizer = None


BACKEND = TransformersBackend
