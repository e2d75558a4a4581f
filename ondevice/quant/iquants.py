"""The non-linear 4-bit types IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks).

Each 4-bit code indexes ggml's fixed grid of 16 signed levels (kvalues_iq4nl), denser near zero. Both types go
through ggml's `quantize_row_iq4_nl_impl` as `ggml_quantize_chunk` calls it (what llama-quantize writes): per
32 weights, the scale of the largest-magnitude weight, then 15 candidate scales around it, each scored by the
weighted least-squares fit of the levels (weights x^2, or with an imatrix qw * sqrt(sigma2 + x^2)). IQ4_NL
stores that scale as fp16; IQ4_XS stores a super-block fp16 d and a 6-bit signed multiple of it per 32 weights.
As in kquants.py the searches are vectorized with the weight index on axis 0, so float32 sums run in C's order.
"""

from __future__ import annotations

import numpy as np

from ondevice.quant.base import (
    WeightedSearchType,
    fp16_bits,
    fp16_to_f32,
    nearest_int,
    pack_nibbles,
    row_sigma2,
    sequential_sum,
)

F32 = np.float32
QK = 32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
NTRY = 7  # ggml_quantize_chunk's IQ4 search: candidate scales -7..7 steps around the peak's

# ggml's kvalues_iq4nl: the 16 levels a code selects.
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_LEVELS = KVALUES.astype(F32)


def best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, v) elementwise: the nearest level's index, the lower one on a
    tie; values past either end (and NaN, which the C binary search walks to the top) clamp."""
    upper = np.clip(np.searchsorted(_LEVELS, v, side="right"), 1, 15)
    idx = np.where(v - _LEVELS[upper - 1] < _LEVELS[upper] - v, upper - 1, upper)
    idx = np.where(v >= _LEVELS[15], 15, idx)
    return np.where(v <= _LEVELS[0], 0, idx).astype(np.uint8)


def _block_scales(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The scale of each 32-weight block (columns of x, weights: float32 (32, S)); 0 for blocks of ~0."""
    idx = np.argmax(np.abs(x), axis=0)  # the first of equal magnitudes, as C's strict '>'
    peak = np.take_along_axis(x, idx[None, :], axis=0)[0]
    tiny = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(tiny, F32(1), peak)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels = _LEVELS[best_index(x * iscale)]
        wq = weights * levels
        return sequential_sum(wq * x), sequential_sum(wq * levels)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -peak / _LEVELS[0]
        sumqx, sumq2 = fit(F32(1) / d)
        scale = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = scale * sumqx
        for step in range(-NTRY, NTRY + 1):
            t_sumqx, t_sumq2 = fit(F32(step + int(KVALUES[0])) / peak)
            better = (t_sumq2 > 0) & (t_sumqx * t_sumqx > best * t_sumq2)
            scale = np.where(better, t_sumqx / t_sumq2, scale).astype(F32)
            best = np.where(better, scale * t_sumqx, best).astype(F32)
    return np.where(tiny, F32(0), scale)


def _weights(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Per-weight error weights of (nb, block) rows: x^2, or qw * sqrt(sigma2 + x^2) with sigma2 = 2 <x^2>."""
    if qw is None:
        return blocks * blocks
    return qw * np.sqrt(row_sigma2(blocks, 2)[:, None] + blocks * blocks)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)


def _pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> 16 bytes each: element j in the low nibble of byte j, element j+16 in its high nibble."""
    return pack_nibbles(codes[:, :16], codes[:, 16:])


def _unpack_levels(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> float32 levels (n, 32)."""
    return _LEVELS[np.concatenate([qs & 0x0F, qs >> 4], axis=1)]


class IQ4_NL(WeightedSearchType):
    """18 bytes: fp16 d, 16 bytes of 4-bit codes; weight j = d * kvalues[code j] (codes laid out as Q4_0's)."""

    name = "iq4_nl"
    ggml_type = 20
    block_size = QK
    type_size = 2 + QK // 2
    native = True
    native_weighted = True
    chunk_blocks = 4096

    def _from_search(self, blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        scale = _block_scales(np.ascontiguousarray(blocks.T), np.ascontiguousarray(_weights(blocks, qw).T))
        d_raw = fp16_bits(scale, self.name)
        # the codes against the search's float scale (not its fp16 rounding), as ggml does
        codes = best_index(blocks * _inverse(scale)[:, None])
        return np.concatenate([d_raw, _pack_codes(codes)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return fp16_to_f32(blocks[:, 0:2])[:, None] * _unpack_levels(blocks[:, 2:])


class IQ4_XS(WeightedSearchType):
    """136 bytes: fp16 d, u16 scales_h (2 high bits per 32-weight block), 4 bytes scales_l (4 low bits each),
    128 bytes of codes; weight j of block b = d * (ls[b] - 32) * kvalues[code j], ls 6-bit."""

    name = "iq4_xs"
    ggml_type = 23
    block_size = QK_K
    type_size = 2 + 2 + QK_K // 64 + QK_K // 2
    native = True
    native_weighted = True
    chunk_blocks = 512

    def _from_search(self, blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        nb = blocks.shape[0]
        sub = blocks.reshape(nb * 8, QK)
        weights = _weights(blocks, qw).reshape(nb * 8, QK)
        scales = _block_scales(np.ascontiguousarray(sub.T), np.ascontiguousarray(weights.T)).reshape(nb, 8)
        idx = np.argmax(np.abs(scales), axis=1)
        peak = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
        peak = np.where(np.abs(peak) == 0, F32(0), peak)  # C starts from +0 and keeps it when every scale is 0
        d = (-peak / F32(32)).astype(F32)
        d_raw = fp16_bits(d, self.name)
        ls = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
        dl = (d[:, None] * ls.astype(F32)).reshape(-1)
        codes = best_index(sub * _inverse(dl)[:, None])
        biased = (ls + 32).astype(np.uint8)
        scales_l = pack_nibbles(biased[:, 0::2], biased[:, 1::2])
        high = (biased >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))
        scales_h = np.bitwise_or.reduce(high, axis=1).astype("<u2").reshape(nb, 1).view(np.uint8)
        return np.concatenate([d_raw, scales_h, scales_l, _pack_codes(codes).reshape(nb, 128)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        nb = blocks.shape[0]
        dl = self.block_scales(blocks).reshape(-1, 1)
        return (dl * _unpack_levels(blocks[:, 8:].reshape(nb * 8, 16))).reshape(nb, QK_K)

    @staticmethod
    def block_scales(blocks: np.ndarray) -> np.ndarray:
        """The stored scale of each 32-weight block: float32 (nb, 8), d * (ls - 32)."""
        nb = blocks.shape[0]
        d = fp16_to_f32(blocks[:, 0:2])
        scales_h = blocks[:, 2:4].copy().view("<u2")[:, 0].astype(np.int32)
        low = blocks[:, 4:8]
        ls = np.concatenate([low[:, :, None] & 0x0F, low[:, :, None] >> 4], axis=2).reshape(nb, 8).astype(np.int32)
        ls |= ((scales_h[:, None] >> (2 * np.arange(8))) & 3) << 4
        return d[:, None] * (ls - 32).astype(F32)
