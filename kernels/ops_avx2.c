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

OD_AVX2_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/*
 * exp(x) for 8 floats: x = n*ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by a degree-6
 * polynomial (Cephes expf coefficients), 2^n through the exponent bits. ~1 ulp on the clamped
 * range; inputs below -87.3 return ~1e-38 instead of 0 and above 88.37 saturate near FLT_MAX,
 * which is what softmax (x <= 0) and silu need.
 */
OD_AVX2_INLINE __m256 exp_ps(__m256 x) {
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
    return _mm256_mul_ps(_mm256_mul_ps(p, pow_a), pow_b);
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

OD_AVX2_INLINE __m256 load_kv8(const void *cache, int kv_f16, size_t index) {
    if (kv_f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + index)));
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

OD_AVX2 void od_attention_avx2(const od_attn_args *a, int64_t head, int64_t r0, int64_t r1, float *scratch) {
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
        const float inv = 1.0f / total;
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

OD_AVX2 void od_add_avx2(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) x[i] += y[i];
}

#endif /* x86-64 */
