/*
 * NEON (AArch64) matmul kernels and the NEON ops tables. Compiled only on aarch64.
 *
 * Quantized weights: every format is decoded to signed int8 codes per 32 weights (Q4_0 as q-8,
 * Q5_0 as q-16, Q6_K as q-32 with its two 16-weight sub-scales, the min formats as unsigned codes
 * plus a float offset term) and dotted with the 8-bit activations. Two variants of the dot products
 * exist: plain ARMv8 NEON and the dot-product extension (vdotq_s32), chosen at run time from
 * HWCAP_ASIMDDP (quant_neon_body.h is compiled once for each).
 */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <string.h>

#include "od_internal.h"

#if defined(__clang__)
#define OD_TARGET_DOTPROD __attribute__((target("dotprod")))
#else
#define OD_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

/* ------------------------------------------------------------------ activation quantization */

static float block_amax_neon(const float *xb) {
    float32x4_t mx = vdupq_n_f32(0.0f);
    for (int i = 0; i < 8; i++) mx = vmaxq_f32(mx, vabsq_f32(vld1q_f32(xb + 4 * i)));
    return vmaxvq_f32(mx);
}

/* 32 activations -> int8 codes round-half-even(x * id); returns their sum. */
static int quantize_block_neon(const float *xb, float id, int8_t *qb) {
    int32x4_t total = vdupq_n_s32(0);
    int16x8_t halves[4];
    for (int i = 0; i < 4; i++) {
        /* vcvtnq rounds to nearest, ties to even, like the scalar nearbyintf */
        const int32x4_t q0 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + 8 * i), id));
        const int32x4_t q1 = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + 8 * i + 4), id));
        total = vaddq_s32(total, vaddq_s32(q0, q1));
        halves[i] = vcombine_s16(vmovn_s32(q0), vmovn_s32(q1));
    }
    vst1q_s8(qb, vcombine_s8(vmovn_s16(halves[0]), vmovn_s16(halves[1])));
    vst1q_s8(qb + 16, vcombine_s8(vmovn_s16(halves[2]), vmovn_s16(halves[3])));
    return vaddvq_s32(total);
}

static void quantize_act_neon(const float *x, od_q8_act *act, int64_t m0, int64_t m1) {
    od_quantize_act_rows(x, act, m0, m1, block_amax_neon, quantize_block_neon);
}

/* ------------------------------------------------------------------ block decoding */

typedef struct {
    int8x16_t lo, hi; /* codes of elements 0..15 and 16..31 */
    float dw, mw;     /* w = dw * code (* sub-scale for Q6_K) + mw */
    int sc0, sc1;     /* Q6_K / Q3_K sub-scales of the two halves */
} neon_block;

#define NEON_HAS_OFFSET(t) ((t) == OD_TYPE_Q4_1 || (t) == OD_TYPE_Q5_1 || (t) == OD_TYPE_Q4_K || (t) == OD_TYPE_Q5_K)

