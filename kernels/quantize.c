/*
 * Weight quantizers (float32 rows -> GGUF blocks): what `ondevice convert --to gguf` writes, bit for bit the
 * same bytes as the numpy implementations in ondevice/quant/ (which reproduce llama.cpp's reference
 * quantizers without an importance matrix; tests/test_quant.py checks both against libggml).
 *
 * Every intermediate is float32 in the reference's order of operations. Fused multiply-adds would round
 * differently: GCC contracts only in GNU modes (this builds as -std=c11), clang honours the pragma below.
 */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#include <math.h>
#include <string.h>

#include "blocks.h"
#include "od_internal.h"
#include "ondevice_kernels.h"

#define GROUP_MAX_EPS 1e-15f

/* llama.cpp's nearest_int (round half to even) for the magnitudes where its 1.5 * 2^23 trick holds, rintf beyond
 * (the callers clamp the result; numpy's rint agrees everywhere). */
static inline int nearest_int(float v) {
    if (fabsf(v) < 4194304.0f) {
        const float shifted = v + 12582912.0f;
        int32_t bits;
        memcpy(&bits, &shifted, 4);
        return (bits & 0x007FFFFF) - 0x00400000;
    }
    if (!(fabsf(v) < 2147483520.0f)) return v > 0 ? 2147483647 : -2147483647 - 1;
    return (int)rintf(v);
}

/* C's roundf (half away from zero) for |v| < 2^31, without a libm call. */
static inline float round_half_away(float v) {
    const float whole = (float)(int32_t)v;
    const float frac = v - whole;
    if (fabsf(frac) >= 0.5f) return whole + (v > 0 ? 1.0f : -1.0f);
    return whole;
}

static inline float inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

/* fp16 of a block scale; *overflow set when a finite scale does not fit (the caller reports it). */
static inline od_half scale_fp16(float v, int *overflow) {
    const od_half h = od_fp32_to_fp16(v);
    if ((h & 0x7C00u) == 0x7C00u) *overflow = 1;
    return h;
}

/* The value of largest magnitude with its sign; the first one wins ties. */
static inline float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

/* ------------------------------------------------------------------ 32-weight blocks */

