"""A toy architecture in one file: what it takes to add one (the README's claim, tested by
tests/test_new_architecture.py). Its mix of features exists in no Hugging Face model (q/k/v biases AND q/k head
norms, rotate-half RoPE), so only ondevice's own decoder description can build it."""

from __future__ import annotations

from ondevice.architectures.base import DecoderArchitecture


class ToyLM(DecoderArchitecture):
    name = "toylm"
    hf_architectures = ("ToyLMForCausalLM",)
    hf_model_type = "toylm"
    neox_rope = True
    qkv_bias = True
    qk_norm = True
