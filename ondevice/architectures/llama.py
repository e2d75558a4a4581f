"""LlamaForCausalLM: SmolLM2, Llama 3.x. Interleaved RoPE in llama.cpp, hence the q/k row permutation."""

from __future__ import annotations

from typing import Any

from ondevice.architectures.base import DecoderArchitecture
from ondevice.errors import UnsupportedError
from ondevice.model import ModelSpec


class Llama(DecoderArchitecture):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM",)
    hf_model_type = "llama"
    rope_scaling_types = ("llama3", "linear")  # Llama 3.x; both become llama.cpp's rope_freqs

    def spec_from_hf(self, config: dict[str, Any], where: str) -> ModelSpec:
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedError(f"{where}: llama with attention_bias/mlp_bias is not supported")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (llama uses silu)")
        return super().spec_from_hf(config, where)