static void quantize_q8_0(const float *x, block_q8_0 *y, int64_t nb, int *overflow) {
    for (int64_t b = 0; b < nb; b++, x += OD_QK) {
        float amax = 0.0f;
        for (int j = 0; j < OD_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = inverse(d);
        y[b].d = scale_fp16(d, overflow);
        for (int j = 0; j < OD_QK; j++) y[b].qs[j] = (int8_t)round_half_away(x[j] * id);
    }
}

/* Q4_0 / Q5_0: symmetric, d = signed absmax / -2^(bits-1); codes (int)(x / d + 2^(bits-1) + 0.5). */
static void quantize_q4_0(const float *x, block_q4_0 *y, int64_t nb, int *overflow) {
    for (int64_t b = 0; b < nb; b++, x += OD_QK) {
        const float d = signed_absmax(x, OD_QK) / -8.0f, id = inverse(d);
        y[b].d = scale_fp16(d, overflow);
        for (int j = 0; j < OD_QK / 2; j++) {
            int lo = (int8_t)(x[j] * id + 8.5f), hi = (int8_t)(x[OD_QK / 2 + j] * id + 8.5f);
            lo = lo < 15 ? lo : 15;
            hi = hi < 15 ? hi : 15;
            y[b].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

static void quantize_q5_0(const float *x, block_q5_0 *y, int64_t nb, int *overflow) {
    for (int64_t b = 0; b < nb; b++, x += OD_QK) {
        const float d = signed_absmax(x, OD_QK) / -16.0f, id = inverse(d);
        y[b].d = scale_fp16(d, overflow);
        uint32_t qh = 0;
        for (int j = 0; j < OD_QK / 2; j++) {
            int lo = (int8_t)(x[j] * id + 16.5f), hi = (int8_t)(x[OD_QK / 2 + j] * id + 16.5f);
            lo = lo < 31 ? lo : 31;
            hi = hi < 31 ? hi : 31;
            y[b].qs[j] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
            qh |= ((uint32_t)(lo >> 4) & 1u) << j;
            qh |= ((uint32_t)(hi >> 4) & 1u) << (j + OD_QK / 2);
        }
        memcpy(y[b].qh, &qh, 4);
    }
}

/* Q4_1 / Q5_1: affine over [min, max], codes (int)((x - min) / d + 0.5). */
static void block_range(const float *x, float *lo, float *hi) {
    float mn = x[0], mx = x[0];
    for (int j = 1; j < OD_QK; j++) {
        if (x[j] < mn) mn = x[j];
        if (x[j] > mx) mx = x[j];
    }
    *lo = mn;
    *hi = mx;
}

/* d = (max - min) / levels and m = min stored; returns 1/d (0 for a flat block) and the min. */
static float affine_scale(const float *x, float levels, od_half *d_out, od_half *m_out, float *mn_out, int *overflow) {
    float mn, mx;
    block_range(x, &mn, &mx);
    const float d = (mx - mn) / levels;
    *d_out = scale_fp16(d, overflow);
    *m_out = scale_fp16(mn, overflow);
    *mn_out = mn;
    return inverse(d);
}

static void quantize_q4_1(const float *x, block_q4_1 *y, int64_t nb, int *overflow) {
    for (int64_t b = 0; b < nb; b++, x += OD_QK) {
        float mn;
        const float id = affine_scale(x, 15.0f, &y[b].d, &y[b].m, &mn, overflow);
        for (int j = 0; j < OD_QK / 2; j++) {
            int lo = (int8_t)((x[j] - mn) * id + 0.5f), hi = (int8_t)((x[OD_QK / 2 + j] - mn) * id + 0.5f);
            lo = lo < 15 ? lo : 15;
            hi = hi < 15 ? hi : 15;
            y[b].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

static void quantize_q5_1(const float *x, block_q5_1 *y, int64_t nb, int *overflow) {
    for (int64_t b = 0; b < nb; b++, x += OD_QK) {
        float mn;
        const float id = affine_scale(x, 31.0f, &y[b].d, &y[b].m, &mn, overflow);
        uint32_t qh = 0;
        for (int j = 0; j < OD_QK / 2; j++) {
            const uint8_t lo = (uint8_t)((x[j] - mn) * id + 0.5f), hi = (uint8_t)((x[OD_QK / 2 + j] - mn) * id + 0.5f);
            y[b].qs[j] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
            qh |= ((uint32_t)(lo >> 4) & 1u) << j;
            qh |= ((uint32_t)(hi >> 4) & 1u) << (j + OD_QK / 2);
        }
        memcpy(y[b].qh, &qh, 4);
    }
}

/* ------------------------------------------------------------------ K-quants */

/* The error weights of llama.cpp's importance-weighted quantizers for n values: qw * sqrt(sigma2 + x^2), or x^2
 * without importance (qw NULL); sigma2 is the caller's (a multiple of some span's mean square). */
static void error_weights(const float *x, const float *qw, int n, float sigma2, float *w) {
    for (int j = 0; j < n; j++) w[j] = qw ? qw[j] * sqrtf(sigma2 + x[j] * x[j]) : x[j] * x[j];
}

/* sum of x^2 in index order (each caller forms its sigma2 from it in ggml's own order of operations) */
static float sum_squares(const float *x, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += x[i] * x[i];
    return sum;
}

/*
 * Asymmetric scale/min search of one sub-block (llama.cpp's make_qkx2_quants, no MAD): codes L in 0..nmax with
 * x ~ scale * L - *neg_min. Candidate scales are tried in order, each over the best min found so far.
 */
static float search_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *neg_min,
                              float rmin, float rdelta, int nstep) {
    float mn = x[0], mx = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (mn > 0) mn = 0;
    if (mx == mn) {
        memset(L, 0, (size_t)n);
        *neg_min = -mn;
        return 0.0f;
    }
    float iscale = (float)nmax / (mx - mn), scale = 1.0f / iscale, best_error = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - mn));
        l = l < 0 ? 0 : (l > nmax ? nmax : l);
        L[i] = (uint8_t)l;
        const float diff = scale * (float)l + mn - x[i];
        best_error += w[i] * (diff * diff);
    }
    uint8_t trial[OD_QK];
    for (int step = 0; step <= nstep; step++) {
        iscale = (rmin + rdelta * (float)step + (float)nmax) / (mx - mn);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - mn));
            l = l < 0 ? 0 : (l > nmax ? nmax : l);
            trial[i] = (uint8_t)l;
            const float wl = w[i] * (float)l;
            sum_l += wl;
            sum_l2 += wl * (float)l;
            sum_xl += wl * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0.0f;
            for (int i = 0; i < n; i++) {
                const float diff = this_scale * (float)trial[i] + this_min - x[i];
                error += w[i] * (diff * diff);
            }
            if (error < best_error) {
                memcpy(L, trial, (size_t)n);
                best_error = error;
                scale = this_scale;
                mn = this_min;
            }
        }
    }
    *neg_min = -mn;
    return scale;
}

