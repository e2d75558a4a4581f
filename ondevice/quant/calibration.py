"""Activations for quantizers that minimize a layer's output error (ondevice.quant.gptq): the canonical model's
forward pass in float32 numpy over a bundled calibration text, which is not the text `ondevice eval` measures on.

The pass runs layer by layer over every calibration token at once, so only one layer's weights are in memory at a
time (the canonical tensors are lazy). Hugging Face layout: rotate-half RoPE, grouped-query attention, SwiGLU MLP,
optional q/k/v biases (qwen2); the same decoder the targets build.

    hessian = output_layer_hessian(model)   # (hidden, hidden) float64: E[h h^T] of the final norm's output
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ondevice.model import CanonicalModel

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration_text.txt"
WINDOW = 256  # tokens per window, each opened by the BOS when the tokenizer adds one
MAX_TOKENS = 16384


def calibration_windows(model: CanonicalModel, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(model.tokenizer_json)
    body = tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False).ids
    body = [t for t in body[:max_tokens] if 0 <= t < model.spec.vocab_size]
    prefix = [model.special.bos_id] if model.special.add_bos and model.special.bos_id is not None else []
    step = WINDOW - len(prefix)
    return [prefix + body[i:i + step] for i in range(0, len(body), step) if len(body[i:i + step]) >= 2]


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:  # x (heads, S, d), rotate-half
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def final_hidden_states(model: CanonicalModel, windows: list[list[int]]) -> np.ndarray:
    """The final norm's output for every token of `windows`: (tokens, hidden) float32."""
    spec = model.spec
    d, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads

    def w(name: str) -> np.ndarray:
        return model.tensors[name].load()

    embed = w("model.embed_tokens.weight")
    x = embed[np.concatenate([np.asarray(window) for window in windows])]  # (tokens, hidden): linears on all at once
    del embed
    bounds = np.cumsum([0] + [len(window) for window in windows])
    longest = max(len(window) for window in windows)
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(np.arange(longest), inv_freq)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    group = nh // nkv
    for i in range(spec.n_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(x, w(f"{p}.input_layernorm.weight"), spec.rms_eps)
        qkv = [h @ w(f"{p}.self_attn.{k}_proj.weight").T for k in "qkv"]
        if spec.qkv_bias:
            qkv = [t + w(f"{p}.self_attn.{k}_proj.bias") for t, k in zip(qkv, "qkv", strict=True)]
        context = np.empty((len(x), nh * d), np.float32)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):  # causal attention within each window
            s = stop - start
            q, k, v = (t[start:stop].reshape(s, n, d).transpose(1, 0, 2) for t, n in zip(qkv, (nh, nkv, nkv),
                                                                                          strict=True))
            q, k = _rope(q, cos[:s], sin[:s]), _rope(k, cos[:s], sin[:s])
            k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
            scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(d))
            scores += np.triu(np.full((s, s), -np.inf, np.float32), 1)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context[start:stop] = ((scores / scores.sum(axis=-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(s, -1)
        x = x + context @ w(f"{p}.self_attn.o_proj.weight").T
        h = _rms_norm(x, w(f"{p}.post_attention_layernorm.weight"), spec.rms_eps)
        gate = h @ w(f"{p}.mlp.gate_proj.weight").T
        with np.errstate(over="ignore"):  # exp overflows to inf for very negative gates: silu -> 0, right
            silu = gate / (1.0 + np.exp(-gate))
        x = x + (silu * (h @ w(f"{p}.mlp.up_proj.weight").T)) @ w(f"{p}.mlp.down_proj.weight").T
    return _rms_norm(x, w("model.norm.weight"), spec.rms_eps).astype(np.float32)


def output_layer_hessian(model: CanonicalModel, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """E[h h^T] over the calibration tokens of the output layer's input h: (hidden, hidden) float64."""
    hidden = final_hidden_states(model, calibration_windows(model, max_tokens)).astype(np.float64)
    return hidden.T @ hidden / len(hidden)
