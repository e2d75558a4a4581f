/*
 * NEON (AArch64) element-wise kernels: rmsnorm, rope, attention, silu*mul, add.
 * Same algorithms as ops_avx2.c with 4-lane vectors.
 */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "od_internal.h"

/* exp(x) for 4 floats; see exp_ps in ops_avx2.c for the method. Below -87.34 returns 0. */
static inline __attribute__((always_inline)) float32x4_t exp_f32x4(float32x4_t x) {
    const uint32x4_t keep = vcgeq_f32(x, vdupq_n_f32(-87.33654f));
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.33654f)), vdupq_n_f32(88.37626f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t ni = vcvtq_s32_f32(n);
    const int32x4_t half_n = vshrq_n_s32(ni, 1);
    const float32x4_t pow_a = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(half_n, vdupq_n_s32(127)), 23));
    const float32x4_t pow_b = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(ni, half_n), vdupq_n_s32(127)), 23));
    const float32x4_t result = vmulq_f32(vmulq_f32(p, pow_a), pow_b);
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(result), keep));
}

void od_rmsnorm_row_neon(float *out, const float *x, const float *weight, int64_t k, float eps) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const float32x4_t a = vld1q_f32(x + i), b = vld1q_f32(x + i + 4);
        acc0 = vfmaq_f32(acc0, a, a);
        acc1 = vfmaq_f32(acc1, b, b);
    }
    double sum = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < k; i++) sum += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(sum / (double)k + (double)eps));
    i = 0;
    for (; i + 4 <= k; i += 4) vst1q_f32(out + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), inv), vld1q_f32(weight + i)));
    for (; i < k; i++) out[i] = x[i] * inv * weight[i];
}

void od_rope_row_neon(float *x, int64_t h, int64_t d, const float *cs, int neox) {
    const int64_t half = d / 2;
    const float *cosv = cs, *sinv = cs + half;
    for (int64_t head = 0; head < h; head++) {
        float *xh = x + head * d;
        int64_t j = 0;
        if (neox) {
            for (; j + 4 <= half; j += 4) {
                const float32x4_t a = vld1q_f32(xh + j), b = vld1q_f32(xh + j + half);
                const float32x4_t c = vld1q_f32(cosv + j), s = vld1q_f32(sinv + j);
                vst1q_f32(xh + j, vfmsq_f32(vmulq_f32(a, c), b, s));
                vst1q_f32(xh + j + half, vfmaq_f32(vmulq_f32(a, s), b, c));
            }
        } else {
            for (; j + 4 <= half; j += 4) {
                /* de-interleave 4 pairs, rotate, interleave back */
                const float32x4x2_t v = vld2q_f32(xh + 2 * j);
                const float32x4_t c = vld1q_f32(cosv + j), s = vld1q_f32(sinv + j);
                float32x4x2_t o;
                o.val[0] = vfmsq_f32(vmulq_f32(v.val[0], c), v.val[1], s);
                o.val[1] = vfmaq_f32(vmulq_f32(v.val[0], s), v.val[1], c);
                vst2q_f32(xh + 2 * j, o);
            }
        }
        for (; j < half; j++) {
            float *a = neox ? xh + j : xh + 2 * j;
            float *b = neox ? xh + j + half : xh + 2 * j + 1;
            const float x0 = *a, x1 = *b;
            *a = x0 * cosv[j] - x1 * sinv[j];
            *b = x0 * sinv[j] + x1 * cosv[j];
        }
    }
}

/* kind: 0 f32, 1 f16, 2 Q8_0 (rows of whole blocks: flat element `index` is in block index / 32; index % 4 == 0) */
static inline __attribute__((always_inline)) float32x4_t load_kv4(const void *cache, int kind, size_t index) {
    if (kind == 2) {
        const block_q8_0 *blk = (const block_q8_0 *)cache + (index >> 5);
        int32_t four; /* 4 codes: an 8-byte load could run past the cache's last block */
        memcpy(&four, blk->qs + (index & 31), 4);
        const int8x8_t q = vreinterpret_s8_s32(vdup_n_s32(four));
        return vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(q)))), od_fp16_to_fp32(blk->d));
    }
    if (kind == 1) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)cache + index)));
    return vld1q_f32((const float *)cache + index);
}

static inline __attribute__((always_inline)) float load_kv1(const void *cache, int kind, size_t index) {
    if (kind == 2) {
        const block_q8_0 *blk = (const block_q8_0 *)cache + (index >> 5);
        return (float)blk->qs[index & 31] * od_fp16_to_fp32(blk->d);
    }
    return kind ? od_fp16_to_fp32(((const uint16_t *)cache)[index]) : ((const float *)cache)[index];
}