/* bit j of `bits` (j < 16) -> 0x10 in byte j */
static inline __attribute__((always_inline)) uint8x16_t fifth_bits_16(uint32_t bits) {
    static const uint8_t masks[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t bytes = vcombine_u8(vdup_n_u8((uint8_t)(bits & 0xFF)), vdup_n_u8((uint8_t)((bits >> 8) & 0xFF)));
    return vandq_u8(vtstq_u8(bytes, vld1q_u8(masks)), vdupq_n_u8(0x10));
}

static inline __attribute__((always_inline)) neon_block neon_load_block(const int type, const uint8_t *row, int64_t b) {
    neon_block blk = {.mw = 0.0f, .sc0 = 1, .sc1 = 1};
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    switch (type) {
    case OD_TYPE_Q4_0: {
        const block_q4_0 *p = (const block_q4_0 *)row + b;
        const uint8x16_t v = vld1q_u8(p->qs);
        blk.lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, low4)), vdupq_n_s8(8));
        blk.hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        break;
    }
    case OD_TYPE_Q4_1: {
        const block_q4_1 *p = (const block_q4_1 *)row + b;
        const uint8x16_t v = vld1q_u8(p->qs);
        blk.lo = vreinterpretq_s8_u8(vandq_u8(v, low4));
        blk.hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        blk.mw = od_fp16_to_fp32(od_read_u16(&p->m));
        break;
    }
    case OD_TYPE_Q5_0:
    case OD_TYPE_Q5_1: {
        const uint8_t *qs = type == OD_TYPE_Q5_0 ? ((const block_q5_0 *)row + b)->qs : ((const block_q5_1 *)row + b)->qs;
        const uint8_t *qhp = type == OD_TYPE_Q5_0 ? ((const block_q5_0 *)row + b)->qh : ((const block_q5_1 *)row + b)->qh;
        const uint32_t qh = od_read_u32(qhp);
        const uint8x16_t v = vld1q_u8(qs);
        const uint8x16_t lo = vorrq_u8(vandq_u8(v, low4), fifth_bits_16(qh));
        const uint8x16_t hi = vorrq_u8(vshrq_n_u8(v, 4), fifth_bits_16(qh >> 16));
        if (type == OD_TYPE_Q5_0) {
            const block_q5_0 *p = (const block_q5_0 *)row + b;
            blk.lo = vsubq_s8(vreinterpretq_s8_u8(lo), vdupq_n_s8(16));
            blk.hi = vsubq_s8(vreinterpretq_s8_u8(hi), vdupq_n_s8(16));
            blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        } else {
            const block_q5_1 *p = (const block_q5_1 *)row + b;
            blk.lo = vreinterpretq_s8_u8(lo);
            blk.hi = vreinterpretq_s8_u8(hi);
            blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
            blk.mw = od_fp16_to_fp32(od_read_u16(&p->m));
        }
        break;
    }
    case OD_TYPE_Q8_0: {
        const block_q8_0 *p = (const block_q8_0 *)row + b;
        blk.lo = vld1q_s8(p->qs);
        blk.hi = vld1q_s8(p->qs + 16);
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        break;
    }
    case OD_TYPE_Q4_K: {
        const block_q4_K *p = (const block_q4_K *)row + b / 8;
        const int sub = (int)(b % 8);
        uint8_t sc, mn;
        od_q4k_scale_min(sub, p->scales, &sc, &mn);
        const uint8_t *qs = p->qs + (sub / 2) * 32;
        uint8x16_t lo = vld1q_u8(qs), hi = vld1q_u8(qs + 16);
        if (sub & 1) {
            lo = vshrq_n_u8(lo, 4);
            hi = vshrq_n_u8(hi, 4);
        } else {
            lo = vandq_u8(lo, low4);
            hi = vandq_u8(hi, low4);
        }
        blk.lo = vreinterpretq_s8_u8(lo);
        blk.hi = vreinterpretq_s8_u8(hi);
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d)) * (float)sc;
        blk.mw = -(od_fp16_to_fp32(od_read_u16(&p->dmin)) * (float)mn);
        break;
    }
    case OD_TYPE_Q5_K: {
        const block_q5_K *p = (const block_q5_K *)row + b / 8;
        const int sub = (int)(b % 8);
        uint8_t sc, mn;
        od_q4k_scale_min(sub, p->scales, &sc, &mn);
        const uint8_t *qs = p->qs + (sub / 2) * 32;
        const int8x16_t shift = vdupq_n_s8((int8_t)-((sub & 1) * 4)), to_bit4 = vdupq_n_s8((int8_t)(4 - sub));
        const uint8x16_t bit = vdupq_n_u8((uint8_t)(1u << sub));
        /* bit `sub` of qh[l] -> bit 4: shift left by 4 - sub (a negative count shifts right) */
        const uint8x16_t lo = vorrq_u8(vandq_u8(vshlq_u8(vld1q_u8(qs), shift), low4),
                                       vshlq_u8(vandq_u8(vld1q_u8(p->qh), bit), to_bit4));
        const uint8x16_t hi = vorrq_u8(vandq_u8(vshlq_u8(vld1q_u8(qs + 16), shift), low4),
                                       vshlq_u8(vandq_u8(vld1q_u8(p->qh + 16), bit), to_bit4));
        blk.lo = vreinterpretq_s8_u8(lo);
        blk.hi = vreinterpretq_s8_u8(hi);
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d)) * (float)sc;
        blk.mw = -(od_fp16_to_fp32(od_read_u16(&p->dmin)) * (float)mn);
        break;
    }
    case OD_TYPE_IQ4_NL:
    case OD_TYPE_IQ4_XS: {
        const uint8_t *qs;
        if (type == OD_TYPE_IQ4_NL) {
            const block_iq4_nl *p = (const block_iq4_nl *)row + b;
            qs = p->qs;
            blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        } else {
            const block_iq4_xs *p = (const block_iq4_xs *)row + b / 8;
            qs = p->qs + 16 * (b % 8);
            blk.dw = od_fp16_to_fp32(od_read_u16(&p->d)) * (float)od_iq4_xs_scale(p, (int)(b % 8));
        }
        const int8x16_t levels = vld1q_s8(od_iq4_levels);
        const uint8x16_t v = vld1q_u8(qs);
        blk.lo = vqtbl1q_s8(levels, vandq_u8(v, low4));
        blk.hi = vqtbl1q_s8(levels, vshrq_n_u8(v, 4));
        break;
    }
    case OD_TYPE_Q3_K: {
        const block_q3_K *p = (const block_q3_K *)row + b / 8;
        const int sub = (int)(b % 8);
        const uint8_t *qs = p->qs + 32 * (sub / 4);
        const int8x16_t shift_low = vdupq_n_s8((int8_t)-(2 * (sub % 4))), shift_high = vdupq_n_s8((int8_t)-sub);
        for (int h = 0; h < 2; h++) {
            const uint8x16_t l = vandq_u8(vshlq_u8(vld1q_u8(qs + 16 * h), shift_low), vdupq_n_u8(3));
            const uint8x16_t hb = vandq_u8(vshlq_u8(vld1q_u8(p->hmask + 16 * h), shift_high), vdupq_n_u8(1));
            const int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, vshlq_n_u8(hb, 2))), vdupq_n_s8(4));
            if (h == 0) blk.lo = q;
            else blk.hi = q;
        }
        int8_t sc[16];
        od_q3k_scales(p->scales, sc);
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        blk.sc0 = sc[sub * 2];
        blk.sc1 = sc[sub * 2 + 1];
        break;
    }
    case OD_TYPE_Q6_K: {
        const block_q6_K *p = (const block_q6_K *)row + b / 8;
        const int sub = (int)(b % 8), half = sub / 4, part = sub % 4;
        const uint8_t *ql = p->ql + 64 * half + (part & 1) * 32;
        const uint8_t *qh = p->qh + 32 * half;
        const int low_shift = (part >> 1) * 4, high_shift = part * 2;
        const int8x16_t shift_low = vdupq_n_s8((int8_t)-low_shift), shift_high = vdupq_n_s8((int8_t)-high_shift);
        for (int h = 0; h < 2; h++) {
            const uint8x16_t l = vandq_u8(vshlq_u8(vld1q_u8(ql + 16 * h), shift_low), low4);
            const uint8x16_t hb = vandq_u8(vshlq_u8(vld1q_u8(qh + 16 * h), shift_high), vdupq_n_u8(3));
            const int8x16_t q = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l, vshlq_n_u8(hb, 4))), vdupq_n_s8(32));
            if (h == 0) blk.lo = q;
            else blk.hi = q;
        }
        blk.dw = od_fp16_to_fp32(od_read_u16(&p->d));
        blk.sc0 = p->scales[sub * 2];
        blk.sc1 = p->scales[sub * 2 + 1];
        break;
    }
    default:
        blk.lo = blk.hi = vdupq_n_s8(0);
        blk.dw = 0.0f;
    }
    return blk;
}

