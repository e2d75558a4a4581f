"""The decoder, written once: the order of operations of every architecture's forward pass, over a small set of
operations that each backend implements on its own tensors (numpy in ondevice/reference.py, the C kernels in
runtime/transformer.py, torch for ExecuTorch, MIL for Core ML, ONNX nodes).

A backend names tensors by role (architectures/base.py's tensor table), never by architecture: what differs
between architectures is the spec's features, read here. A backend states the features it can express; a spec
that needs another is refused with the feature's name before anything is built, and a converter checks that
its graph consumed every source tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from ondevice.architectures import get_architecture
from ondevice.errors import UnsupportedError
from ondevice.model import ModelSpec

T = TypeVar("T")

# Features a spec may use beyond the plain pre-norm SwiGLU decoder with unscaled RoPE, and how to name them.
FEATURES: dict[str, str] = {
    "qkv_bias": "q/k/v biases",
    "qk_norm": "q/k head RMSNorm",
    "rope_freq_factors": "scaled RoPE frequencies (llama3/linear rope_scaling)",
    "norm_offset": "RMSNorm with 1 + w",
    "post_norms": "sandwich norms",
    "gelu_tanh": "GELU (tanh) MLP",
    "embed_scale": "scaled embeddings",
    "attn_scale": "a query scale other than 1/sqrt(head dim)",
    "sliding_window": "sliding-window attention",
    "local_rope_theta": "a RoPE base of its own for sliding-window layers",
}


def spec_features(spec: ModelSpec) -> set[str]:
    used = set()
    if spec.qkv_bias:
        used.add("qkv_bias")
    if spec.qk_norm:
        used.add("qk_norm")
    if spec.rope_freq_factors is not None:
        used.add("rope_freq_factors")
    if spec.norm_offset:
        used.add("norm_offset")
    if spec.post_norms:
        used.add("post_norms")
    if spec.activation == "gelu_tanh":
        used.add("gelu_tanh")
    if spec.embed_scale is not None:
        used.add("embed_scale")
    if spec.attn_scale is not None:
        used.add("attn_scale")
    if any(spec.layer_windows):
        used.add("sliding_window")
    if spec.local_rope_theta is not None and any(spec.layer_windows):
        used.add("local_rope_theta")
    return used


def require_features(spec: ModelSpec, target: str, supported: Iterable[str]) -> None:
    """Refuse, naming the feature, a spec this target cannot express (never a silently wrong model)."""
    missing = sorted(spec_features(spec) - set(supported))
    if missing:
        needs = ", ".join(FEATURES[name] for name in missing)
        raise UnsupportedError(f"{target}: {spec.arch} needs {needs}, which {target} does not support yet")


def check_consumed(tensors: Mapping[str, object], used: set[str], target: str) -> None:
    """Fail when the source holds a tensor the built graph never read (it would convert into a wrong model)."""
    unused = sorted(set(tensors) - used)
    if unused:
        raise UnsupportedError(f"{target}: source tensor {unused[0]!r} was not used by the decoder "
                               f"({len(unused)} unused); this architecture variant is not supported yet")


class DecoderOps(Generic[T]):
    """The operations of a decoder on a backend's tensors. `layer` is a block index, None for global tensors;
    `role` a key of the tensor table. x is (tokens, hidden) in whatever layout the backend keeps."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.arch = get_architecture(spec.arch)  # whose tensor table names the roles
        self.used: set[str] = set()  # HF names of the tensors the backend was asked for

    def tensor_name(self, role: str, layer: int | None) -> str:
        name = self.arch.hf_tensor(role, layer)
        self.used.add(name)
        return name

    def embed(self) -> T:
        raise NotImplementedError

    def scale(self, x: T, factor: float) -> T:
        """x * factor (the embedding scale)."""
        raise NotImplementedError

    def norm(self, x: T, role: str, layer: int | None) -> T:
        """RMSNorm with weight `role` (scaling by spec.norm_offset + w)."""
        raise NotImplementedError

    def project(self, x: T, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[T]:
        """x @ W^T (+ b) for each role's weight: the same input, so a backend may fuse them."""
        raise NotImplementedError

    def head_norm(self, x: T, role: str, layer: int, n_heads: int) -> T:
        """RMSNorm of each of the n_heads heads of x (q/k norm)."""
        raise NotImplementedError

    def attention(self, q: T, k: T, v: T, layer: int) -> T:
        """RoPE on q and k (rope.py's frequencies of this layer), the KV cache, causal grouped-query attention
        within spec.window(layer) if it has one, q.k scaled by attention_scale(spec); (tokens, H*Dh)."""
        raise NotImplementedError

    def gated_act(self, gate: T, up: T, layer: int) -> T:
        """act(gate) * up, act being spec.activation."""
        raise NotImplementedError

    def add(self, x: T, y: T, layer: int, what: str) -> T:
        """The residual x + y (`what`: "attn" or "ffn")."""
        raise NotImplementedError

    def add_projection(self, x: T, y: T, role: str, layer: int) -> T:
        """x + y @ W^T: a backend may accumulate into x."""
        return self.add(x, self.project(y, (role,), layer)[0], layer, "attn" if role == "o" else "ffn")

    def output_rows(self, x: T) -> T:
        """The rows that need logits (the runtime's prompt chunks need only the last)."""
        return x

    def logits(self, x: T) -> T:
        """x @ output^T, the output layer being the embedding when tied."""
        raise NotImplementedError


def run_decoder(ops: DecoderOps[T]) -> T:
    """The forward pass: embeddings -> blocks -> final norm -> logits."""
    spec = ops.spec
    x = ops.embed()
    if spec.embed_scale is not None:
        x = ops.scale(x, spec.embed_scale)
    for i in range(spec.n_layers):
        h = ops.norm(x, "attn_norm", i)
        q, k, v = ops.project(h, ("q", "k", "v"), i, bias=spec.qkv_bias)
        if spec.qk_norm:
            q = ops.head_norm(q, "q_norm", i, spec.n_heads)
            k = ops.head_norm(k, "k_norm", i, spec.n_kv_heads)
        x = _residual(ops, x, ops.attention(q, k, v, i), "o", "post_attn_norm", i)
        h = ops.norm(x, "ffn_norm", i)
        gate, up = ops.project(h, ("gate", "up"), i)
        x = _residual(ops, x, ops.gated_act(gate, up, i), "down", "post_ffn_norm", i)
    x = ops.norm(ops.output_rows(x), "final_norm", None)
    return ops.logits(x)


def _residual(ops: DecoderOps[T], x: T, y: T, role: str, post_norm: str, layer: int) -> T:
    """x + y @ W^T, or with sandwich norms x + norm(y @ W^T)."""
    if not ops.spec.post_norms:
        return ops.add_projection(x, y, role, layer)
    return ops.add(x, ops.norm(ops.project(y, (role,), layer)[0], post_norm, layer), layer,
                   "attn" if role == "o" else "ffn")


def attention_scale(spec: ModelSpec) -> float:
    return spec.attn_scale if spec.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim)

