"""Tiny random llama / llama3-rope / qwen2 / qwen3 checkpoints (seeded, seconds to make) for converter and runtime tests."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_model(folder: Path, arch: str, *, tie: bool = True, seed: int = 0, hidden: int = 64,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128) -> Path:
    import torch
    from fixtures_tokenizer import make_tiny_tokenizer
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(folder)
    vocab = tokenizer.get_vocab_size()
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, initializer_range=0.1,
                  bos_token_id=tokenizer.token_to_id("<|im_start|>"), eos_token_id=tokenizer.token_to_id("<|im_end|>"))
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "llama3":  # Llama 3.x RoPE scaling; an original context of 64 puts pairs in all three bands
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling=scaling))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    elif arch == "gemma3":  # 6 layers, the last one full (llama.cpp's pattern); a window of 4 tokens; RoPE bases
        # 1e6 (full) and 1e4 (sliding)
        gemma = {k: v for k, v in common.items() if k not in ("rope_theta", "num_hidden_layers")}
        model = Gemma3ForCausalLM(Gemma3TextConfig(**gemma, num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                                                   sliding_window=4))
    elif arch == "qwen3":  # head dim 32, not hidden / heads = 16: q/k widths differ from the hidden width
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, use_sliding_window=False))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        # Non-trivial norms and biases, so a converter that drops or misplaces them fails the logits check.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
