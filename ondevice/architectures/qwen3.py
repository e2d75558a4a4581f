"""Qwen3ForCausalLM: qwen2 without the q/k/v biases, with an RMSNorm on every q and k head before RoPE and a head
dim of its own (Qwen3-0.6B: 16 heads of 128 on a width of 1024)."""

from __future__ import annotations

from typing import Any

from ondevice.architectures.base import DecoderArchitecture
from ondevice.errors import UnsupportedError
from ondevice.model import ModelSpec


class Qwen3(DecoderArchitecture):
    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    hf_model_type = "qwen3"
    neox_rope = True
    qk_norm = True

    def spec_from_hf(self, config: dict[str, Any], where: str) -> ModelSpec:
        if config.get("attention_bias"):
            raise UnsupportedError(f"{where}: qwen3 with attention_bias is not supported")
        if config.get("use_sliding_window"):
            raise UnsupportedError(f"{where}: qwen3 with use_sliding_window is not supported yet")
        return super().spec_from_hf(config, where)

    def hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return {**super().hf_config(spec), "attention_bias": False, "use_sliding_window": False}
