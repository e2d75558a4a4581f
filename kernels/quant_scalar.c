/*
 * Reference (portable C) kernels for quantization-related work: activation quantization, row
 * dequantization and matmul for every supported weight type. The SIMD files must agree with these
 * up to float summation order; the tests enforce it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "od_internal.h"

/* ------------------------------------------------------------------ activations */

static float block_amax_scalar(const float *xb) {
    float amax = 0.0f;
    for (int j = 0; j < OD_QK; j++) {
        const float a = fabsf(xb[j]);
        amax = a > amax ? a : amax;
    }
    return amax;
}

static int quantize_block_scalar(const float *xb, float id, int8_t *qb) {
    int sum = 0;
    for (int j = 0; j < OD_QK; j++) {
        /* nearbyintf rounds half to even, like the SIMD paths' round instruction; the clamp only
         * matters for inf/NaN inputs (keeps the conversion defined) */
        const float v = xb[j] * id;
        const int q = v == v ? (int)nearbyintf(fminf(fmaxf(v, -127.0f), 127.0f)) : 0;
        qb[j] = (int8_t)q;
        sum += q;
    }
    return sum;
}

void od_quantize_act_scalar(const float *x, od_q8_act *act, int64_t m0, int64_t m1) {
    od_quantize_act_rows(x, act, m0, m1, block_amax_scalar, quantize_block_scalar);
}

/* ------------------------------------------------------------------ generic block unpacking */

/*
 * Every supported quantized format, viewed per 32 weights, is w[j] = dw * qv[j] + mw with small
 * integers qv. Q6_K folds its per-16 integer scale into qv (|qv| <= 32 * 128).
 */
