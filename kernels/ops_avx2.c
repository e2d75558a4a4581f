/*
 * AVX2 + FMA + F16C element-wise kernels: rmsnorm, rope, attention, silu*mul, add.
 * Same target-attribute scheme as quant_avx2.c.
 */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <math.h>

#include "od_internal.h"

#define OD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OD_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

#if defined(__clang__)
#define OD_UNROLL_ATTN _Pragma("unroll")
#elif defined(__GNUC__)
#define OD_UNROLL_ATTN _Pragma("GCC unroll 8")
#else
#define OD_UNROLL_ATTN
#endif

OD_AVX2_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/*
 * exp(x) for 8 floats: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by a degree-6
 * polynomial (Cephes expf coefficients), 2^n through the exponent bits. ~1 ulp; inputs below
 * -87.34 (including -inf) return 0 and above 88.37 saturate near FLT_MAX, which is what softmax
 * (x <= 0) and silu need.
 */
OD_AVX2_INLINE __m256 exp_ps(__m256 x) {
    /* below ln(2^-126) the result is flushed to 0: no subnormal products downstream */
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n: n in [-126, 128]; 2^128 would overflow the exponent field, so scale in two steps */
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i half_n = _mm256_srai_epi32(ni, 1);
    const __m256 pow_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half_n, _mm256_set1_epi32(127)), 23));
    const __m256 pow_b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half_n), _mm256_set1_epi32(127)), 23));
    return _mm256_and_ps(_mm256_mul_ps(_mm256_mul_ps(p, pow_a), pow_b), keep);
}

/* ------------------------------------------------------------------ rmsnorm */

OD_AVX2 void od_rmsnorm_row_avx2(float *out, const float *x, const float *weight, int64_t k, float eps) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
    }
    for (; i + 8 <= k; i += 8) {
        const __m256 a = _mm256_loadu_ps(x + i);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
    }
    double sum = hsum_ps(_mm256_add_ps(acc0, acc1));
    for (; i < k; i++) sum += (double)x[i] * x[i];
    const float inv = (float)(1.0 / sqrt(sum / (double)k + (double)eps));
    const __m256 vinv = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv), _mm256_loadu_ps(weight + i)));
    for (; i < k; i++) out[i] = x[i] * inv * weight[i];
}

/* ------------------------------------------------------------------ rope */

OD_AVX2 void od_rope_row_avx2(float *x, int64_t h, int64_t d, const float *cs, int neox) {
    const int64_t half = d / 2;
    const float *cosv = cs, *sinv = cs + half;
    for (int64_t head = 0; head < h; head++) {
        float *xh = x + head * d;
        int64_t j = 0;
        if (neox) {
            for (; j + 8 <= half; j += 8) {
                const __m256 a = _mm256_loadu_ps(xh + j), b = _mm256_loadu_ps(xh + j + half);
                const __m256 c = _mm256_loadu_ps(cosv + j), s = _mm256_loadu_ps(sinv + j);
                _mm256_storeu_ps(xh + j, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
                _mm256_storeu_ps(xh + j + half, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
            }
            for (; j < half; j++) {
                const float a = xh[j], b = xh[j + half];
                xh[j] = a * cosv[j] - b * sinv[j];
                xh[j + half] = a * sinv[j] + b * cosv[j];
            }
        } else {
            /* 4 pairs per vector: x' = x * [c c] + swap(x) * [-s s] */
            const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
            const __m256 alternate = _mm256_setr_ps(-1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f, -1.0f, 1.0f);
            for (; j + 4 <= half; j += 4) {
                const __m256 v = _mm256_loadu_ps(xh + 2 * j);
                const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cosv + j)), dup);
                const __m256 s = _mm256_mul_ps(
                    _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sinv + j)), dup), alternate);
                const __m256 swapped = _mm256_permute_ps(v, 0xB1);
                _mm256_storeu_ps(xh + 2 * j, _mm256_fmadd_ps(v, c, _mm256_mul_ps(swapped, s)));
            }
            for (; j < half; j++) {
                const float a = xh[2 * j], b = xh[2 * j + 1];
                xh[2 * j] = a * cosv[j] - b * sinv[j];
                xh[2 * j + 1] = a * sinv[j] + b * cosv[j];
            }
        }
    }
}

