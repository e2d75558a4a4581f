"""Asymmetric 4-bit grids in blocks along a row, Q4_1's form at any block size: weight = scale * code + bias, code in
0..15, one (scale, bias) per block. Writers that copy or build such grids (Core ML int4, ExecuTorch 8da4w, GPTQ)
share these steps.

    scale, bias = affine_block_params(weight, 32)          # (N, K / 32) each: (max - min) / 15, min
    codes = affine_round(weight, scale, bias)              # uint8 (N, K), nearest code
    signed, offsets = centered(codes, scale, bias)         # d * (code - 8) + (m + 8 d): symmetric part + offsets
    grid = source_affine_grid(tensor, 32)                  # a Q4_0/Q4_1 tensor's own (codes, scale, bias), or None
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ondevice.quant import AFFINE_4BIT_TYPES

if TYPE_CHECKING:
    from ondevice.model import LazyTensor

LEVELS = 15  # 4-bit codes 0..15


def affine_block_params(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1's parameters per block of `block` columns: scale = (max - min) / 15 (1 for a constant block), bias = min."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    low, high = blocks.min(axis=2), blocks.max(axis=2)
    scale = (high - low) / LEVELS
    return np.where(scale == 0, 1.0, scale).astype(np.float32), low.astype(np.float32)


def affine_round(values: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The nearest code of each value: `values` (N, K) or one column (N,) with its blocks' scale and bias."""
    if values.ndim == 2 and values.shape != scale.shape:
        block = values.shape[1] // scale.shape[1]
        scale, bias = np.repeat(scale, block, axis=1), np.repeat(bias, block, axis=1)
    return np.clip(np.rint((values - bias) / scale), 0, LEVELS).astype(np.uint8)


def centered(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale * code + bias = scale * (code - 8) + (bias + 8 scale): (int8 codes - 8 (N, K), float32 block offsets
    bias + 8 scale). The first part is symmetric int4, which targets without a per-block offset can hold exactly;
    the offsets are applied to the input's block sums or means."""
    return codes.astype(np.int8) - 8, (bias + np.float32(8) * scale).astype(np.float32)


def source_affine_grid(tensor: LazyTensor, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The 4-bit grid a source stores `tensor` on (Q4_0/Q4_1 rows, read raw: no dequantize/requantize round trip)
    as (codes uint8 (N, K), float32 scale, bias (N, K / block)), when its blocks are `block` wide; else None."""
    if tensor.raw is None or len(tensor.shape) != 2 or tensor.source_dtype not in AFFINE_4BIT_TYPES:
        return None
    qtype, rows = tensor.raw()
    if qtype.block_size != block:
        return None
    return qtype.affine_codes(rows, tensor.shape[-1])
