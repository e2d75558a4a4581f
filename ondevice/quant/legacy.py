"""The 32-weight block formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Quantizers reproduce ggml-quants.c's `quantize_row_*_ref` bit for bit: every intermediate is float32 in
the same order as the C code, C's float->int casts truncate toward zero, roundf() rounds halves away from
zero, and the fp16 scales are rounded to nearest even.
"""

from __future__ import annotations

import numpy as np

from ondevice.quant.base import QuantType, fp16_bits, fp16_to_f32, pack_nibbles, row_sigma2

F32 = np.float32
QK = 32


def _inverse(d: np.ndarray) -> np.ndarray:
    """`d ? 1.0f/d : 0.0f` in float32."""
    safe = np.where(d == 0, F32(1), d)
    return np.where(d == 0, F32(0), F32(1) / safe).astype(F32)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude, keeping its sign; the first one wins ties (C's strict `<`). A block of
    zeros gives +0.0 (the C loop's initial value), whatever the sign of its first zero: ggml then writes the scale
    -0.0 (gguf-py's port, which takes the first element, does not)."""
    idx = np.argmax(np.abs(blocks), axis=1)
    peak = np.take_along_axis(blocks, idx[:, None], axis=1)[:, 0]
    return np.where(peak == 0, F32(0), peak)


def _first_extremes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) per block as the C loops find them: the first element equal to each, which settles the sign
    of a zero (numpy's min/max may return either of -0.0 and 0.0)."""
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    first_lo = np.argmax(blocks == lo[:, None], axis=1)
    first_hi = np.argmax(blocks == hi[:, None], axis=1)
    return (np.take_along_axis(blocks, first_lo[:, None], axis=1)[:, 0],
            np.take_along_axis(blocks, first_hi[:, None], axis=1)[:, 0])


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf(): exact, unlike trunc(v + 0.5) which float32 rounding can push to the next integer."""
    whole = np.trunc(v)
    frac = v - whole  # exact for |v| < 2**23
    return whole + np.where(np.abs(frac) >= F32(0.5), np.sign(v), F32(0))


def _split_halves(codes: np.ndarray) -> np.ndarray:
    """Element j goes in the low nibble of byte j, element j+16 in its high nibble."""
    return pack_nibbles(codes[:, : QK // 2], codes[:, QK // 2 :])


def _high_bits_mask(codes: np.ndarray) -> np.ndarray:
    """Bit 4 of element i -> bit i of a little-endian uint32 (the qh field of Q5_0/Q5_1)."""
    bits = ((codes.astype(np.uint32) >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    mask = np.ascontiguousarray(qh).view("<u4")
    return (((mask >> np.arange(QK, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _weighted_blocks(rows: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blocks of `rows` and their weights as the _impl quantizers build them: qw * sqrt(sigma2 + x*x), sigma2 the
    row's mean square; both laid out (32, blocks) for the vectorized searches (weight index on axis 0)."""
    sigma2 = row_sigma2(rows)
    weights = importance[None, :] * np.sqrt(sigma2[:, None] + rows * rows)
    return (np.ascontiguousarray(rows.reshape(-1, QK).T), np.ascontiguousarray(weights.reshape(-1, QK).T))


def _symmetric_weighted(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(32, nmax, x, L, 1, weights) per block: (d (blocks,), codes (blocks, 32) in 0..2*nmax-1)."""
    from ondevice.quant.kquants import _make_qx_quants

    x, weights = _weighted_blocks(rows, importance)
    d, codes = _make_qx_quants(x, nmax, weights)
    return d, np.ascontiguousarray(codes.T)


def _affine_weighted(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx3_quants(32, nmax, x, weights, ..., -0.9, 0.05, 36) per block: (d, m, codes (blocks, 32))."""
    from ondevice.quant.kquants import _make_qkx2_quants

    x, weights = _weighted_blocks(rows, importance)
    d, the_min, codes = _make_qkx2_quants(x, weights, nmax, -0.9, 0.05, 36)
    return d, -the_min, np.ascontiguousarray(codes.T)


def _affine_grid(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                 rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-block codes/scale/bias -> (codes (rows, n), scale and bias float32 (rows, n / 32))."""
    return codes.reshape(rows, -1), scale.reshape(rows, -1).astype(F32), bias.reshape(rows, -1).astype(F32)


class Q8_0(QuantType):
    name = "q8_0"
    ggml_type = 8
    block_size = QK
    type_size = 2 + QK
    native = True

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        amax = np.abs(blocks).max(axis=1)
        d = amax / F32(127)
        q = _round_half_away(blocks * _inverse(d)[:, None]).astype(np.int8)
        return np.concatenate([fp16_bits(d, self.name), q.view(np.uint8)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = fp16_to_f32(blocks[:, :2])
        return blocks[:, 2:].view(np.int8).astype(F32) * d[:, None]


class Q4_0(QuantType):
    name = "q4_0"
    ggml_type = 2
    block_size = QK
    type_size = 2 + QK // 2
    native = True
    native_weighted = True

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = _signed_absmax(blocks) / F32(-8)
        scaled = blocks * _inverse(d)[:, None]
        codes = np.minimum(15, np.trunc(scaled + F32(8.5)).astype(np.int8))
        return np.concatenate([fp16_bits(d, self.name), _split_halves(codes)], axis=1)

    takes_importance = True

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        d, codes = _symmetric_weighted(rows, importance, 8)
        return np.concatenate([fp16_bits(d, self.name), _split_halves(codes)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = fp16_to_f32(blocks[:, :2])
        q = _unpack_nibbles(blocks[:, 2:]).astype(np.int8) - 8
        return q.astype(F32) * d[:, None]

    def affine_codes(self, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.checked_rows(data, n)
        blocks = rows.reshape(-1, self.type_size)
        d = fp16_to_f32(blocks[:, :2])
        return _affine_grid(_unpack_nibbles(blocks[:, 2:]), d, d * F32(-8), len(rows))


class Q4_1(QuantType):
    name = "q4_1"
    ggml_type = 3
    block_size = QK
    type_size = 4 + QK // 2
    native = True
    native_weighted = True

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        lo, hi = _first_extremes(blocks)
        d = (hi - lo) / F32(15)
        scaled = (blocks - lo[:, None]) * _inverse(d)[:, None]
        codes = np.minimum(15, np.trunc(scaled + F32(0.5)).astype(np.int8))
        header = np.concatenate([fp16_bits(d, self.name), fp16_bits(lo, self.name)], axis=1)
        return np.concatenate([header, _split_halves(codes)], axis=1)

    takes_importance = True

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        d, m, codes = _affine_weighted(rows, importance, 15)
        header = np.concatenate([fp16_bits(d, self.name), fp16_bits(m, self.name)], axis=1)
        return np.concatenate([header, _split_halves(codes)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = fp16_to_f32(blocks[:, 0:2])
        m = fp16_to_f32(blocks[:, 2:4])
        q = _unpack_nibbles(blocks[:, 4:]).astype(F32)
        return q * d[:, None] + m[:, None]

    def affine_codes(self, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.checked_rows(data, n)
        blocks = rows.reshape(-1, self.type_size)
        d, m = fp16_to_f32(blocks[:, 0:2]), fp16_to_f32(blocks[:, 2:4])
        return _affine_grid(_unpack_nibbles(blocks[:, 4:]), d, m, len(rows))


class Q5_0(QuantType):
    name = "q5_0"
    ggml_type = 6
    block_size = QK
    type_size = 2 + 4 + QK // 2
    native = True
    native_weighted = True

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = _signed_absmax(blocks) / F32(-16)
        scaled = blocks * _inverse(d)[:, None]
        codes = np.minimum(31, np.trunc(scaled + F32(16.5)).astype(np.int8))
        return np.concatenate(
            [fp16_bits(d, self.name), _high_bits_mask(codes), _split_halves(codes & 0x0F)], axis=1
        )

    takes_importance = True

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        d, codes = _symmetric_weighted(rows, importance, 16)
        return np.concatenate([fp16_bits(d, self.name), _high_bits_mask(codes), _split_halves(codes & 0x0F)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = fp16_to_f32(blocks[:, 0:2])
        q = (_unpack_nibbles(blocks[:, 6:]) | _unpack_high_bits(blocks[:, 2:6])).astype(np.int8) - 16
        return q.astype(F32) * d[:, None]


class Q5_1(QuantType):
    name = "q5_1"
    ggml_type = 7
    block_size = QK
    type_size = 4 + 4 + QK // 2
    native = True
    native_weighted = True

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        lo, hi = _first_extremes(blocks)
        d = (hi - lo) / F32(31)
        scaled = (blocks - lo[:, None]) * _inverse(d)[:, None]
        # No clamp in the C reference: (x - min) / d never rounds past 31.5.
        codes = np.trunc(scaled + F32(0.5)).astype(np.uint8)
        header = np.concatenate([fp16_bits(d, self.name), fp16_bits(lo, self.name)], axis=1)
        return np.concatenate([header, _high_bits_mask(codes), _split_halves(codes & 0x0F)], axis=1)

    takes_importance = True

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        d, m, codes = _affine_weighted(rows, importance, 31)
        header = np.concatenate([fp16_bits(d, self.name), fp16_bits(m, self.name)], axis=1)
        return np.concatenate([header, _high_bits_mask(codes), _split_halves(codes & 0x0F)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        d = fp16_to_f32(blocks[:, 0:2])
        m = fp16_to_f32(blocks[:, 2:4])
        q = (_unpack_nibbles(blocks[:, 8:]) | _unpack_high_bits(blocks[:, 4:8])).astype(F32)
        return q * d[:, None] + m[:, None]