/* ------------------------------------------------------------------ attention */

/* kind: 0 f32, 1 f16, 2 Q8_0 (rows of whole blocks, so flat element `index` is in block index / 32; index % 8 == 0) */
OD_AVX2_INLINE __m256 load_kv8(const void *cache, int kind, size_t index) {
    if (kind == 2) {
        const block_q8_0 *blk = (const block_q8_0 *)cache + (index >> 5);
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk->qs + (index & 31))));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(_cvtsh_ss(blk->d)));
    }
    if (kind == 1) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + index)));
    return _mm256_loadu_ps((const float *)cache + index);
}

OD_AVX2_INLINE float load_kv1(const void *cache, int kv_f16, size_t index) {
    return kv_f16 ? _cvtsh_ss(((const uint16_t *)cache)[index]) : ((const float *)cache)[index];
}

/* sum of the 8 lanes of each of 4 vectors, packed into one __m128 */
OD_AVX2_INLINE __m128 hsum4_ps(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* One query row at a time; used when the head dim is not a multiple of 8. */
OD_AVX2 static void attention_rows_avx2(const od_attn_args *a, int64_t head, int64_t r0, int64_t r1, float *scratch) {
    const int64_t d = a->d, d8 = d & ~(int64_t)7, group = a->h / a->hkv, kvh = head / group;
    const size_t kv_base = (size_t)kvh * a->c * d;
    const int f16 = a->kv_f16;
    float *scores = scratch;
    float *acc_mem = scratch + ((a->c + 15) & ~(int64_t)15);
    for (int64_t r = r0; r < r1; r++) {
        const float *qr = a->q + (r * a->h + head) * d;
        const int64_t n_keys = a->pos0 + r + 1;
        /* scores, 4 keys at a time */
        int64_t t = 0;
        for (; t + 4 <= n_keys && d8 == d; t += 4) {
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            const size_t base = kv_base + (size_t)t * d;
            for (int64_t i = 0; i < d; i += 8) {
                const __m256 qv = _mm256_loadu_ps(qr + i);
                s0 = _mm256_fmadd_ps(qv, load_kv8(a->k_cache, f16, base + i), s0);
                s1 = _mm256_fmadd_ps(qv, load_kv8(a->k_cache, f16, base + d + i), s1);
                s2 = _mm256_fmadd_ps(qv, load_kv8(a->k_cache, f16, base + 2 * d + i), s2);
                s3 = _mm256_fmadd_ps(qv, load_kv8(a->k_cache, f16, base + 3 * d + i), s3);
            }
            _mm_storeu_ps(scores + t, _mm_mul_ps(hsum4_ps(s0, s1, s2, s3), _mm_set1_ps(a->scale)));
        }
        for (; t < n_keys; t++) {
            const size_t base = kv_base + (size_t)t * d;
            __m256 s0 = _mm256_setzero_ps();
            for (int64_t i = 0; i < d8; i += 8)
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), load_kv8(a->k_cache, f16, base + i), s0);
            float dot = hsum_ps(s0);
            for (int64_t i = d8; i < d; i++) dot += qr[i] * load_kv1(a->k_cache, f16, base + i);
            scores[t] = dot * a->scale;
        }
        /* softmax numerators relative to the row maximum */
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        t = 0;
        for (; t + 8 <= n_keys; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(scores + t));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float maxv = _mm_cvtss_f32(m4);
        for (; t < n_keys; t++) maxv = scores[t] > maxv ? scores[t] : maxv;
        const __m256 vm = _mm256_set1_ps(maxv);
        __m256 vsum = _mm256_setzero_ps();
        t = 0;
        for (; t + 8 <= n_keys; t += 8) {
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vm));
            _mm256_storeu_ps(scores + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float total = hsum_ps(vsum);
        for (; t < n_keys; t++) {
            scores[t] = expf(scores[t] - maxv);
            total += scores[t];
        }
        const float inv = od_attn_probabilities(scores, n_keys, total, f16);
        /* weighted sum of values, 64 dims (8 registers) per pass */
        float *o = a->out + r * a->h * d + head * d;
        for (int64_t i0 = 0; i0 < d8; i0 += 64) {
            const int nv = (int)((d8 - i0) / 8 < 8 ? (d8 - i0) / 8 : 8);
            __m256 acc[8];
            for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_ps();
            for (t = 0; t < n_keys; t++) {
                const __m256 p = _mm256_set1_ps(scores[t]);
                const size_t base = kv_base + (size_t)t * d + i0;
                if (nv == 8) {
                    for (int v = 0; v < 8; v++) acc[v] = _mm256_fmadd_ps(p, load_kv8(a->v_cache, f16, base + 8 * v), acc[v]);
                } else {
                    for (int v = 0; v < nv; v++) acc[v] = _mm256_fmadd_ps(p, load_kv8(a->v_cache, f16, base + 8 * v), acc[v]);
                }
            }
            const __m256 vinv = _mm256_set1_ps(inv);
            for (int v = 0; v < nv; v++) _mm256_storeu_ps(o + i0 + 8 * v, _mm256_mul_ps(acc[v], vinv));
        }
        if (d8 < d) {
            for (int64_t i = d8; i < d; i++) acc_mem[i] = 0.0f;
            for (t = 0; t < n_keys; t++)
                for (int64_t i = d8; i < d; i++)
                    acc_mem[i] += scores[t] * load_kv1(a->v_cache, f16, kv_base + (size_t)t * d + i);
            for (int64_t i = d8; i < d; i++) o[i] = acc_mem[i] * inv;
        }
    }
}

