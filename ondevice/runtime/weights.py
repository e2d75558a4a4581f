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
MATMUL_TYPES = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"}


@dataclass(frozen=True)
class Matrix:
    """A (rows, cols) weight matrix in its stored GGML encoding; `data` is a read-only view into the file."""

    data: np.ndarray  # uint8 (rows, row_nbytes)
    ggml_type: int
    type_name: str
    rows: int
    cols: int


@dataclass
class ModelWeights:
    spec: ModelSpec
    layers: list[dict[str, Matrix | np.ndarray]]  # per block: role -> matrix, or float32 vector (norms, biases)
    globals: dict[str, Matrix | np.ndarray]  # embed, final_norm, output (the embedding again when tied)


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


def _tensor(gguf: GGUFFile, name: str, shape: tuple[int, ...]) -> Matrix | np.ndarray:
    return _vector(gguf, name, shape[0]) if len(shape) == 1 else _matrix(gguf, name, shape)


def load_weights(gguf: GGUFFile) -> ModelWeights:
    """Every tensor of the architecture's table that the spec has, checked against its shape (HF (out, in) is
    GGUF's (rows, cols))."""
    arch_name = gguf.get("general.architecture")
    if not isinstance(arch_name, str):
        raise InvalidModelError(f"{gguf.path}: general.architecture is missing")
    arch = get_architecture(arch_name)
    spec = arch.spec_from_gguf(gguf)
    roles = arch.layer_roles(spec)
    layers = [{role: _tensor(gguf, arch.gguf_tensor(role, i), shape) for role, shape in roles.items()}
              for i in range(spec.n_layers)]
    embed_shape = (spec.vocab_size, spec.hidden_size)
    embed = _matrix(gguf, arch.gguf_tensor("embed"), embed_shape)
    return ModelWeights(spec, layers, {
        "embed": embed,
        "final_norm": _vector(gguf, arch.gguf_tensor("final_norm"), spec.hidden_size),
        "output": embed if spec.tie_embeddings else _matrix(gguf, arch.gguf_tensor("output"), embed_shape),
    })
