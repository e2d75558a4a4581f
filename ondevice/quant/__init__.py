"""GGML tensor types: quantize float32 rows to GGML's block formats and back, plus tensor-size helpers.

    from ondevice.quant import get_quant_type
    q = get_quant_type("q4_1")
    raw = q.quantize(weights)            # float32 (rows, n) -> uint8 (rows, q.row_nbytes(n))
    back = q.dequantize(raw, n)          # -> float32 (rows, n)

Per-tensor type choice for a whole model ("recipes" such as q4_k_m) lives in ondevice.quant.recipes.
"""

from __future__ import annotations

from collections.abc import Sequence

from ondevice.errors import UnsupportedError
from ondevice.quant.base import QuantType, shape_elements
from ondevice.quant.floats import BF16, F16, F32
from ondevice.quant.iquants import IQ4_NL, IQ4_XS
from ondevice.quant.kquants import Q3_K, Q4_K, Q5_K, Q6_K
from ondevice.quant.legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

QUANT_TYPES: dict[str, QuantType] = {
    qtype.name: qtype
    for qtype in (F32(), F16(), BF16(), Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q3_K(), Q4_K(), Q5_K(), Q6_K(),
                  IQ4_NL(), IQ4_XS())
}
_BY_GGML_ID: dict[int, QuantType] = {qtype.ggml_type: qtype for qtype in QUANT_TYPES.values()}
# Types whose stored blocks are a 4-bit affine grid (they implement affine_codes): writers can copy them as they are.
AFFINE_4BIT_TYPES = frozenset(name for name, qtype in QUANT_TYPES.items()
                              if type(qtype).affine_codes is not QuantType.affine_codes)


def get_quant_type(name: str) -> QuantType:
    """The type called `name` (case-insensitive: "Q4_K" and "q4_k" both work)."""
    qtype = QUANT_TYPES.get(str(name).lower())
    if qtype is None:
        raise UnsupportedError(
            f"unknown tensor type {name!r}; supported types: {', '.join(QUANT_TYPES)}"
        )
    return qtype


def quant_type_for_ggml(ggml_type: int) -> QuantType:
    """The type with GGML enum value `ggml_type` (as stored in a GGUF tensor info)."""
    qtype = _BY_GGML_ID.get(int(ggml_type))
    if qtype is None:
        known = ", ".join(f"{t.name}={t.ggml_type}" for t in QUANT_TYPES.values())
        raise UnsupportedError(f"GGML tensor type {ggml_type} is not supported by ondevice (supported: {known})")
    return qtype


def tensor_nbytes(qtype: QuantType | str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy `shape` (rows on the last axis) stored as `qtype`."""
    if isinstance(qtype, str):
        qtype = get_quant_type(qtype)
    shape = tuple(int(dim) for dim in shape)
    if not shape:
        shape = (1,)
    if any(dim < 0 for dim in shape):
        raise UnsupportedError(f"invalid tensor shape {shape}")
    n_rows = shape_elements(shape[:-1])
    return n_rows * qtype.row_nbytes(shape[-1]) if n_rows else 0


__all__ = [
    "AFFINE_4BIT_TYPES",
    "QUANT_TYPES",
    "QuantType",
    "get_quant_type",
    "quant_type_for_ggml",
    "tensor_nbytes",
]