/* lane j of the result = sum of the lanes of v[j] */
OD_AVX2_INLINE __m256 reduce8_ps(const __m256 v[8]) {
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 x = _mm256_hadd_ps(h01, h23), y = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
}


/* outacc[R][d] (c0 .. c0 + 8*CG) = P[R][n_max] @ V[n_max][d]: R rows x CG 8-dim chunks of accumulators
 * in registers (R*CG ~ 8 independent FMA chains), each V row chunk loaded once per pass. */
OD_AVX2_INLINE void attention_pv_chunks(const int R, const int CG, const od_attn_args *a, const float *scores,
                                        int64_t stride, float *outacc, size_t kv_base, int64_t n_max, int64_t c0,
                                        const int f16) {
    const int64_t d = a->d;
    __m256 acc[8][8];
    OD_UNROLL_ATTN
    for (int r = 0; r < R; r++) {
        OD_UNROLL_ATTN
        for (int g = 0; g < CG; g++) acc[r][g] = _mm256_setzero_ps();
    }
    for (int64_t t = 0; t < n_max; t++) {
        const size_t row = kv_base + (size_t)t * d + c0;
        __m256 vv[8];
        OD_UNROLL_ATTN
        for (int g = 0; g < CG; g++) vv[g] = load_kv8(a->v_cache, f16, row + 8 * g);
        OD_UNROLL_ATTN
        for (int r = 0; r < R; r++) {
            const __m256 p = _mm256_broadcast_ss(scores + r * stride + t);
            OD_UNROLL_ATTN
            for (int g = 0; g < CG; g++) acc[r][g] = _mm256_fmadd_ps(p, vv[g], acc[r][g]);
        }
    }
    OD_UNROLL_ATTN
    for (int r = 0; r < R; r++) {
        OD_UNROLL_ATTN
        for (int g = 0; g < CG; g++) _mm256_storeu_ps(outacc + r * d + c0 + 8 * g, acc[r][g]);
    }
}

OD_AVX2_INLINE void attention_pv(const int R, const od_attn_args *a, const float *scores, int64_t stride, float *outacc,
                                 size_t kv_base, int64_t n_max, const int f16) {
    /* chunks per pass: 8 for one row, down to 1 for 8 rows */
    const int CG = R == 1 ? 8 : R == 2 ? 4 : R <= 4 ? 2 : 1;
    int64_t c = 0;
    for (; c + 8 * CG <= a->d; c += 8 * CG) attention_pv_chunks(R, CG, a, scores, stride, outacc, kv_base, n_max, c, f16);
    for (; c < a->d; c += 8) attention_pv_chunks(R, 1, a, scores, stride, outacc, kv_base, n_max, c, f16);
}