static void unpack_block32(int type, const uint8_t *row, int64_t b, int16_t *qv, float *dw, float *mw) {
    switch (type) {
    case OD_TYPE_Q4_0: {
        const block_q4_0 *blk = (const block_q4_0 *)row + b;
        for (int j = 0; j < 16; j++) {
            qv[j] = (int16_t)((blk->qs[j] & 0x0F) - 8);
            qv[j + 16] = (int16_t)((blk->qs[j] >> 4) - 8);
        }
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = 0.0f;
        break;
    }
    case OD_TYPE_Q4_1: {
        const block_q4_1 *blk = (const block_q4_1 *)row + b;
        for (int j = 0; j < 16; j++) {
            qv[j] = (int16_t)(blk->qs[j] & 0x0F);
            qv[j + 16] = (int16_t)(blk->qs[j] >> 4);
        }
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = od_fp16_to_fp32(od_read_u16(&blk->m));
        break;
    }
    case OD_TYPE_Q5_0: {
        const block_q5_0 *blk = (const block_q5_0 *)row + b;
        const uint32_t qh = od_read_u32(blk->qh);
        for (int j = 0; j < 16; j++) {
            qv[j] = (int16_t)(((blk->qs[j] & 0x0F) | (((qh >> j) & 1u) << 4)) - 16);
            qv[j + 16] = (int16_t)(((blk->qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16);
        }
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = 0.0f;
        break;
    }
    case OD_TYPE_Q5_1: {
        const block_q5_1 *blk = (const block_q5_1 *)row + b;
        const uint32_t qh = od_read_u32(blk->qh);
        for (int j = 0; j < 16; j++) {
            qv[j] = (int16_t)((blk->qs[j] & 0x0F) | (((qh >> j) & 1u) << 4));
            qv[j + 16] = (int16_t)((blk->qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4));
        }
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = od_fp16_to_fp32(od_read_u16(&blk->m));
        break;
    }
    case OD_TYPE_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        for (int j = 0; j < 32; j++) qv[j] = blk->qs[j];
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = 0.0f;
        break;
    }
    case OD_TYPE_Q4_K: {
        const block_q4_K *blk = (const block_q4_K *)row + b / 8;
        const int sub = (int)(b % 8);
        const uint8_t *qs = blk->qs + (sub / 2) * 32;
        const int shift = (sub % 2) * 4;
        for (int j = 0; j < 32; j++) qv[j] = (int16_t)((qs[j] >> shift) & 0x0F);
        uint8_t sc, mn;
        od_q4k_scale_min(sub, blk->scales, &sc, &mn);
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d)) * (float)sc;
        *mw = -(od_fp16_to_fp32(od_read_u16(&blk->dmin)) * (float)mn);
        break;
    }
    case OD_TYPE_Q5_K: {
        const block_q5_K *blk = (const block_q5_K *)row + b / 8;
        const int sub = (int)(b % 8);
        const uint8_t *qs = blk->qs + (sub / 2) * 32;
        const int shift = (sub % 2) * 4;
        for (int j = 0; j < 32; j++) qv[j] = (int16_t)(((qs[j] >> shift) & 0x0F) | (((blk->qh[j] >> sub) & 1) << 4));
        uint8_t sc, mn;
        od_q4k_scale_min(sub, blk->scales, &sc, &mn);
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d)) * (float)sc;
        *mw = -(od_fp16_to_fp32(od_read_u16(&blk->dmin)) * (float)mn);
        break;
    }
    case OD_TYPE_IQ4_NL:
    case OD_TYPE_IQ4_XS: {
        const uint8_t *qs;
        if (type == OD_TYPE_IQ4_NL) {
            const block_iq4_nl *blk = (const block_iq4_nl *)row + b;
            qs = blk->qs;
            *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        } else {
            const block_iq4_xs *blk = (const block_iq4_xs *)row + b / 8;
            qs = blk->qs + 16 * (b % 8);
            *dw = od_fp16_to_fp32(od_read_u16(&blk->d)) * (float)od_iq4_xs_scale(blk, (int)(b % 8));
        }
        for (int j = 0; j < 16; j++) {
            qv[j] = od_iq4_levels[qs[j] & 0x0F];
            qv[j + 16] = od_iq4_levels[qs[j] >> 4];
        }
        *mw = 0.0f;
        break;
    }
    case OD_TYPE_Q3_K: {
        const block_q3_K *blk = (const block_q3_K *)row + b / 8;
        const int sub = (int)(b % 8);
        const uint8_t *qs = blk->qs + 32 * (sub / 4);
        const int shift = 2 * (sub % 4);
        int8_t sc[16];
        od_q3k_scales(blk->scales, sc);
        for (int j = 0; j < 32; j++) {
            const int q = (((qs[j] >> shift) & 3) | (((blk->hmask[j] >> sub) & 1) << 2)) - 4;
            qv[j] = (int16_t)(q * sc[sub * 2 + j / 16]);
        }
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = 0.0f;
        break;
    }
    case OD_TYPE_Q6_K: {
        const block_q6_K *blk = (const block_q6_K *)row + b / 8;
        const int sub = (int)(b % 8);      /* 32-weight sub-block 0..7 */
        const int half = sub / 4, part = sub % 4;
        const uint8_t *ql = blk->ql + 64 * half + (part & 1) * 32;
        const uint8_t *qh = blk->qh + 32 * half;
        const int low_shift = (part >> 1) * 4, high_shift = part * 2;
        for (int j = 0; j < 32; j++) {
            const int q = ((ql[j] >> low_shift) & 0x0F) | (((qh[j] >> high_shift) & 3) << 4);
            qv[j] = (int16_t)((q - 32) * blk->scales[sub * 2 + j / 16]);
        }
        *dw = od_fp16_to_fp32(od_read_u16(&blk->d));
        *mw = 0.0f;
        break;
    }
    default:
        memset(qv, 0, 32 * sizeof(int16_t));
        *dw = 0.0f;
        *mw = 0.0f;
    }
}

/* ------------------------------------------------------------------ dequantization */

