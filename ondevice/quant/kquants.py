"""K-quants: Q3_K, Q4_K, Q5_K and Q6_K, 256-weight super-blocks.

The quantizers follow llama.cpp's reference path (`quantize_row_q4_K_ref` with make_qkx2_quants' search
over 21 candidate scales and a least-squares scale+min fit; `quantize_row_q6_K_ref` with make_qx_quants'
19-candidate search), i.e. what `llama-quantize` writes when no importance matrix is given. The searches are
vectorized across sub-blocks: arrays are laid out (weight index, sub-block) so every per-sub-block sum is an
axis-0 reduction, which numpy accumulates in index order like the C loops, keeping the float32 results
identical to the C code's. Q5_K is Q4_K with 5-bit codes (nmax 31, a 16-step search from rmin -0.5) and a
32-byte field of fifth bits; everything else, including the importance-weighted path, is shared. Q3_K
(`quantize_row_q3_K_ref`: make_q3_quants' coordinate descent per 16 weights; with an imatrix make_qx_quants
for the codes and again for the 16 six-bit sub-block scales) is symmetric like Q6_K.
"""

from __future__ import annotations

import numpy as np

from ondevice.quant.base import (
    QuantType,
    WeightedSearchType,
    fp16_bits,
    fp16_to_f32,
    nearest_int,
    pack_nibbles,
    row_sigma2,
    sequential_sum,
)

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