/* scale * q . k for 8 keys at element offsets key_at[] of `keys` (kind as load_kv8), one hadd-tree reduction */
OD_AVX2_INLINE __m256 scores8(const float *qr, int64_t d, const void *keys, const int kind, const size_t key_at[8],
                              __m256 vscale) {
    __m256 acc[8];
    OD_UNROLL_ATTN
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < d; c += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + c);
        OD_UNROLL_ATTN
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, load_kv8(keys, kind, key_at[j] + c), acc[j]);
    }
    return _mm256_mul_ps(reduce8_ps(acc), vscale);
}

/* srow[0..stride) = exp(srow - max) in place (masked entries are -inf: 0); returns their sum, the max in *max_out */
OD_AVX2_INLINE float softmax_numerators(float *srow, int64_t stride, float *max_out) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < stride; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(srow + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    *max_out = _mm_cvtss_f32(m4);
    const __m256 vm = _mm256_set1_ps(*max_out);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t t = 0; t < stride; t += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(srow + t), vm));
        _mm256_storeu_ps(srow + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    return hsum_ps(vsum);
}

/* attention_pv for a run-time R <= 8 (each case compiled with its register blocking) */
OD_AVX2_INLINE void attention_pv_rows(int R, const od_attn_args *a, const float *scores, int64_t stride,
                                      float *outacc, size_t kv_base, int64_t n_max, const int kind) {
    switch (R) {
    case 1: attention_pv(1, a, scores, stride, outacc, kv_base, n_max, kind); break;
    case 2: attention_pv(2, a, scores, stride, outacc, kv_base, n_max, kind); break;
    case 3: attention_pv(3, a, scores, stride, outacc, kv_base, n_max, kind); break;
    case 4: attention_pv(4, a, scores, stride, outacc, kv_base, n_max, kind); break;
    case 5: attention_pv(5, a, scores, stride, outacc, kv_base, n_max, kind); break;
    case 6: attention_pv(6, a, scores, stride, outacc, kv_base, n_max, kind); break;
    case 7: attention_pv(7, a, scores, stride, outacc, kv_base, n_max, kind); break;
    default: attention_pv(8, a, scores, stride, outacc, kv_base, n_max, kind); break;
    }
}

/* od_attn_probabilities with F16C: vcvtps2ph rounds to nearest even, as od_fp32_to_fp16 does. */
OD_AVX2_INLINE float attn_probabilities(float *scores, int64_t n, float total, const int kind) {
    if (kind != 1) return od_attn_probabilities(scores, n, total, 0);
    const float inv = 1.0f / total;
    const __m256 vinv = _mm256_set1_ps(inv);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(scores + t), vinv), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(scores + t, _mm256_cvtph_ps(h));
    }
    od_attn_probabilities(scores + t, n - t, total, 1);
    return 1.0f;
}

OD_AVX2_INLINE void store_scaled(float *o, const float *acc, float inv, int64_t d) {
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(acc + c), vinv));
}

/* The table's per-head kernel: the driver (attention.c) calls it only for head sizes that are not a multiple of 8;
 * every other f16/f32 cache goes through od_attention_group_avx2. */
OD_AVX2 void od_attention_avx2(const od_attn_args *a, int64_t head, int64_t r0, int64_t r1, float *scratch) {
    attention_rows_avx2(a, head, r0, r1, scratch);
}

/* ------------------------------------------------------------------ attention by KV head */

/*
 * R = (g1-g0) * (r1-r0) <= 8 (head, row) pairs of KV head kvh, every K/V row loaded once for all the query heads
 * that read it (the GQA group):
 *   1. scores S[v][t] = scale * q_v . k_t, 8 keys at a time (8 register accumulators, one hadd-tree reduction): a
 *      Q8_0 cache (kind 2) dequantizes them to f32 (scratch, L1) first, f16/f32 read straight from the cache; then
 *      the causal mask (-inf) for keys a row may not see;
 *   2. softmax numerators per pair (f16: the probabilities rounded as od_attn_probabilities does);
 *   3. O = P V with each V chunk loaded (dequantized) once for all pairs.
 * d % 8 == 0 (Q8_0: d % 32 == 0; checked by the driver).
 */