static void dequant_row_quant(int type, const uint8_t *row, float *out, int64_t k) {
    int16_t qv[32];
    float dw, mw;
    for (int64_t b = 0; b < k / OD_QK; b++) {
        unpack_block32(type, row, b, qv, &dw, &mw);
        for (int j = 0; j < 32; j++) out[b * 32 + j] = dw * (float)qv[j] + mw;
    }
}

/* Q6_K on its own so the rounding matches ggml / gguf-py: (d * scale) * (q - 32). */
void od_dequant_q6_k_scalar(const uint8_t *row, float *out, int64_t k) {
    for (int64_t sb = 0; sb < k / OD_QK_K; sb++) {
        const block_q6_K *blk = (const block_q6_K *)row + sb;
        const float d = od_fp16_to_fp32(od_read_u16(&blk->d));
        for (int sub = 0; sub < 8; sub++) {
            const int half = sub / 4, part = sub % 4;
            const uint8_t *ql = blk->ql + 64 * half + (part & 1) * 32;
            const uint8_t *qh = blk->qh + 32 * half;
            const int low_shift = (part >> 1) * 4, high_shift = part * 2;
            for (int j = 0; j < 32; j++) {
                const int q = ((ql[j] >> low_shift) & 0x0F) | (((qh[j] >> high_shift) & 3) << 4);
                out[sb * OD_QK_K + sub * 32 + j] = (d * (float)blk->scales[sub * 2 + j / 16]) * (float)(q - 32);
            }
        }
    }
}

/* Q3_K likewise: (d * (scale - 32)) * (q - 4), as dequantize_row_q3_K. */
void od_dequant_q3_k_scalar(const uint8_t *row, float *out, int64_t k) {
    for (int64_t sb = 0; sb < k / OD_QK_K; sb++) {
        const block_q3_K *blk = (const block_q3_K *)row + sb;
        const float d = od_fp16_to_fp32(od_read_u16(&blk->d));
        int8_t sc[16];
        od_q3k_scales(blk->scales, sc);
        for (int e = 0; e < OD_QK_K; e++) {
            const int q = (((blk->qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3) |
                           (((blk->hmask[e % 32] >> (e / 32)) & 1) << 2)) - 4;
            out[sb * OD_QK_K + e] = (d * (float)sc[e / 16]) * (float)q;
        }
    }
}

#define DEQUANT_FN(NAME, TYPE) \
    void NAME(const uint8_t *row, float *out, int64_t k) { dequant_row_quant(TYPE, row, out, k); }
DEQUANT_FN(od_dequant_q4_0_scalar, OD_TYPE_Q4_0)
DEQUANT_FN(od_dequant_q4_1_scalar, OD_TYPE_Q4_1)
DEQUANT_FN(od_dequant_q5_0_scalar, OD_TYPE_Q5_0)
DEQUANT_FN(od_dequant_q5_1_scalar, OD_TYPE_Q5_1)
DEQUANT_FN(od_dequant_q8_0_scalar, OD_TYPE_Q8_0)
DEQUANT_FN(od_dequant_q4_k_scalar, OD_TYPE_Q4_K)
DEQUANT_FN(od_dequant_q5_k_scalar, OD_TYPE_Q5_K)
DEQUANT_FN(od_dequant_iq4_nl_scalar, OD_TYPE_IQ4_NL)
DEQUANT_FN(od_dequant_iq4_xs_scalar, OD_TYPE_IQ4_XS)

void od_dequant_f32_scalar(const uint8_t *row, float *out, int64_t k) { memcpy(out, row, (size_t)k * 4); }

void od_dequant_f16_scalar(const uint8_t *row, float *out, int64_t k) {
    for (int64_t i = 0; i < k; i++) out[i] = od_fp16_to_fp32(od_read_u16(row + 2 * i));
}

void od_dequant_bf16_scalar(const uint8_t *row, float *out, int64_t k) {
    for (int64_t i = 0; i < k; i++) out[i] = od_bf16_to_fp32(od_read_u16(row + 2 * i));
}

/* ------------------------------------------------------------------ matmul */

static void matmul_quant_scalar(const od_mm_args *a, int64_t n0, int64_t n1) {
    const od_q8_act *act = a->act;
    const int64_t k = a->k, nb = k / OD_QK;
    /* one unpacked weight row at a time: int16 values plus per-block scale/offset */
    int16_t *qv = od_scratch(1, (size_t)k * sizeof(int16_t) + (size_t)nb * 2 * sizeof(float));
    if (!qv) return;
    float *dw = (float *)(qv + k), *mw = dw + nb;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = a->w + (size_t)n * a->row_bytes;
        for (int64_t b = 0; b < nb; b++) unpack_block32(a->wtype, row, b, qv + b * OD_QK, &dw[b], &mw[b]);
        for (int64_t r = 0; r < a->m; r++) {
            const int8_t *xq = act->qs + r * k;
            const float *xds = act->ds + r * nb * 2;
            float sum = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t isum = 0;
                for (int j = 0; j < OD_QK; j++) isum += (int32_t)qv[b * OD_QK + j] * xq[b * OD_QK + j];
                sum += dw[b] * xds[2 * b] * (float)isum + mw[b] * xds[2 * b + 1];
            }
            float *dst = a->out + r * a->ldo + n;
            *dst = a->accumulate ? *dst + sum : sum;
        }
    }
}