static void k_min_search_scalar(const float *x, const float *w, const od_k_search *p, uint8_t *L, float *scales,
                                float *neg_mins) {
    for (int j = 0; j < 8; j++)
        scales[j] = search_scale_min(32, p->nmax, x + 32 * j, w + 32 * j, L + 32 * j, &neg_mins[j], p->rmin, p->rdelta,
                                     p->nstep);
}

/* quantize_row_q4_K_ref's / _q5_K_ref's searches, and make_qkx3_quants' of their _impl forms */
static const od_k_search Q4_K_REF = {15, -1.0f, 0.1f, 20}, Q5_K_REF = {31, -0.5f, 0.1f, 15};
static const od_k_search Q4_K_WEIGHTED = {15, -0.9f, 0.05f, 36}, Q5_K_WEIGHTED = {31, -0.9f, 0.05f, 36};

/* make_qp_quants: a positive scale for the n non-negative x (a super-block's sub-block scales or mins) under
 * weights w, 9 candidates then up to 5 passes of coordinate descent; codes L in 0..nmax. */
static float search_positive_scale(int n, int nmax, const float *x, uint8_t *L, const float *w) {
    float max = 0.0f;
    for (int i = 0; i < n; i++)
        if (x[i] > max) max = x[i];
    if (max < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)nmax / max, best_mse = 0.0f;
    for (int i = 0; i < n; i++) L[i] = (uint8_t)nearest_int(iscale * x[i]);
    const float first = 1.0f / iscale;
    for (int i = 0; i < n; i++) {
        const float diff = x[i] - first * (float)L[i];
        best_mse += w[i] * diff * diff;
    }
    for (int step = -4; step <= 4; step++) {
        if (step == 0) continue;
        const float trial = (0.1f * (float)step + (float)nmax) / max, scale = 1.0f / trial;
        float mse = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(trial * x[i]);
            l = l < nmax ? l : nmax;
            const float diff = x[i] - scale * (float)l;
            mse += w[i] * diff * diff;
        }
        if (mse < best_mse) {
            best_mse = mse;
            iscale = trial;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = l < nmax ? l : nmax;
        L[i] = (uint8_t)l;
        sumlx += w[i] * x[i] * (float)l;
        suml2 += w[i] * (float)l * (float)l;
    }
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float slx = sumlx - w[i] * x[i] * (float)L[i], sl2 = suml2 - w[i] * (float)L[i] * (float)L[i];
            if (!(slx > 0.0f && sl2 > 0.0f)) continue;
            int l = nearest_int(x[i] * sl2 / slx);
            l = l < nmax ? l : nmax;
            if (l == L[i]) continue;
            slx += w[i] * x[i] * (float)l;
            sl2 += w[i] * (float)l * (float)l;
            if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                L[i] = (uint8_t)l;
                sumlx = slx;
                suml2 = sl2;
                changed++;
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* One Q4_K / Q5_K super-block: quantize_row_q4_K_ref / _q5_K_ref, or with importance qw (this super-block's 256)
 * quantize_row_q4_K_impl / _q5_K_impl (error weights qw * sqrt(sigma2 + x^2), make_qkx3_quants, the 6-bit scales
 * and mins by make_qp_quants weighted by the sub-blocks' weight sums). Out: the scales and mins packed into
 * `packed`, the fp16 d and dmin, and the codes L in 0..nmax against the scale and min actually stored. */
static void quantize_k_min_superblock(const float *x, const float *qw, int nmax, od_half *d_out, od_half *dmin_out,
                                      uint8_t *packed, uint8_t *L, int *overflow) {
    const od_isa_ops *ops = od_ops();
    void (*search)(const float *, const float *, const od_k_search *, uint8_t *, float *, float *) =
        ops->k_min_search ? ops->k_min_search : k_min_search_scalar;
    float weights[OD_QK_K], mins[8], scales[8];
    uint8_t ls[8], lm[8];
    float d_block, m_block;
    if (qw) {
        float sub_weights[8];
        error_weights(x, qw, OD_QK_K, 2.0f * sum_squares(x, OD_QK_K) / (float)OD_QK_K, weights);
        for (int j = 0; j < 8; j++) {
            sub_weights[j] = 0.0f;
            for (int l = 32 * j; l < 32 * j + 32; l++) sub_weights[j] += weights[l];
        }
        search(x, weights, nmax == 15 ? &Q4_K_WEIGHTED : &Q5_K_WEIGHTED, L, scales, mins);
        d_block = search_positive_scale(8, 63, scales, ls, sub_weights);
        m_block = search_positive_scale(8, 63, mins, lm, sub_weights);
    } else {
        for (int j = 0; j < 8; j++) {
            const float *xs = x + 32 * j;
            float sum_x2 = 0.0f;
            for (int l = 0; l < 32; l++) sum_x2 += xs[l] * xs[l];
            const float av_x = sqrtf(sum_x2 / 32.0f);
            for (int l = 0; l < 32; l++) weights[32 * j + l] = av_x + fabsf(xs[l]);
        }
        search(x, weights, nmax == 15 ? &Q4_K_REF : &Q5_K_REF, L, scales, mins);
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 8; j++) {
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
        const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
        for (int j = 0; j < 8; j++) {
            ls[j] = (uint8_t)nearest_int(inv_scale * scales[j]);
            lm[j] = (uint8_t)nearest_int(inv_min * mins[j]);
            if (ls[j] > 63) ls[j] = 63;
            if (lm[j] > 63) lm[j] = 63;
        }
        d_block = max_scale / 63.0f;
        m_block = max_min / 63.0f;
    }
    for (int j = 0; j < 4; j++) {
        packed[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        packed[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        packed[j + 8] = (uint8_t)((ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4));
    }
    const od_half d_half = scale_fp16(d_block, overflow), dmin_half = scale_fp16(m_block, overflow);
    memcpy(d_out, &d_half, 2);
    memcpy(dmin_out, &dmin_half, 2);
    /* the codes again, against the scale and min actually stored (fp16 x 6 bits) */
    const float d_all = od_fp16_to_fp32(d_half), dmin_all = od_fp16_to_fp32(dmin_half);
    for (int j = 0; j < 8; j++) {
        const float d = d_all * (float)ls[j];
        if (d == 0.0f) continue;
        const float dm = dmin_all * (float)lm[j];
        for (int l = 0; l < 32; l++) {
            const int q = nearest_int((x[32 * j + l] + dm) / d);
            L[32 * j + l] = (uint8_t)(q < 0 ? 0 : (q > nmax ? nmax : q));
        }
    }
}

static void quantize_q4_k(const float *x, const float *qw, block_q4_K *y, int64_t nb, int *overflow) {
    uint8_t L[OD_QK_K];
    for (int64_t b = 0; b < nb; b++, x += OD_QK_K) {
        quantize_k_min_superblock(x, qw ? qw + b * OD_QK_K : NULL, 15, &y[b].d, &y[b].dmin, y[b].scales, L, overflow);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) y[b].qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

static void quantize_q5_k(const float *x, const float *qw, block_q5_K *y, int64_t nb, int *overflow) {
    uint8_t L[OD_QK_K];
    for (int64_t b = 0; b < nb; b++, x += OD_QK_K) {
        quantize_k_min_superblock(x, qw ? qw + b * OD_QK_K : NULL, 31, &y[b].d, &y[b].dmin, y[b].scales, L, overflow);
        memset(y[b].qh, 0, sizeof(y[b].qh));
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const uint8_t lo = L[64 * c + l], hi = L[64 * c + 32 + l];
                y[b].qs[32 * c + l] = (uint8_t)((lo & 0x0F) | ((hi & 0x0F) << 4));
                y[b].qh[l] |= (uint8_t)(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
            }
    }
}

/* Symmetric scale search of one sub-block (llama.cpp's make_qx_quants, rmse_type 1: weights qw, or x^2 without):
 * codes L in 0..2*nmax-1 with x ~ scale * (L - nmax). */
static float search_scale_weighted(int n, int nmax, const float *x, const float *qw, uint8_t *L) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; i++) {
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)-nmax / max, sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
        L[i] = (uint8_t)(l + nmax);
        const float w = qw ? qw[i] : x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int step = -9; step <= 9; step++) {
        if (step == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)step) / max;
        sumlx = suml2 = 0.0f;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
            const float w = qw ? qw[i] : x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                int l = nearest_int(iscale * x[i]);
                l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
                L[i] = (uint8_t)(l + nmax);
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void q6_k_search_scalar(const float *x, const float *qw, uint8_t *L, float *scales) {
    for (int j = 0; j < 16; j++) scales[j] = search_scale_weighted(16, 32, x + 16 * j, qw ? qw + 16 * j : NULL, L + 16 * j);
}

/* quantize_row_q6_K_ref, or with importance qw (per weight of the row) quantize_row_q6_K_impl: the same but for
 * the sub-block search, weighted by qw itself (no sigma2 term). */
static void quantize_q6_k(const float *x, const float *qw, block_q6_K *y, int64_t nb, int *overflow) {
    const od_isa_ops *ops = od_ops();
    void (*search)(const float *, const float *, uint8_t *, float *) =
        ops->q6_k_search ? ops->q6_k_search : q6_k_search_scalar;
    uint8_t L[OD_QK_K];
    float scales[16];
    for (int64_t b = 0; b < nb; b++, x += OD_QK_K) {
        search(x, qw ? qw + b * OD_QK_K : NULL, L, scales);
        float max_scale = 0.0f, max_abs_scale = 0.0f;
        for (int j = 0; j < 16; j++) {
            if (fabsf(scales[j]) > max_abs_scale) {
                max_abs_scale = fabsf(scales[j]);
                max_scale = scales[j];
            }
        }
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(&y[b], 0, sizeof(y[b]));
            continue;
        }
        const float iscale = -128.0f / max_scale;
        y[b].d = scale_fp16(1.0f / iscale, overflow);
        for (int j = 0; j < 16; j++) {
            const int s = nearest_int(iscale * scales[j]);
            y[b].scales[j] = (int8_t)(s < 127 ? s : 127);
        }
        const float d_all = od_fp16_to_fp32(y[b].d);
        for (int j = 0; j < 16; j++) {
            const float d = d_all * (float)y[b].scales[j];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; l++) {
                int q = nearest_int(x[16 * j + l] / d);
                q = q < -32 ? -32 : (q > 31 ? 31 : q);
                L[16 * j + l] = (uint8_t)(q + 32);
            }
        }
        for (int h = 0; h < 2; h++) {
            const uint8_t *Lh = L + 128 * h;
            uint8_t *ql = y[b].ql + 64 * h, *qh = y[b].qh + 32 * h;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((Lh[l] & 0x0F) | ((Lh[l + 64] & 0x0F) << 4));
                ql[l + 32] = (uint8_t)((Lh[l + 32] & 0x0F) | ((Lh[l + 96] & 0x0F) << 4));
                qh[l] = (uint8_t)((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                                  ((Lh[l + 96] >> 4) << 6));
            }
        }
    }
}

/* ------------------------------------------------------------------ legacy types with importance */

/* llama.cpp's quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl: error weights with sigma2 the whole row's mean square (n
 * weights), then make_qx_quants (symmetric) or make_qkx3_quants (affine, no MAD) per block. */
/* Codes L of one block into qs (low nibbles: weights 0-15, high: 16-31) and, for 5 bits, the fifth bits. */
static void pack_legacy_codes(const uint8_t *L, uint8_t *qs, uint8_t *qh) {
    uint32_t high = 0;
    for (int j = 0; j < OD_QK / 2; j++) {
        qs[j] = (uint8_t)((L[j] & 0x0F) | ((L[j + OD_QK / 2] & 0x0F) << 4));
        high |= ((uint32_t)(L[j] >> 4) & 1u) << j;
        high |= ((uint32_t)(L[j + OD_QK / 2] >> 4) & 1u) << (j + OD_QK / 2);
    }
    if (qh) memcpy(qh, &high, 4);
}

static void quantize_legacy_weighted(int type, const float *x, const float *qw, void *y, int64_t n, int *overflow) {
    const float sigma2 = sum_squares(x, n) / (float)n;
    float w[OD_QK];
    uint8_t L[OD_QK];
    for (int64_t b = 0; b < n / OD_QK; b++) {
        const float *xb = x + b * OD_QK;
        error_weights(xb, qw + b * OD_QK, OD_QK, sigma2, w);
        if (type == OD_TYPE_Q4_0 || type == OD_TYPE_Q5_0) {
            const float d = search_scale_weighted(OD_QK, type == OD_TYPE_Q4_0 ? 8 : 16, xb, w, L);
            if (type == OD_TYPE_Q4_0) {
                block_q4_0 *blk = (block_q4_0 *)y + b;
                blk->d = scale_fp16(d, overflow);
                pack_legacy_codes(L, blk->qs, NULL);
            } else {
                block_q5_0 *blk = (block_q5_0 *)y + b;
                blk->d = scale_fp16(d, overflow);
                pack_legacy_codes(L, blk->qs, blk->qh);
            }
        } else {
            float the_min;
            const float d = search_scale_min(OD_QK, type == OD_TYPE_Q4_1 ? 15 : 31, xb, w, L, &the_min, -0.9f, 0.05f, 36);
            if (type == OD_TYPE_Q4_1) {
                block_q4_1 *blk = (block_q4_1 *)y + b;
                blk->d = scale_fp16(d, overflow);
                blk->m = scale_fp16(-the_min, overflow);
                pack_legacy_codes(L, blk->qs, NULL);
            } else {
                block_q5_1 *blk = (block_q5_1 *)y + b;
                blk->d = scale_fp16(d, overflow);
                blk->m = scale_fp16(-the_min, overflow);
                pack_legacy_codes(L, blk->qs, blk->qh);
            }
        }
    }
}

/* ------------------------------------------------------------------ Q3_K */

/* make_q3_quants(do_rmse) on 16 weights, nmax 4: levels from the peak, then up to 5 passes of coordinate descent
 * weighted x^2; codes L in 0..7 with x ~ scale * (L - 4). */
static float q3_k_sub_block(const float *x, uint8_t *L) {
    const int nmax = 4;
    const float max = signed_absmax(x, 16);
    if (fabsf(max) < GROUP_MAX_EPS) {
        memset(L, 0, 16);
        return 0.0f;
    }
    const float iscale = (float)-nmax / max;
    int lv[16];
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < 16; i++) {
        int l = nearest_int(iscale * x[i]);
        lv[i] = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * (float)lv[i];
        suml2 += w * (float)lv[i] * (float)lv[i];
    }
    for (int itry = 0; itry < 5; itry++) {
        int changed = 0;
        for (int i = 0; i < 16; i++) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * (float)lv[i];
            if (slx > 0) {
                float sl2 = suml2 - w * (float)lv[i] * (float)lv[i];
                int nl = nearest_int(x[i] * sl2 / slx);
                nl = nl < -nmax ? -nmax : (nl > nmax - 1 ? nmax - 1 : nl);
                if (nl != lv[i]) {
                    slx += w * x[i] * (float)nl;
                    sl2 += w * (float)nl * (float)nl;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        lv[i] = nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < 16; i++) L[i] = (uint8_t)(lv[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Scale j (stored 0..63) into the 12-byte field (see block_q3_K); the field starts zeroed. */
static inline void q3_k_put_scale(uint8_t *packed, int j, int l) {
    packed[j % 8] |= (uint8_t)((l & 0x0F) << (4 * (j / 8)));
    packed[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
}

/* quantize_row_q3_K_ref (qw NULL) / quantize_row_q3_K_impl (importance qw per weight of the row). */
static void quantize_q3_k(const float *x, const float *qw, block_q3_K *y, int64_t nb, int *overflow) {
    uint8_t L[OD_QK_K];
    float scales[16], weight[OD_QK_K], sw[16];
    for (int64_t b = 0; b < nb; b++, x += OD_QK_K) {
        memset(y[b].scales, 0, 12);
        if (!qw) {
            for (int j = 0; j < 16; j++) scales[j] = q3_k_sub_block(x + 16 * j, L + 16 * j);
            const float max_scale = signed_absmax(scales, 16);
            if (max_scale != 0.0f) {
                const float iscale = -32.0f / max_scale;
                for (int j = 0; j < 16; j++) {
                    int l = (int8_t)nearest_int(iscale * scales[j]);  /* C stores it in an int8_t first */
                    l = (l < -32 ? -32 : (l > 31 ? 31 : l)) + 32;
                    q3_k_put_scale(y[b].scales, j, l);
                }
                y[b].d = scale_fp16(1.0f / iscale, overflow);
            } else {
                y[b].d = 0;
            }
        } else {
            error_weights(x, qw + b * OD_QK_K, OD_QK_K, 2.0f * sum_squares(x, OD_QK_K) / (float)OD_QK_K, weight);
            for (int j = 0; j < 16; j++) {
                sw[j] = 0.0f;
                for (int l = 16 * j; l < 16 * j + 16; l++) sw[j] += weight[l];
                scales[j] = search_scale_weighted(16, 4, x + 16 * j, weight + 16 * j, L + 16 * j);
            }
            uint8_t Ls[16];
            const float d_block = search_scale_weighted(16, 32, scales, sw, Ls);
            for (int j = 0; j < 16; j++) q3_k_put_scale(y[b].scales, j, Ls[j]);
            y[b].d = scale_fp16(d_block, overflow);
        }
        int8_t sc[16];
        od_q3k_scales(y[b].scales, sc);
        const float d_all = od_fp16_to_fp32(y[b].d);
        for (int j = 0; j < 16; j++) {
            const float d = d_all * (float)sc[j];
            if (d == 0.0f) continue;
            for (int l = 0; l < 16; l++) {
                int q = nearest_int(x[16 * j + l] / d);
                q = q < -4 ? -4 : (q > 3 ? 3 : q);
                L[16 * j + l] = (uint8_t)(q + 4);
            }
        }
        memset(y[b].hmask, 0, sizeof(y[b].hmask));
        for (int e = 0; e < OD_QK_K; e++)
            if (L[e] > 3) {
                y[b].hmask[e % 32] |= (uint8_t)(1u << (e / 32));
                L[e] -= 4;
            }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *Lh = L + 128 * h;
                y[b].qs[32 * h + l] = (uint8_t)(Lh[l] | (Lh[l + 32] << 2) | (Lh[l + 64] << 4) | (Lh[l + 96] << 6));
            }
    }
}

/* ------------------------------------------------------------------ IQ4_NL / IQ4_XS */

/* ggml's best_index_int8 over the 16 levels: the nearest one, the lower on a tie. */
static inline int iq4_best_index(float x) {
    const int8_t *val = od_iq4_levels;
    if (x <= val[0]) return 0;
    if (!(x < val[15])) return 15;  /* NaN too, where ggml's binary search ends */
    /* ggml's binary search finds val[ml] <= x < val[ml + 1]; counting is the same without its unpredictable branches */
    int ml = 0;
    for (int k = 1; k < 15; k++) ml += x >= (float)val[k];
    return x - val[ml] < val[ml + 1] - x ? ml : ml + 1;
}

/* The scale of one 32-weight block (quantize_row_iq4_nl_impl as ggml_quantize_chunk runs it, ntry 7): the peak's
 * scale, then 15 candidates, each scored by the weighted least-squares fit of the levels. 0 for a block of ~0. */
static float iq4_block_scale(const float *x, const float *w) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < OD_QK; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    if (amax < GROUP_MAX_EPS) return 0.0f;
    float id = 1.0f / (-max / (float)od_iq4_levels[0]), sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < OD_QK; j++) {
        const float q = od_iq4_levels[iq4_best_index(id * x[j])];
        sumqx += w[j] * q * x[j];
        sumq2 += w[j] * q * q;
    }
    float d = sumq2 > 0 ? sumqx / sumq2 : 0.0f, best = d * sumqx;
    for (int itry = -7; itry <= 7; itry++) {
        id = (float)(itry + od_iq4_levels[0]) / max;
        sumqx = sumq2 = 0.0f;
        for (int j = 0; j < OD_QK; j++) {
            const float q = od_iq4_levels[iq4_best_index(id * x[j])];
            sumqx += w[j] * q * x[j];
            sumq2 += w[j] * q * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

static void iq4_pack(const float *x, float inv_scale, uint8_t *qs) {
    for (int j = 0; j < OD_QK / 2; j++)
        qs[j] = (uint8_t)(iq4_best_index(inv_scale * x[j]) | (iq4_best_index(inv_scale * x[j + 16]) << 4));
}

static void quantize_iq4_nl(const float *x, const float *qw, block_iq4_nl *y, int64_t nb, int *overflow) {
    float w[OD_QK];
    for (int64_t b = 0; b < nb; b++, x += OD_QK) {
        error_weights(x, qw ? qw + b * OD_QK : NULL, OD_QK, sum_squares(x, OD_QK) * (2.0f / (float)OD_QK), w);
        const float d = iq4_block_scale(x, w);
        y[b].d = scale_fp16(d, overflow);
        iq4_pack(x, inverse(d), y[b].qs);  /* against the float scale, not its fp16 rounding, as ggml does */
    }
}

static void quantize_iq4_xs(const float *x, const float *qw, block_iq4_xs *y, int64_t nb, int *overflow) {
    float w[OD_QK_K], scales[8];
    for (int64_t b = 0; b < nb; b++, x += OD_QK_K) {
        error_weights(x, qw ? qw + b * OD_QK_K : NULL, OD_QK_K, sum_squares(x, OD_QK_K) * (2.0f / (float)OD_QK_K), w);
        float max_scale = 0.0f, amax_scale = 0.0f;
        for (int ib = 0; ib < 8; ib++) {
            scales[ib] = iq4_block_scale(x + 32 * ib, w + 32 * ib);
            if (fabsf(scales[ib]) > amax_scale) {
                amax_scale = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        const float d = -max_scale / 32.0f, id = inverse(d);
        y[b].d = scale_fp16(d, overflow);
        uint16_t scales_h = 0;
        for (int ib = 0; ib < 8; ib++) {
            int l = nearest_int(id * scales[ib]);
            l = l < -32 ? -32 : (l > 31 ? 31 : l);
            iq4_pack(x + 32 * ib, inverse(d * (float)l), y[b].qs + 16 * ib);
            l += 32;
            if (ib % 2 == 0) y[b].scales_l[ib / 2] = (uint8_t)(l & 0x0F);
            else y[b].scales_l[ib / 2] |= (uint8_t)((l & 0x0F) << 4);
            scales_h |= (uint16_t)((l >> 4) << (2 * ib));
        }
        memcpy(&y[b].scales_h, &scales_h, 2);
    }
}

/* ------------------------------------------------------------------ rows, in parallel */

typedef struct {
    int type;
    uint8_t *dst;
    const float *src, *importance;
    int64_t nrows, n, row_bytes, rows_per_task;
    int overflow[64];  /* one flag per task slot (t % 64): no shared write between threads */
} quant_job;

static void quantize_one_row(int type, const float *x, const float *importance, void *y, int64_t n, int *overflow) {
    if (importance && (type == OD_TYPE_Q4_0 || type == OD_TYPE_Q4_1 || type == OD_TYPE_Q5_0 || type == OD_TYPE_Q5_1)) {
        quantize_legacy_weighted(type, x, importance, y, n, overflow);
        return;
    }
    switch (type) {
    case OD_TYPE_Q8_0: quantize_q8_0(x, y, n / OD_QK, overflow); break;
    case OD_TYPE_Q4_0: quantize_q4_0(x, y, n / OD_QK, overflow); break;
    case OD_TYPE_Q4_1: quantize_q4_1(x, y, n / OD_QK, overflow); break;
    case OD_TYPE_Q5_0: quantize_q5_0(x, y, n / OD_QK, overflow); break;
    case OD_TYPE_Q5_1: quantize_q5_1(x, y, n / OD_QK, overflow); break;
    case OD_TYPE_Q3_K: quantize_q3_k(x, importance, y, n / OD_QK_K, overflow); break;
    case OD_TYPE_Q4_K: quantize_q4_k(x, importance, y, n / OD_QK_K, overflow); break;
    case OD_TYPE_Q5_K: quantize_q5_k(x, importance, y, n / OD_QK_K, overflow); break;
    case OD_TYPE_Q6_K: quantize_q6_k(x, importance, y, n / OD_QK_K, overflow); break;
    case OD_TYPE_IQ4_NL: quantize_iq4_nl(x, importance, y, n / OD_QK, overflow); break;
    case OD_TYPE_IQ4_XS: quantize_iq4_xs(x, importance, y, n / OD_QK_K, overflow); break;
    default: break;
    }
}

static void quant_task(void *ctx, int64_t t) {
    quant_job *job = ctx;
    const int64_t r0 = t * job->rows_per_task;
    const int64_t r1 = r0 + job->rows_per_task < job->nrows ? r0 + job->rows_per_task : job->nrows;
    int overflow = 0;
    for (int64_t r = r0; r < r1; r++)
        quantize_one_row(job->type, job->src + r * job->n, job->importance, job->dst + r * job->row_bytes, job->n,
                         &overflow);
    if (overflow) job->overflow[t % 64] = 1;
}

int od_quantize_rows(void *dst, const float *src, int type, int64_t nrows, int64_t n) {
    return od_quantize_rows_imatrix(dst, src, type, nrows, n, NULL);
}

int od_quantize_rows_imatrix(void *dst, const float *src, int type, int64_t nrows, int64_t n, const float *importance) {
    /* the importance-weighted quantizers implemented here; numpy (ondevice/quant) has all of them */
    if (importance && type == OD_TYPE_Q8_0) return OD_ETYPE; /* ggml weights no Q8_0 rounding */
    const int64_t block = (type == OD_TYPE_Q3_K || type == OD_TYPE_Q4_K || type == OD_TYPE_Q5_K || type == OD_TYPE_Q6_K || type == OD_TYPE_IQ4_XS)
                              ? OD_QK_K : OD_QK;
    switch (type) {
    case OD_TYPE_Q8_0: case OD_TYPE_Q4_0: case OD_TYPE_Q4_1: case OD_TYPE_Q5_0: case OD_TYPE_Q5_1:
    case OD_TYPE_Q3_K: case OD_TYPE_Q4_K: case OD_TYPE_Q5_K: case OD_TYPE_Q6_K: case OD_TYPE_IQ4_NL:
    case OD_TYPE_IQ4_XS: break;
    default: return OD_ETYPE;
    }
    if (nrows < 0 || n <= 0 || n % block != 0) return OD_EINVAL;
    if (nrows == 0) return OD_OK;
    quant_job job = {.type = type, .dst = dst, .src = src, .importance = importance, .nrows = nrows, .n = n,
                     .row_bytes = od_row_nbytes(type, n)};
    /* ~64k weights per task: enough to hide the pool's hand-off, small enough to balance */
    job.rows_per_task = (65536 + n - 1) / n;
    const int64_t n_tasks = (nrows + job.rows_per_task - 1) / job.rows_per_task;
    if (od_pool_threads() > 1 && n_tasks > 1) {
        od_pool_run(quant_task, &job, n_tasks);
    } else {
        for (int64_t t = 0; t < n_tasks; t++) quant_task(&job, t);
    }
    for (int i = 0; i < 64; i++)
        if (job.overflow[i]) return OD_ERANGE;
    return OD_OK;
}
