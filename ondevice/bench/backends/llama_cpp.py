"""llama.cpp through llama-cpp-python's high-level Llama object (what Python users of llama.cpp call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ondevice.bench.backends.base import GGUF, Backend, Prompt, TokenClock
from ondevice.errors import OndeviceError


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    artifact_kinds = frozenset({GGUF})
    returns_logits = True
    module = "llama_cpp"
    distribution = "llama-cpp-python"
    install_hint = "pip install llama-cpp-python"
    kv_cache_types = ("f16", "f32", "q8_0")
    GGML_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml type ids for type_k / type_v

    def __init__(self) -> None:
        self.llm: Any = None

    def load(self, artifact: Path, *, threads: int, n_ctx: int, logits: bool = False) -> None:
        import llama_cpp

        cache: dict[str, Any] = {}
        if self.kv_cache is not None:  # a quantized V cache needs flash attention in llama.cpp
            ggml_type = self.GGML_KV_TYPES[self.kv_cache]
            cache = {"type_k": ggml_type, "type_v": ggml_type, "flash_attn": self.kv_cache == "q8_0"}
        try:
            self.llm = llama_cpp.Llama(model_path=str(artifact), n_ctx=n_ctx, n_threads=threads,
                                       n_threads_batch=threads, logits_all=logits, verbose=False, **cache)
        except (ValueError, RuntimeError) as exc:
            raise OndeviceError(f"llama.cpp could not load {artifact}: {exc}") from None

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    def generate(self, prompt: Prompt, n_gen: int, clock: TokenClock) -> None:
        llm = self.llm
        llm.reset()  # forget the previous repeat's tokens, so the whole prompt is evaluated again
        # llama.cpp's generate() never stops by itself (end-of-text is the caller's business): exactly n_gen.
        stream = llm.generate(prompt.ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True)
        count = 0
        clock.start()
        for _token in stream:
            clock.tick()
            count += 1
            if count >= n_gen:
                break
        stream.close()

    def logits(self, tokens: list[int]) -> np.ndarray:
        llm = self.llm
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


BACKEND = LlamaCppBackend