static void matmul_float_scalar(const od_mm_args *a, int64_t n0, int64_t n1) {
    const int64_t k = a->k;
    float *wrow = od_scratch(1, (size_t)k * sizeof(float));
    if (!wrow) return;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = a->w + (size_t)n * a->row_bytes;
        if (a->wtype == OD_TYPE_F32) memcpy(wrow, row, (size_t)k * 4);
        else if (a->wtype == OD_TYPE_F16) od_dequant_f16_scalar(row, wrow, k);
        else od_dequant_bf16_scalar(row, wrow, k);
        for (int64_t r = 0; r < a->m; r++) {
            const float *xr = a->x + r * k;
            float sum = 0.0f;
            for (int64_t i = 0; i < k; i++) sum += wrow[i] * xr[i];
            float *dst = a->out + r * a->ldo + n;
            *dst = a->accumulate ? *dst + sum : sum;
        }
    }
}

/* ------------------------------------------------------------------ element-wise and friends */

static void rmsnorm_row_scalar(float *out, const float *x, const float *weight, int64_t k, float eps) {
    double sum = 0.0;
    for (int64_t i = 0; i < k; i++) sum += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(sum / (double)k + (double)eps));
    for (int64_t i = 0; i < k; i++) out[i] = x[i] * inv * weight[i];
}

static void rope_row_scalar(float *x, int64_t h, int64_t d, const float *cs, int neox) {
    const int64_t half = d / 2;
    const float *cosv = cs, *sinv = cs + half;
    for (int64_t head = 0; head < h; head++) {
        float *xh = x + head * d;
        for (int64_t j = 0; j < half; j++) {
            float *a, *b;
            if (neox) {
                a = xh + j;
                b = xh + j + half;
            } else {
                a = xh + 2 * j;
                b = xh + 2 * j + 1;
            }
            const float x0 = *a, x1 = *b;
            *a = x0 * cosv[j] - x1 * sinv[j];
            *b = x0 * sinv[j] + x1 * cosv[j];
        }
    }
}

static inline float kv_value(const void *cache, int kv_f16, size_t index) {
    return kv_f16 ? od_fp16_to_fp32(((const uint16_t *)cache)[index]) : ((const float *)cache)[index];
}