/* One query row qr of a head whose KV head starts at element kv_base; o = its output row. */
static inline __attribute__((always_inline)) void attention_row(const od_attn_args *a, const float *qr, float *o,
                                                                int64_t n_keys, size_t kv_base, float *scores,
                                                                const int kind, float *lse) {
    const int64_t d = a->d, d4 = d & ~(int64_t)3;
    float maxv = -INFINITY;
    for (int64_t t = 0; t < n_keys; t++) {
        const size_t base = kv_base + (size_t)t * d;
        float32x4_t acc = vdupq_n_f32(0.0f);
        for (int64_t i = 0; i < d4; i += 4) acc = vfmaq_f32(acc, vld1q_f32(qr + i), load_kv4(a->k_cache, kind, base + i));
        float dot = vaddvq_f32(acc);
        for (int64_t i = d4; i < d; i++) dot += qr[i] * load_kv1(a->k_cache, kind, base + i);
        scores[t] = dot * a->scale;
        maxv = scores[t] > maxv ? scores[t] : maxv;
    }
    float32x4_t vsum = vdupq_n_f32(0.0f);
    int64_t t = 0;
    for (; t + 4 <= n_keys; t += 4) {
        const float32x4_t e = exp_f32x4(vsubq_f32(vld1q_f32(scores + t), vdupq_n_f32(maxv)));
        vst1q_f32(scores + t, e);
        vsum = vaddq_f32(vsum, e);
    }
    float total = vaddvq_f32(vsum);
    for (; t < n_keys; t++) {
        scores[t] = expf(scores[t] - maxv);
        total += scores[t];
    }
    const float inv = od_attn_probabilities(scores, n_keys, total, kind == 1);
    if (lse) lse[0] = maxv, lse[1] = total;
    /* 16 output dims (4 registers) per pass over the keys */
    int64_t c = 0;
    for (; c + 16 <= d4; c += 16) {
        float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (t = 0; t < n_keys; t++) {
            const size_t base = kv_base + (size_t)t * d + c;
            const float p = scores[t];
            acc0 = vfmaq_n_f32(acc0, load_kv4(a->v_cache, kind, base), p);
            acc1 = vfmaq_n_f32(acc1, load_kv4(a->v_cache, kind, base + 4), p);
            acc2 = vfmaq_n_f32(acc2, load_kv4(a->v_cache, kind, base + 8), p);
            acc3 = vfmaq_n_f32(acc3, load_kv4(a->v_cache, kind, base + 12), p);
        }
        vst1q_f32(o + c, vmulq_n_f32(acc0, inv));
        vst1q_f32(o + c + 4, vmulq_n_f32(acc1, inv));
        vst1q_f32(o + c + 8, vmulq_n_f32(acc2, inv));
        vst1q_f32(o + c + 12, vmulq_n_f32(acc3, inv));
    }
    for (; c < d; c++) {
        float acc = 0.0f;
        for (t = 0; t < n_keys; t++) acc += scores[t] * load_kv1(a->v_cache, kind, kv_base + (size_t)t * d + c);
        o[c] = acc * inv;
    }
}

void od_attention_neon(const od_attn_args *a, int64_t head, int64_t r0, int64_t r1, float *scratch) {
    const int64_t d = a->d, kvh = head / (a->h / a->hkv);
    for (int64_t r = r0; r < r1; r++) {
        const float *qr = a->q + (r * a->h + head) * d;
        float *o = a->out + r * a->h * d + head * d;
        if (a->kv_f16) attention_row(a, qr, o, a->pos0 + r + 1, (size_t)kvh * a->c * d, scratch, 1, NULL);
        else attention_row(a, qr, o, a->pos0 + r + 1, (size_t)kvh * a->c * d, scratch, 0, NULL);
    }
}

/* Attention on a Q8_0 cache, one (head, row) pair at a time (K/V dequantized 4 values at a time as they are read;
 * d % 32 == 0, checked by od_attention). */
void od_attention_q8_neon(const od_attn_args *a, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                          float *scratch) {
    for (int64_t v = 0; v < (g1 - g0) * (r1 - r0); v++) {
        const float *qr;
        float *o, *lse;
        int64_t n_keys;
        od_attn_group_pair(a, kvh, g0, g1, r0, v, &qr, &o, &n_keys, &lse);
        attention_row(a, qr, o, n_keys, (size_t)kvh * a->c * a->d, scratch, 2, lse);
    }
}

void od_silu_mul_neon(float *out, const float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t e = exp_f32x4(vnegq_f32(g));
        vst1q_f32(out + i, vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void od_gelu_mul_neon(float *out, const float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t g = vld1q_f32(gate + i);
        const float32x4_t arg = vmulq_f32(g, vfmaq_f32(vdupq_n_f32(OD_GELU_A), vdupq_n_f32(OD_GELU_B), vmulq_f32(g, g)));
        const float32x4_t e = exp_f32x4(arg);
        vst1q_f32(out + i, vmulq_f32(vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(gate[i] * (OD_GELU_A + OD_GELU_B * gate[i] * gate[i]))) * up[i];
}

void od_add_neon(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, vaddq_f32(vld1q_f32(x + i), vld1q_f32(y + i)));
    for (; i < n; i++) x[i] += y[i];
}

#endif /* __aarch64__ */