/* ------------------------------------------------------------------ the two dot-product variants */

static inline __attribute__((always_inline)) int32x4_t dot_plain(int32x4_t acc, int8x16_t a, int8x16_t b) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}

#define NB(name) name##_plain
#define NB_ATTR
#define NB_DOT(acc, a, b) dot_plain(acc, a, b)
#include "quant_neon_body.h"
#undef NB
#undef NB_ATTR
#undef NB_DOT

#define NB(name) name##_dotprod
#define NB_ATTR OD_TARGET_DOTPROD
#define NB_DOT(acc, a, b) vdotq_s32(acc, a, b)
#include "quant_neon_body.h"
#undef NB
#undef NB_ATTR
#undef NB_DOT

/* ------------------------------------------------------------------ float weights */

static inline __attribute__((always_inline)) float32x4_t load_w4(const int type, const uint8_t *row, int64_t i) {
    if (type == OD_TYPE_F32) return vld1q_f32((const float *)row + i);
    const uint16x4_t h = vld1_u16((const uint16_t *)(row + 2 * i));
    if (type == OD_TYPE_F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

static inline __attribute__((always_inline)) float load_w1(const int type, const uint8_t *row, int64_t i) {
    if (type == OD_TYPE_F32) return ((const float *)row)[i];
    if (type == OD_TYPE_F16) return od_fp16_to_fp32(od_read_u16(row + 2 * i));
    return od_bf16_to_fp32(od_read_u16(row + 2 * i));
}

static inline __attribute__((always_inline)) void float_tile(const int type, const int R, const int G, const od_mm_args *a,
                                                           int64_t n, int64_t j0) {
    const int64_t k = a->k, k4 = k & ~(int64_t)3;
    const uint8_t *rows[4];
    float32x4_t acc[4][4];
    for (int r = 0; r < R; r++) {
        rows[r] = a->w + (size_t)(n + r) * a->row_bytes;
        for (int g = 0; g < G; g++) acc[r][g] = vdupq_n_f32(0.0f);
    }
    for (int64_t i = 0; i < k4; i += 4) {
        float32x4_t xv[4];
        for (int g = 0; g < G; g++) xv[g] = vld1q_f32(a->x + (j0 + g) * k + i);
        for (int r = 0; r < R; r++) {
            const float32x4_t wv = load_w4(type, rows[r], i);
            for (int g = 0; g < G; g++) acc[r][g] = vfmaq_f32(acc[r][g], wv, xv[g]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) {
            float v = vaddvq_f32(acc[r][g]);
            for (int64_t i = k4; i < k; i++) v += load_w1(type, rows[r], i) * a->x[(j0 + g) * k + i];
            float *dst = a->out + (j0 + g) * a->ldo + n + r;
            *dst = a->accumulate ? *dst + v : v;
        }
}

static inline __attribute__((always_inline)) void float_rows(const int type, const int G, const od_mm_args *a, int64_t n0,
                                                           int64_t n1, int64_t j0) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) float_tile(type, 4, G, a, n, j0);
    for (; n < n1; n++) float_tile(type, 1, G, a, n, j0);
}

static inline __attribute__((always_inline)) void matmul_float_neon(const int type, const od_mm_args *a, int64_t n0,
                                                                  int64_t n1) {
    int64_t j = 0;
    for (; j + 4 <= a->m; j += 4) float_rows(type, 4, a, n0, n1, j);
    switch (a->m - j) {
    case 3: float_rows(type, 3, a, n0, n1, j); break;
    case 2: float_rows(type, 2, a, n0, n1, j); break;
    case 1: float_rows(type, 1, a, n0, n1, j); break;
    default: break;
    }
}

static void matmul_f32_neon(const od_mm_args *a, int64_t n0, int64_t n1) { matmul_float_neon(OD_TYPE_F32, a, n0, n1); }
static void matmul_f16_neon(const od_mm_args *a, int64_t n0, int64_t n1) { matmul_float_neon(OD_TYPE_F16, a, n0, n1); }
static void matmul_bf16_neon(const od_mm_args *a, int64_t n0, int64_t n1) { matmul_float_neon(OD_TYPE_BF16, a, n0, n1); }

/* ------------------------------------------------------------------ get_rows */

static void dequant_q8_0_neon(const uint8_t *row, float *out, int64_t k) {
    for (int64_t b = 0; b < k / OD_QK; b++) {
        const block_q8_0 *p = (const block_q8_0 *)row + b;
        const float d = od_fp16_to_fp32(od_read_u16(&p->d));
        for (int i = 0; i < 32; i += 8) {
            const int16x8_t q = vmovl_s8(vld1_s8(p->qs + i));
            vst1q_f32(out + b * OD_QK + i, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(q))), d));
            vst1q_f32(out + b * OD_QK + i + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(q)), d));
        }
    }
}