static void attention_scalar(const od_attn_args *a, int64_t head, int64_t r0, int64_t r1, float *scratch) {
    const int64_t d = a->d, group = a->h / a->hkv, kvh = head / group;
    const size_t kv_base = (size_t)kvh * a->c * d;
    float *scores = scratch;
    for (int64_t r = r0; r < r1; r++) {
        const float *qr = a->q + (r * a->h + head) * d;
        const int64_t n_keys = a->pos0 + r + 1;
        for (int64_t t = 0; t < n_keys; t++) {
            float dot = 0.0f;
            for (int64_t i = 0; i < d; i++) dot += qr[i] * kv_value(a->k_cache, a->kv_f16, kv_base + t * d + i);
            scores[t] = dot * a->scale;
        }
        const float inv = od_attn_probabilities(scores, n_keys, od_softmax_numerators_scalar(scores, n_keys, NULL), a->kv_f16);
        float *o = a->out + r * a->h * d + head * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < n_keys; t++) {
            const float p = scores[t];
            for (int64_t i = 0; i < d; i++) o[i] += p * kv_value(a->v_cache, a->kv_f16, kv_base + t * d + i);
        }
        for (int64_t i = 0; i < d; i++) o[i] *= inv;
    }
}

static void silu_mul_scalar(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static void gelu_mul_scalar(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(g * (OD_GELU_A + OD_GELU_B * g * g))) * up[i];
    }
}

static void add_scalar(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

const od_isa_ops od_ops_scalar = {
    .name = "scalar",
    .quantize_act = od_quantize_act_scalar,
    .matmul =
        {
            [OD_TYPE_F32] = matmul_float_scalar,
            [OD_TYPE_F16] = matmul_float_scalar,
            [OD_TYPE_BF16] = matmul_float_scalar,
            [OD_TYPE_Q4_0] = matmul_quant_scalar,
            [OD_TYPE_Q4_1] = matmul_quant_scalar,
            [OD_TYPE_Q5_0] = matmul_quant_scalar,
            [OD_TYPE_Q5_1] = matmul_quant_scalar,
            [OD_TYPE_Q8_0] = matmul_quant_scalar,
            [OD_TYPE_Q3_K] = matmul_quant_scalar,
            [OD_TYPE_Q4_K] = matmul_quant_scalar,
            [OD_TYPE_Q5_K] = matmul_quant_scalar,
            [OD_TYPE_Q6_K] = matmul_quant_scalar,
            [OD_TYPE_IQ4_NL] = matmul_quant_scalar,
            [OD_TYPE_IQ4_XS] = matmul_quant_scalar,
        },
    .dequant_row =
        {
            [OD_TYPE_F32] = od_dequant_f32_scalar,
            [OD_TYPE_F16] = od_dequant_f16_scalar,
            [OD_TYPE_BF16] = od_dequant_bf16_scalar,
            [OD_TYPE_Q4_0] = od_dequant_q4_0_scalar,
            [OD_TYPE_Q4_1] = od_dequant_q4_1_scalar,
            [OD_TYPE_Q5_0] = od_dequant_q5_0_scalar,
            [OD_TYPE_Q5_1] = od_dequant_q5_1_scalar,
            [OD_TYPE_Q8_0] = od_dequant_q8_0_scalar,
            [OD_TYPE_Q3_K] = od_dequant_q3_k_scalar,
            [OD_TYPE_Q4_K] = od_dequant_q4_k_scalar,
            [OD_TYPE_Q5_K] = od_dequant_q5_k_scalar,
            [OD_TYPE_Q6_K] = od_dequant_q6_k_scalar,
            [OD_TYPE_IQ4_NL] = od_dequant_iq4_nl_scalar,
            [OD_TYPE_IQ4_XS] = od_dequant_iq4_xs_scalar,
        },
    .rmsnorm_row = rmsnorm_row_scalar,
    .rope_row = rope_row_scalar,
    .attention = attention_scalar,
    .silu_mul = silu_mul_scalar,
    .gelu_mul = gelu_mul_scalar,
    .add = add_scalar,
};
