"""Unquantized GGML types: f32, f16 and bf16 (one weight per "block")."""

from __future__ import annotations

import numpy as np

from ondevice.errors import UnsupportedError
from ondevice.quant.base import QuantType


def _refuse_overflow(converted: np.ndarray, rows: np.ndarray, type_name: str) -> None:
    """A finite weight that becomes Inf in the narrower type would poison every matmul that reads it."""
    overflow = np.isinf(converted)
    if overflow.any():
        row, col = (int(i) for i in np.argwhere(overflow)[0])
        raise UnsupportedError(
            f"weight {rows[row, col]:.6g} at row {row}, column {col} is too large for {type_name}; "
            "store this tensor as f32"
        )


class F32(QuantType):
    name = "f32"
    ggml_type = 0
    block_size = 1
    type_size = 4

    def _quantize_rows(self, rows: np.ndarray) -> np.ndarray:
        return rows.astype("<f4", copy=False).view(np.uint8)

    def _dequantize_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        return rows.view("<f4").astype(np.float32)


class F16(QuantType):
    name = "f16"
    ggml_type = 1
    block_size = 1
    type_size = 2

    def _quantize_rows(self, rows: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow is reported below, with its position
            half = rows.astype("<f2")  # IEEE round to nearest even, as ggml's fp32->fp16
        _refuse_overflow(half, rows, "f16")
        return half.view(np.uint8)

    def _dequantize_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        return rows.view("<f2").astype(np.float32)


class BF16(QuantType):
    name = "bf16"
    ggml_type = 30
    block_size = 1
    type_size = 2

    def _quantize_rows(self, rows: np.ndarray) -> np.ndarray:
        bits = rows.view(np.uint32)
        # Round to nearest even on the upper 16 bits (ggml_compute_fp32_to_bf16). uint32 cannot overflow:
        # only NaN bit patterns (refused earlier) lie above 0xFF800000.
        upper = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype("<u2")
        _refuse_overflow(_bf16_to_f32(upper), rows, "bf16")
        return upper.view(np.uint8)

    def _dequantize_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        return _bf16_to_f32(rows.view("<u2"))


def _bf16_to_f32(upper: np.ndarray) -> np.ndarray:
    return (upper.astype(np.uint32) << 16).view(np.float32)