static void dequant_f16_neon(const uint8_t *row, float *out, int64_t k) {
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) vst1q_f32(out + i, load_w4(OD_TYPE_F16, row, i));
    for (; i < k; i++) out[i] = od_fp16_to_fp32(od_read_u16(row + 2 * i));
}

/* ------------------------------------------------------------------ tables */

#define NEON_TABLE(SUFFIX)                                                                                     \
    {                                                                                                          \
        .name = "neon", .quantize_act = quantize_act_neon,                                                     \
        .matmul =                                                                                              \
            {                                                                                                  \
                [OD_TYPE_F32] = matmul_f32_neon,                                                               \
                [OD_TYPE_F16] = matmul_f16_neon,                                                               \
                [OD_TYPE_BF16] = matmul_bf16_neon,                                                             \
                [OD_TYPE_Q4_0] = matmul_q4_0_##SUFFIX,                                                         \
                [OD_TYPE_Q4_1] = matmul_q4_1_##SUFFIX,                                                         \
                [OD_TYPE_Q5_0] = matmul_q5_0_##SUFFIX,                                                         \
                [OD_TYPE_Q5_1] = matmul_q5_1_##SUFFIX,                                                         \
                [OD_TYPE_Q8_0] = matmul_q8_0_##SUFFIX,                                                         \
                [OD_TYPE_Q3_K] = matmul_q3_k_##SUFFIX,                                                         \
                [OD_TYPE_Q4_K] = matmul_q4_k_##SUFFIX,                                                         \
                [OD_TYPE_Q5_K] = matmul_q5_k_##SUFFIX,                                                         \
                [OD_TYPE_Q6_K] = matmul_q6_k_##SUFFIX,                                                         \
                [OD_TYPE_IQ4_NL] = matmul_iq4_nl_##SUFFIX,                                                     \
                [OD_TYPE_IQ4_XS] = matmul_iq4_xs_##SUFFIX,                                                     \
            },                                                                                                 \
        .dequant_row =                                                                                         \
            {                                                                                                  \
                [OD_TYPE_F32] = od_dequant_f32_scalar,                                                         \
                [OD_TYPE_F16] = dequant_f16_neon,                                                              \
                [OD_TYPE_BF16] = od_dequant_bf16_scalar,                                                       \
                [OD_TYPE_Q4_0] = od_dequant_q4_0_scalar,                                                       \
                [OD_TYPE_Q4_1] = od_dequant_q4_1_scalar,                                                       \
                [OD_TYPE_Q5_0] = od_dequant_q5_0_scalar,                                                       \
                [OD_TYPE_Q5_1] = od_dequant_q5_1_scalar,                                                       \
                [OD_TYPE_Q8_0] = dequant_q8_0_neon,                                                            \
                [OD_TYPE_Q3_K] = od_dequant_q3_k_scalar,                                                       \
                [OD_TYPE_Q4_K] = od_dequant_q4_k_scalar,                                                       \
                [OD_TYPE_Q5_K] = od_dequant_q5_k_scalar,                                                       \
                [OD_TYPE_Q6_K] = od_dequant_q6_k_scalar,                                                       \
                [OD_TYPE_IQ4_NL] = od_dequant_iq4_nl_scalar,                                                   \
                [OD_TYPE_IQ4_XS] = od_dequant_iq4_xs_scalar,                                                   \
            },                                                                                                 \
        .rmsnorm_row = od_rmsnorm_row_neon, .rope_row = od_rope_row_neon, .attention = od_attention_neon,      \
        .silu_mul = od_silu_mul_neon, .gelu_mul = od_gelu_mul_neon, .add = od_add_neon,                                                      \
    }

const od_isa_ops od_ops_neon = NEON_TABLE(plain);
const od_isa_ops od_ops_neon_dotprod = NEON_TABLE(dotprod);

#endif /* __aarch64__ */