def _make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric scale/min search for many sub-blocks at once.

    x, weights: float32 (n, S), one sub-block per column. Returns (scale (S,), the_min (S,) >= 0,
    codes (n, S) in 0..nmax) with x ~ scale * code - the_min.

    As in the C code, each candidate scale is laid over the best min found so far (the search is
    sequential per sub-block), so the codes of step k depend on the steps before it.
    """
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    sum_w = sequential_sum(weights)
    sum_x = sequential_sum(weights * x)
    flat = hi == lo  # includes all-zero sub-blocks: codes 0, scale 0
    # C keeps the first of equal values as the minimum: a constant sub-block's min is its first weight, whose sign
    # of zero Q4_1/Q5_1 store (numpy's min over signed zeros may return either)
    lo = np.where(flat, x[0], lo)
    # Scratch arrays reused by every step: the search is bound by memory traffic, and fresh arrays of this
    # size would cost page faults on every allocation.
    work = np.empty_like(x)
    trial = np.empty_like(x)
    wl = np.empty_like(x)
    # Full-size bounds: numpy's minimum/maximum against an array run several times faster than against
    # a scalar (or clip).
    ceiling = np.full_like(x, nmax)
    floor = np.zeros_like(x)

    def codes_for(iscale: np.ndarray, offset: np.ndarray, codes: np.ndarray) -> np.ndarray:
        np.subtract(x, offset, out=codes)
        np.multiply(codes, iscale, out=codes)
        np.rint(codes, out=codes)  # nearest_int(); exact as a float for these magnitudes
        np.minimum(codes, ceiling, out=codes)
        if (offset > lo).any():  # x - offset >= 0 while the offset is the sub-block's minimum
            np.maximum(codes, floor, out=codes)
        return codes

    def weighted_error(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray) -> np.ndarray:
        # C: diff = scale*L + min - x; err += w*diff*diff, each operation rounded to float32.
        np.multiply(codes, scale, out=work)
        np.add(work, offset, out=work)
        np.subtract(work, x, out=work)
        np.multiply(work, work, out=work)
        np.multiply(work, weights, out=work)
        return sequential_sum(work)

    def weighted_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return sequential_sum(np.multiply(a, b, out=work))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cur_min = lo
        iscale = F32(nmax) / np.where(flat, F32(1), hi - lo)
        scale = F32(1) / iscale
        best_error = weighted_error(scale, cur_min, codes_for(iscale, cur_min, trial))
        # Codes are a function of (iscale, min) at the step that won: keep those, rebuild the codes once.
        code_iscale, code_min = iscale, cur_min
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (hi - cur_min)
            codes_for(iscale, cur_min, trial)
            np.multiply(weights, trial, out=wl)
            sum_l = sequential_sum(wl)
            sum_l2 = weighted_sum(wl, trial)
            sum_xl = weighted_sum(wl, x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            # A positive offset is not representable (mins are subtracted): refit the scale through 0.
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, F32(0), this_min)
            error = weighted_error(this_scale, this_min, trial)
            better = (det > 0) & (error < best_error) & ~flat
            if better.any():
                best_error = np.where(better, error, best_error)
                scale = np.where(better, this_scale, scale)
                code_iscale = np.where(better, iscale, code_iscale)
                code_min = np.where(better, cur_min, code_min)
                cur_min = np.where(better, this_min, cur_min)
        codes = codes_for(code_iscale, code_min, np.empty_like(x))

    # Constant sub-blocks (max == min, e.g. all zero): C returns codes 0, scale 0, min kept.
    scale = np.where(flat, F32(0), scale)
    codes[:, flat] = 0
    return scale.astype(F32), (-cur_min).astype(F32), codes.astype(np.uint8)


def _make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (rmse_type 1: weights x^2, or the given importance weights) for many sub-blocks.

    x, weights: float32 (n, S). Returns (scale (S,), codes (n, S) in 0..2*nmax-1) with x ~ scale * (code - nmax).
    """
    idx = np.argmax(np.abs(x), axis=0)  # first of equal magnitudes, as the C loop's strict '>'
    peak = np.take_along_axis(x, idx[None, :], axis=0)[0]
    tiny = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(tiny, F32(1), peak)
    if weights is None:
        weights = x * x
    wx = weights * x
    work = np.empty_like(x)
    trial = np.empty_like(x)
    ceiling = np.full_like(x, nmax - 1)  # array bounds: much faster than scalar ones in numpy
    floor = np.full_like(x, -nmax)

    def levels_for(iscale: np.ndarray, levels: np.ndarray) -> np.ndarray:
        np.multiply(x, iscale, out=levels)
        np.rint(levels, out=levels)
        np.minimum(levels, ceiling, out=levels)
        return np.maximum(levels, floor, out=levels)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels = levels_for(iscale, trial)
        sumlx = sequential_sum(np.multiply(wx, levels, out=work))
        np.multiply(weights, levels, out=work)
        suml2 = sequential_sum(np.multiply(work, levels, out=work))
        return sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-nmax) / peak
        sumlx, suml2 = fit(iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        best_iscale = iscale  # levels depend only on the scale tried: rebuild the winner's at the end
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / peak
            t_sumlx, t_suml2 = fit(iscale)
            better = (t_suml2 > 0) & (t_sumlx * t_sumlx > best * t_suml2)
            scale = np.where(better, t_sumlx / t_suml2, scale).astype(F32)
            best = np.where(better, scale * t_sumlx, best).astype(F32)
            best_iscale = np.where(better, iscale, best_iscale)

    codes = (levels_for(best_iscale, trial) + F32(nmax)).astype(np.uint8)
    codes[:, tiny] = 0  # C: all-zero sub-block -> codes 0 (not nmax), scale 0
    scale = np.where(tiny, F32(0), scale)
    return scale, codes


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse): levels from -nmax/peak, then up to 5 passes of coordinate descent weighted x^2.

    x: float32 (n, S). Returns (scale (S,), codes uint8 (n, S) in 0..2*nmax-1) with x ~ scale * (code - nmax).
    """
    idx = np.argmax(np.abs(x), axis=0)
    peak = np.take_along_axis(x, idx[None, :], axis=0)[0]
    tiny = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(tiny, F32(1), peak)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.clip(nearest_int((F32(-nmax) / peak) * x), -nmax, nmax - 1)
        lf = levels.astype(F32)
        sumlx = sequential_sum(wx * lf)
        suml2 = sequential_sum(w * lf * lf)
        for _ in range(5):  # a block whose pass changed nothing stays unchanged: no per-block early exit needed
            for i in range(x.shape[0]):
                li = levels[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w[i] * li * li
                usable = slx > 0
                new = np.clip(nearest_int(np.where(usable, x[i] * sl2 / np.where(usable, slx, F32(1)), F32(0))),
                              -nmax, nmax - 1)
                nf = new.astype(F32)
                slx_new = slx + wx[i] * nf
                sl2_new = sl2 + w[i] * nf * nf
                accept = usable & (new != levels[i]) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                levels[i] = np.where(accept, new, levels[i])
                sumlx = np.where(accept, slx_new, sumlx).astype(F32)
                suml2 = np.where(accept, sl2_new, suml2).astype(F32)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0)).astype(F32)
    codes = (levels + nmax).astype(np.uint8)
    codes[:, tiny] = 0
    return np.where(tiny, F32(0), scale), codes


def _make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(): a positive scale for non-negative values (the 8 sub-block scales or mins of a Q4_K
    super-block under an imatrix), weighted search over 9 candidates then up to 5 passes of coordinate descent.

    x, weights: float32 (n, S). Returns (scale (S,), codes uint8 (n, S) in 0..nmax), C's uint8 stores included.
    """
    peak = np.maximum(x.max(axis=0), F32(0))
    tiny = peak < GROUP_MAX_EPS
    peak = np.where(tiny, F32(1), peak)

    def mse(scale: np.ndarray, levels: np.ndarray) -> np.ndarray:
        diff = x - scale * levels.astype(F32)
        return sequential_sum(weights * diff * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / peak
        best = mse(F32(1) / iscale, nearest_int(iscale * x) & 0xFF)
        for step in range(-4, 5):
            if step == 0:
                continue
            trial = (F32(0.1) * F32(step) + F32(nmax)) / peak
            error = mse(F32(1) / trial, np.minimum(nmax, nearest_int(trial * x)))
            better = error < best
            best = np.where(better, error, best)
            iscale = np.where(better, trial, iscale).astype(F32)
        levels = np.minimum(nmax, nearest_int(iscale * x)) & 0xFF
        lf = levels.astype(F32)
        wx = weights * x
        sumlx = sequential_sum(wx * lf)
        suml2 = sequential_sum(weights * lf * lf)
        for _ in range(5):  # a block whose pass changed nothing stays unchanged: no per-block early exit needed
            for i in range(x.shape[0]):
                w, li = weights[i], levels[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w * li * li
                usable = (slx > 0) & (sl2 > 0)
                new = np.minimum(nmax, nearest_int(np.where(usable, x[i] * sl2 / np.where(usable, slx, F32(1)),
                                                            F32(0))))
                nf = new.astype(F32)
                slx_new = slx + wx[i] * nf
                sl2_new = sl2 + w * nf * nf
                accept = usable & (new != levels[i]) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                levels[i] = np.where(accept, new & 0xFF, levels[i])
                sumlx = np.where(accept, slx_new, sumlx).astype(F32)
                suml2 = np.where(accept, sl2_new, suml2).astype(F32)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0)).astype(F32)
    levels[:, tiny] = 0
    return np.where(tiny, F32(0), scale), levels.astype(np.uint8)