OD_AVX2_INLINE void attention_group(const od_attn_args *a, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                                    float *scratch, const int kind) {
    const int64_t d = a->d;
    const int R = (int)((r1 - r0) * (g1 - g0));
    const size_t kv_base = (size_t)kvh * a->c * d; /* element index of the KV head's first row */
    const int64_t n_max = a->pos0 + r1;              /* keys seen by the last row */
    const int64_t stride = (n_max + 7) & ~(int64_t)7;
    float *scores = scratch;             /* [R][stride] */
    float *outacc = scores + R * stride; /* [R][d] */
    float *keys = outacc + R * d;        /* [8][d], Q8_0 only */
    const float *qrow[OD_ATTN_GROUP_ROWS];
    float *orow[OD_ATTN_GROUP_ROWS], *lse[OD_ATTN_GROUP_ROWS];
    int64_t n_keys[OD_ATTN_GROUP_ROWS];
    for (int v = 0; v < R; v++) od_attn_group_pair(a, kvh, g0, g1, r0, v, &qrow[v], &orow[v], &n_keys[v], &lse[v]);
    const __m256 vscale = _mm256_set1_ps(a->scale);
    size_t key_at[8];
    for (int j = 0; j < 8; j++) key_at[j] = (size_t)j * d;

    /* 1. scores */
    for (int64_t t = 0; t < n_max; t += 8) {
        for (int j = 0; j < 8; j++) {
            const size_t from = kv_base + (size_t)(t + j < n_max ? t + j : t) * d; /* pad: repeat a valid key */
            if (kind != 2) key_at[j] = from;
            else
                for (int64_t c = 0; c < d; c += 8) _mm256_store_ps(keys + j * d + c, load_kv8(a->k_cache, 2, from + c));
        }
        const void *key_rows = kind == 2 ? (const void *)keys : a->k_cache;
        const int key_kind = kind == 2 ? 0 : kind;
        for (int v = 0; v < R; v++)
            _mm256_storeu_ps(scores + v * stride + t, scores8(qrow[v], d, key_rows, key_kind, key_at, vscale));
    }
    /* causal mask (and the padding up to the stride) */
    for (int v = 0; v < R; v++)
        for (int64_t t = n_keys[v]; t < stride; t++) scores[v * stride + t] = -INFINITY;

    /* 2. softmax numerators; remember the factor each pair's P V still needs */
    float inv_sum[OD_ATTN_GROUP_ROWS];
    for (int v = 0; v < R; v++) {
        float maxv;
        const float total = softmax_numerators(scores + v * stride, stride, &maxv);
        inv_sum[v] = attn_probabilities(scores + v * stride, n_max, total, kind);
        if (lse[v]) lse[v][0] = maxv, lse[v][1] = total;
    }

    /* 3. O = P V */
    attention_pv_rows(R, a, scores, stride, outacc, kv_base, n_max, kind);
    for (int v = 0; v < R; v++) store_scaled(orow[v], outacc + v * d, inv_sum[v], d);
}

OD_AVX2 void od_attention_q8_avx2(const od_attn_args *a, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                                  float *scratch) {
    attention_group(a, kvh, g0, g1, r0, r1, scratch, 2);
}

OD_AVX2 void od_attention_group_avx2(const od_attn_args *a, int64_t kvh, int64_t g0, int64_t g1, int64_t r0,
                                     int64_t r1, float *scratch) {
    if (a->kv_f16) attention_group(a, kvh, g0, g1, r0, r1, scratch, 1);
    else attention_group(a, kvh, g0, g1, r0, r1, scratch, 0);
}

/* ------------------------------------------------------------------ silu * up, add */

OD_AVX2 void od_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_ps(_mm256_xor_ps(g, sign));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

OD_AVX2 void od_gelu_mul_avx2(float *out, const float *gate, const float *up, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), a = _mm256_set1_ps(OD_GELU_A), b = _mm256_set1_ps(OD_GELU_B);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp_ps(_mm256_mul_ps(g, _mm256_fmadd_ps(b, _mm256_mul_ps(g, g), a)));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(gate[i] * (OD_GELU_A + OD_GELU_B * gate[i] * gate[i]))) * up[i];
}

OD_AVX2 void od_add_avx2(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) x[i] += y[i];
}

#endif /* x86-64 */
