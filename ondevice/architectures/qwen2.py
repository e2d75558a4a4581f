"""Qwen2ForCausalLM: q/k/v biases and NEOX (rotate-half) RoPE, so q/k rows keep the HF order in GGUF."""

from __future__ import annotations

from typing import Any

from ondevice.architectures.base import DecoderArchitecture
from ondevice.model import ModelSpec


class Qwen2(DecoderArchitecture):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    hf_model_type = "qwen2"
    neox_rope = True
    qkv_bias = True

    def hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        config = super().hf_config(spec)
        config.update({"use_sliding_window": False, "sliding_window": spec.context_length,
                       "max_window_layers": spec.n_layers})
        return config