def _to_uint8_like_c(values: np.ndarray) -> np.ndarray:
    """`uint8_t v = nearest_int(...)`: C keeps the low 8 bits of the int."""
    return (nearest_int(values) & 0xFF).astype(np.uint8)


def _pack_q4k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins per super-block -> the 12-byte field (see get_scale_min_k4)."""
    packed = np.empty((ls.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return packed


def _unpack_q4k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


class Q4_K(QuantType):
    """144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles.

    Weight i of sub-block j: d * scale[j] * q - dmin * min[j].
    """

    name = "q4_k"
    ggml_type = 12
    block_size = QK_K
    type_size = 4 + 12 + QK_K // 2
    native = True
    native_weighted = True
    chunk_blocks = 256  # the search makes ~10 temporaries of the chunk's size: keep them in cache

    # The code range and quantize_row_q4_K_ref's search (rmin, rdelta, steps); Q5_K overrides them.
    nmax = 15
    ref_search = (-1.0, 0.1, 20)

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        nb = blocks.shape[0]
        # (32, nb*8): weight index on axis 0, one column per 32-weight sub-block.
        x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)
        av_x = np.sqrt(sequential_sum(x * x) / F32(32))
        weights = av_x + np.abs(x)
        scales, mins, codes = _make_qkx2_quants(x, weights, self.nmax, *self.ref_search)
        scales = scales.reshape(nb, 8)
        mins = mins.reshape(nb, 8)

        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
        ls = np.minimum(_to_uint8_like_c(inv_scale[:, None] * scales), 63)
        lm = np.minimum(_to_uint8_like_c(inv_min[:, None] * mins), 63)
        d_raw = fp16_bits(max_scale / F32(63), self.name)
        dmin_raw = fp16_bits(max_min / F32(63), self.name)
        packed = _pack_q4k_scales(ls, lm)
        return np.concatenate([d_raw, dmin_raw, packed, self._requantize(x, codes, d_raw, dmin_raw, packed)], axis=1)

    takes_importance = True

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        """quantize_row_q4_K_impl(): weights qw * sqrt(sigma2 + x^2) (sigma2 twice the super-block's mean square),
        make_qkx3_quants per sub-block, the 6-bit scales and mins by make_qp_quants weighted by the sub-block sums."""
        blocks = rows.reshape(-1, QK_K)
        nb = blocks.shape[0]
        sigma2 = row_sigma2(blocks, 2)
        qw = np.broadcast_to(importance.reshape(1, -1), rows.shape).reshape(nb, QK_K)
        weights = qw * np.sqrt(sigma2[:, None] + blocks * blocks)
        x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)
        w = np.ascontiguousarray(weights.reshape(nb * 8, 32).T)
        sub_weight = sequential_sum(w).reshape(nb, 8)
        scales, mins, codes = _make_qkx2_quants(x, w, self.nmax, -0.9, 0.05, 36)
        sw = np.ascontiguousarray(sub_weight.T)
        d_block, ls = _make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 8).T), 63, sw)
        m_block, lm = _make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 8).T), 63, sw)
        packed = _pack_q4k_scales(np.ascontiguousarray(ls.T), np.ascontiguousarray(lm.T))
        d_raw, dmin_raw = fp16_bits(d_block, self.name), fp16_bits(m_block, self.name)
        return np.concatenate([d_raw, dmin_raw, packed, self._requantize(x, codes, d_raw, dmin_raw, packed)], axis=1)

    def _requantize(self, x: np.ndarray, codes: np.ndarray, d_raw: np.ndarray, dmin_raw: np.ndarray,
                    packed: np.ndarray) -> np.ndarray:
        """Every weight against the scale and min actually stored (read back from the packed bytes, as
        get_scale_min_k4 does), the search's codes kept where the stored scale is 0; -> the code bytes."""
        ls, lm = _unpack_q4k_scales(packed)
        d = (fp16_to_f32(d_raw)[:, None] * ls.astype(F32)).reshape(-1)
        dm = (fp16_to_f32(dmin_raw)[:, None] * lm.astype(F32)).reshape(-1)
        usable = d != 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            requant = np.clip(nearest_int((x + dm) / np.where(usable, d, F32(1))), 0, self.nmax).astype(np.uint8)
        codes = np.where(usable, requant, codes)
        return self._pack_codes(codes.T.reshape(packed.shape[0], 4, 2, 32))

    @staticmethod
    def _pack_codes(codes: np.ndarray) -> np.ndarray:
        """(nb, chunk, sub-block of the pair, 32) codes -> 128 bytes: 32 per pair, first sub-block in the low nibbles."""
        return pack_nibbles(codes[:, :, 0], codes[:, :, 1]).reshape(codes.shape[0], 128)

    def _codes(self, blocks: np.ndarray) -> np.ndarray:
        """The stored codes as float32 (nb, 8 sub-blocks, 32)."""
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(F32)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        nb = blocks.shape[0]
        d = fp16_to_f32(blocks[:, 0:2])
        dmin = fp16_to_f32(blocks[:, 2:4])
        scales, mins = _unpack_q4k_scales(blocks[:, 4:16])
        sub_d = (d[:, None] * scales.astype(F32))[:, :, None]
        sub_m = (dmin[:, None] * mins.astype(F32))[:, :, None]
        return (sub_d * self._codes(blocks) - sub_m).reshape(nb, QK_K)


class Q5_K(Q4_K):
    """176 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 32 bytes of fifth bits, 128 bytes of nibbles.

    Weight i of sub-block j: d * scale[j] * q - dmin * min[j], q in 0..31; the low 4 bits as in Q4_K, bit 4 is
    bit j of qh[i].
    """

    name = "q5_k"
    ggml_type = 13
    type_size = 4 + 12 + QK_K // 8 + QK_K // 2
    nmax = 31
    ref_search = (-0.5, 0.1, 15)
    native = True

    @staticmethod
    def _pack_codes(codes: np.ndarray) -> np.ndarray:
        nb = codes.shape[0]
        qs = pack_nibbles(codes[:, :, 0] & 0x0F, codes[:, :, 1] & 0x0F).reshape(nb, 128)
        fifth = (codes.reshape(nb, 8, 32) >> 4).astype(np.uint8)
        qh = np.bitwise_or.reduce(fifth << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        return np.concatenate([qh, qs], axis=1)

    def _codes(self, blocks: np.ndarray) -> np.ndarray:
        low = super()._codes(np.concatenate([blocks[:, :16], blocks[:, 48:]], axis=1))
        qh = blocks[:, 16:48]
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        return low + F32(16) * high.astype(F32)


def _pack_q3k_scales(ls: np.ndarray) -> np.ndarray:
    """16 six-bit sub-block scales (0..63, stored +32) per super-block -> the 12-byte field: low nibbles of 0-7 in
    bytes 0-7's low halves, of 8-15 in their high halves; the top 2 bits of scale j at bits 2*(j//4) of byte 8+j%4."""
    ls = ls.astype(np.uint8)
    packed = np.empty((ls.shape[0], 12), dtype=np.uint8)
    packed[:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    top = (ls >> 4).reshape(-1, 4, 4)  # (block, j // 4, j % 4)
    packed[:, 8:12] = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return packed


def _unpack_q3k_scales(packed: np.ndarray) -> np.ndarray:
    """The 12-byte field -> the 16 signed sub-block scales (stored value - 32) as int (nb, 16)."""
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)
    top = (packed[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3  # (block, j//4, j%4)
    return (low | (top.reshape(-1, 16) << 4)).astype(np.int32) - 32


class Q3_K(WeightedSearchType):
    """110 bytes: 32 bytes of high bits (hmask), 64 bytes of 2-bit low parts, 12 bytes of 6-bit scales, fp16 d.

    Weight e of the super-block: d * (scale[e // 16] - 32) * (low2 + 4 * high - 4), the low 2 bits at bit 2*((e % 128)
    // 32) of qs[32 * (e // 128) + e % 32], the high bit at bit e // 32 of hmask[e % 32].
    """

    name = "q3_k"
    ggml_type = 11
    block_size = QK_K
    type_size = QK_K // 8 + QK_K // 4 + 12 + 2
    native = True
    native_weighted = True
    chunk_blocks = 256

    def _from_search(self, blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        nb = blocks.shape[0]
        x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # (16, nb*16)
        if qw is None:
            # quantize_row_q3_K_ref: the scales quantized against the largest in magnitude.
            scales, codes = _make_q3_quants(x, 4)
            scales = scales.reshape(nb, 16)
            idx = np.argmax(np.abs(scales), axis=1)
            max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
            empty = max_scale == 0
            with np.errstate(divide="ignore"):
                iscale = (F32(-32) / np.where(empty, F32(1), max_scale)).astype(F32)
                d_raw = fp16_bits(np.where(empty, F32(0), F32(1) / iscale), self.name)
            # C: int8_t l = nearest_int(...) (|value| <= 32 here), clamped to -32..31, stored +32.
            ls = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
            ls[empty] = 0  # C leaves the whole scale field zero
        else:
            # quantize_row_q3_K_impl: weights qw * sqrt(sigma2 + x^2), the scales by make_qx_quants(nmax 32)
            # weighted by each sub-block's weight sum.
            sigma2 = row_sigma2(blocks, 2)
            weights = qw * np.sqrt(sigma2[:, None] + blocks * blocks)
            w = np.ascontiguousarray(weights.reshape(nb * 16, 16).T)
            scales, codes = _make_qx_quants(x, 4, w)
            sw = sequential_sum(w).reshape(nb, 16)
            d_block, ls = _make_qx_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 32,
                                          np.ascontiguousarray(sw.T))
            ls = np.ascontiguousarray(ls.T)
            d_raw = fp16_bits(d_block, self.name)
        packed = _pack_q3k_scales(ls)

        # Every weight against the scale actually stored; the search's codes kept where it is 0.
        d = (fp16_to_f32(d_raw)[:, None] * _unpack_q3k_scales(packed).astype(F32)).reshape(-1)
        usable = d != 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            levels = np.clip(nearest_int(x / np.where(usable, d, F32(1))), -4, 3)
        codes = np.where(usable, (levels + 4).astype(np.uint8), codes)
        codes = codes.T.reshape(nb, 2, 4, 32)  # (block, half of 128, group of 32, weight)

        high = (codes > 3).astype(np.uint8)
        hmask = np.bitwise_or.reduce(high.reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        low = codes & 3
        qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(nb, 64)
        return np.concatenate([hmask, qs, packed, d_raw], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        nb = blocks.shape[0]
        hmask = blocks[:, 0:32]
        qs = blocks[:, 32:96].reshape(nb, 2, 1, 32)
        scales = _unpack_q3k_scales(blocks[:, 96:108]).astype(F32)
        d = fp16_to_f32(blocks[:, 108:110])
        low = (qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        high = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = (low.reshape(nb, 8, 32).astype(np.int8) + 4 * high.astype(np.int8) - 4).reshape(nb, 16, 16).astype(F32)
        return ((d[:, None] * scales)[:, :, None] * q).reshape(nb, QK_K)


class Q6_K(WeightedSearchType):
    """210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, fp16 d.

    Weight i of 16-weight sub-block j: d * scale[j] * (q - 32).
    """

    name = "q6_k"
    ggml_type = 14
    block_size = QK_K
    type_size = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2
    native = True
    native_weighted = True
    chunk_blocks = 256

    def _from_search(self, blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        """quantize_row_q6_K_impl(): with an imatrix the importance itself weights make_qx_quants (no sigma2)."""
        nb = blocks.shape[0]
        x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # (16, nb*16)
        weights = None if qw is None else np.ascontiguousarray(qw.reshape(nb * 16, 16).T)
        scales, codes = _make_qx_quants(x, 32, weights)
        scales = scales.reshape(nb, 16)

        idx = np.argmax(np.abs(scales), axis=1)
        max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
        empty = np.abs(max_scale) < GROUP_MAX_EPS  # whole super-block ~0: written as all zero bytes
        with np.errstate(divide="ignore"):
            iscale = (F32(-128) / np.where(empty, F32(1), max_scale)).astype(F32)
            d_raw = fp16_bits(np.where(empty, F32(0), F32(1) / iscale), self.name)
        sub_scales = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
        sub_scales[empty] = 0

        d = (fp16_to_f32(d_raw)[:, None] * sub_scales.astype(F32)).reshape(-1)
        usable = d != 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            levels = np.clip(nearest_int(x / np.where(usable, d, F32(1))), -32, 31)
        codes = np.where(usable, (levels + 32).astype(np.uint8), codes)
        codes = codes.T.reshape(nb, 256)
        codes[empty] = 0
        return np.concatenate([self.pack_codes(codes), sub_scales.view(np.uint8), d_raw], axis=1)

    @staticmethod
    def pack_codes(codes: np.ndarray) -> np.ndarray:
        """(nb, 256) 6-bit codes in weight order -> the 192 bytes of ql and qh."""
        nb = codes.shape[0]
        codes = codes.reshape(nb, 2, 4, 32)  # (block, half of 128, quarter of 32, weight)
        low = codes & 0x0F
        ql = np.concatenate(
            [pack_nibbles(low[:, :, 0], low[:, :, 2]), pack_nibbles(low[:, :, 1], low[:, :, 3])], axis=2
        ).reshape(nb, 128)
        high = codes >> 4
        qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
        return np.concatenate([ql, qh.astype(np.uint8)], axis=1)

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        nb = blocks.shape[0]
        ql = blocks[:, 0:128].reshape(nb, 2, 2, 32)  # (block, half, first/second 32 bytes, byte)
        qh = blocks[:, 128:192].reshape(nb, 2, 1, 32)
        scales = blocks[:, 192:208].view(np.int8).astype(F32)
        d = fp16_to_f32(blocks[:, 208:210])
        low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = ((low | (high << 4)).astype(np.int8) - 32).reshape(nb, 16, 16).astype(F32)
        return ((d[:, None] * scales)[:, :, None] * q).reshape(nb, QK_K)
