"""Weights of a GGUF model as zero-copy views into the mmap, validated against the architecture."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.formats.gguf import GGUFFile
from ondevice.model import ModelSpec
from ondevice.quant import quant_type_for_ggml

# Weight types the C matmul kernels take directly.
MATMUL_TYPES = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"}


@dataclass(frozen=True)
class Matrix:
    """A (rows, cols) weight matrix in its stored GGML encoding; `data` is a read-only view into the file."""

    data: np.ndarray  # uint8 (rows, row_nbytes)
    ggml_type: int
    type_name: str
    rows: int
    cols: int


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq: Matrix
    wk: Matrix
    wv: Matrix
    wo: Matrix
    ffn_norm: np.ndarray
    w_gate: Matrix
    w_up: Matrix
    w_down: Matrix
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None


@dataclass
class ModelWeights:
    spec: ModelSpec
    token_embd: Matrix
    layers: list[LayerWeights]
    output_norm: np.ndarray
    output: Matrix  # token_embd again when embeddings are tied


def _matrix(gguf: GGUFFile, name: str, shape: tuple[int, int]) -> Matrix:
    info = gguf.tensors.get(name)
    if info is None:
        raise InvalidModelError(f"{gguf.path}: tensor {name!r} is missing")
    if info.shape != shape:
        raise InvalidModelError(f"{gguf.path}: tensor {name!r} has shape {info.shape}, expected {shape}")
    qtype = quant_type_for_ggml(info.ggml_type)
    if qtype.name not in MATMUL_TYPES:
        raise UnsupportedError(f"{gguf.path}: tensor {name!r} type {qtype.name} is not supported by the runtime")
    return Matrix(gguf.tensor_data(name), info.ggml_type, qtype.name, shape[0], shape[1])


def _vector(gguf: GGUFFile, name: str, size: int) -> np.ndarray:
    info = gguf.tensors.get(name)
    if info is None:
        raise InvalidModelError(f"{gguf.path}: tensor {name!r} is missing")
    if info.shape != (size,):
        raise InvalidModelError(f"{gguf.path}: tensor {name!r} has shape {info.shape}, expected ({size},)")
    qtype = quant_type_for_ggml(info.ggml_type)
    return np.ascontiguousarray(qtype.dequantize(gguf.tensor_data(name), size).reshape(size), dtype=np.float32)


def load_weights(gguf: GGUFFile) -> ModelWeights:
    arch_name = gguf.get("general.architecture")
    if not isinstance(arch_name, str):
        raise InvalidModelError(f"{gguf.path}: general.architecture is missing")
    arch = get_architecture(arch_name)
    spec = arch.spec_from_gguf(gguf)
    if "rope_freqs.weight" in gguf.tensors:
        raise UnsupportedError(f"{gguf.path}: RoPE frequency factors (rope_freqs) are not supported yet")
    d, f = spec.hidden_size, spec.ffn_size
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    layers = []
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        layer = LayerWeights(
            attn_norm=_vector(gguf, p + "attn_norm.weight", d),
            wq=_matrix(gguf, p + "attn_q.weight", (q, d)),
            wk=_matrix(gguf, p + "attn_k.weight", (kv, d)),
            wv=_matrix(gguf, p + "attn_v.weight", (kv, d)),
            wo=_matrix(gguf, p + "attn_output.weight", (d, q)),
            ffn_norm=_vector(gguf, p + "ffn_norm.weight", d),
            w_gate=_matrix(gguf, p + "ffn_gate.weight", (f, d)),
            w_up=_matrix(gguf, p + "ffn_up.weight", (f, d)),
            w_down=_matrix(gguf, p + "ffn_down.weight", (d, f)),
        )
        if spec.qkv_bias:
            layer.bq = _vector(gguf, p + "attn_q.bias", q)
            layer.bk = _vector(gguf, p + "attn_k.bias", kv)
            layer.bv = _vector(gguf, p + "attn_v.bias", kv)
        layers.append(layer)
    token_embd = _matrix(gguf, "token_embd.weight", (spec.vocab_size, d))
    output = token_embd if spec.tie_embeddings else _matrix(gguf, "output.weight", (spec.vocab_size, d))
    return ModelWeights(spec, token_embd, layers, _vector(gguf, "output_norm.weight", d), output)
