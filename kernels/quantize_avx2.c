/*
 * AVX2 forms of the K-quant scale searches in quantize.c. The searches are sequential within a sub-block (each
 * sum adds its terms in index order, as the reference does), so the lanes hold different sub-blocks: 8 at once,
 * every lane doing exactly the scalar operations in the scalar order. Rounding is vroundps to nearest even,
 * which is what nearest_int computes. tests/test_quant.py compares these with the scalar path.
 */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <string.h>

#include "od_internal.h"

#define OD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OD_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

OD_AVX2_INLINE __m256 round_even(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

OD_AVX2_INLINE __m256 clamp(__m256 v, __m256 lo, __m256 hi) { return _mm256_min_ps(_mm256_max_ps(v, lo), hi); }

OD_AVX2_INLINE __m256 blend(__m256 a, __m256 b, __m256 take_b) { return _mm256_blendv_ps(a, b, take_b); }

/* The 8 sub-blocks of 32 of a Q4_K / Q5_K super-block (search_scale_min under p): x and w [256] as in memory,
 * L [256] codes out, scales/neg_mins [8] out. */
OD_AVX2 void od_k_min_search_avx2(const float *x, const float *w, const od_k_search *p, uint8_t *L, float *scales,
                                  float *neg_mins) {
    __m256 xt[32], wt[32], codes[32], trial[32];
    for (int i = 0; i < 32; i++) {
        xt[i] = _mm256_setr_ps(x[i], x[32 + i], x[64 + i], x[96 + i], x[128 + i], x[160 + i], x[192 + i], x[224 + i]);
        wt[i] = _mm256_setr_ps(w[i], w[32 + i], w[64 + i], w[96 + i], w[128 + i], w[160 + i], w[192 + i], w[224 + i]);
    }
    const __m256 zero = _mm256_setzero_ps(), nmax = _mm256_set1_ps((float)p->nmax);
    /* compare-and-blend, not vminps/vmaxps: the scalar code keeps the first of equal values (-0.0 vs 0.0) */
    __m256 mn = xt[0], mx = xt[0], sum_w = wt[0], sum_x = _mm256_mul_ps(wt[0], xt[0]);
    for (int i = 1; i < 32; i++) {
        mn = blend(mn, xt[i], _mm256_cmp_ps(xt[i], mn, _CMP_LT_OQ));
        mx = blend(mx, xt[i], _mm256_cmp_ps(xt[i], mx, _CMP_GT_OQ));
        sum_w = _mm256_add_ps(sum_w, wt[i]);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(wt[i], xt[i]));
    }
    mn = blend(mn, zero, _mm256_cmp_ps(mn, zero, _CMP_GT_OQ));
    const __m256 flat = _mm256_cmp_ps(mx, mn, _CMP_EQ_OQ);
    __m256 iscale = _mm256_div_ps(nmax, _mm256_sub_ps(mx, mn));
    __m256 scale = _mm256_div_ps(_mm256_set1_ps(1.0f), iscale), best_error = zero;
    for (int i = 0; i < 32; i++) {
        codes[i] = clamp(round_even(_mm256_mul_ps(iscale, _mm256_sub_ps(xt[i], mn))), zero, nmax);
        const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, codes[i]), mn), xt[i]);
        best_error = _mm256_add_ps(best_error, _mm256_mul_ps(wt[i], _mm256_mul_ps(diff, diff)));
    }
    for (int step = 0; step <= p->nstep; step++) {
        const float numerator = p->rmin + p->rdelta * (float)step + (float)p->nmax;
        iscale = _mm256_div_ps(_mm256_set1_ps(numerator), _mm256_sub_ps(mx, mn));
        __m256 sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < 32; i++) {
            trial[i] = clamp(round_even(_mm256_mul_ps(iscale, _mm256_sub_ps(xt[i], mn))), zero, nmax);
            const __m256 wl = _mm256_mul_ps(wt[i], trial[i]);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, trial[i]));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, xt[i]));
        }
        const __m256 det = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        const __m256 solvable = _mm256_andnot_ps(flat, _mm256_cmp_ps(det, zero, _CMP_GT_OQ));
        if (_mm256_movemask_ps(solvable) == 0) continue;
        __m256 this_scale = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)), det);
        __m256 this_min = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)), det);
        const __m256 positive = _mm256_cmp_ps(this_min, zero, _CMP_GT_OQ);
        this_scale = blend(this_scale, _mm256_div_ps(sum_xl, sum_l2), positive);
        this_min = blend(this_min, zero, positive);
        __m256 error = zero;
        for (int i = 0; i < 32; i++) {
            const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(this_scale, trial[i]), this_min), xt[i]);
            error = _mm256_add_ps(error, _mm256_mul_ps(wt[i], _mm256_mul_ps(diff, diff)));
        }
        const __m256 better = _mm256_and_ps(solvable, _mm256_cmp_ps(error, best_error, _CMP_LT_OQ));
        if (_mm256_movemask_ps(better) == 0) continue;
        for (int i = 0; i < 32; i++) codes[i] = blend(codes[i], trial[i], better);
        best_error = blend(best_error, error, better);
        scale = blend(scale, this_scale, better);
        mn = blend(mn, this_min, better);
    }
    scale = _mm256_andnot_ps(flat, scale);  /* constant sub-blocks: scale 0, codes 0, the min kept */
    _mm256_storeu_ps(scales, scale);
    _mm256_storeu_ps(neg_mins, _mm256_sub_ps(zero, mn));
    float lanes[8];
    for (int i = 0; i < 32; i++) {
        _mm256_storeu_ps(lanes, _mm256_andnot_ps(flat, codes[i]));
        for (int j = 0; j < 8; j++) L[32 * j + i] = (uint8_t)lanes[j];
    }
}

/* 8 of the 16 sub-blocks of 16 of a Q6_K super-block (search_scale_weighted with nmax 32, weights qw or x^2 when
 * qw is NULL): sub-block j of x is x[16 j .. 16 j + 16); L [128] codes out, scales [8] out. */
OD_AVX2 static void q6_k_search8(const float *x, const float *qw, uint8_t *L, float *scales) {
    __m256 xt[16], wts[16], codes[16], trial[16];
    for (int i = 0; i < 16; i++) {
        xt[i] = _mm256_setr_ps(x[i], x[16 + i], x[32 + i], x[48 + i], x[64 + i], x[80 + i], x[96 + i], x[112 + i]);
        wts[i] = qw ? _mm256_setr_ps(qw[i], qw[16 + i], qw[32 + i], qw[48 + i], qw[64 + i], qw[80 + i], qw[96 + i],
                                     qw[112 + i])
                    : _mm256_mul_ps(xt[i], xt[i]);
    }
    const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    const __m256 lo = _mm256_set1_ps(-32.0f), hi = _mm256_set1_ps(31.0f), offset = _mm256_set1_ps(32.0f);
    __m256 amax = zero, max = zero;
    for (int i = 0; i < 16; i++) {
        const __m256 ax = _mm256_andnot_ps(sign, xt[i]);
        const __m256 larger = _mm256_cmp_ps(ax, amax, _CMP_GT_OQ);
        amax = blend(amax, ax, larger);
        max = blend(max, xt[i], larger);
    }
    const __m256 tiny = _mm256_cmp_ps(amax, _mm256_set1_ps(1e-15f), _CMP_LT_OQ);
    __m256 iscale = _mm256_div_ps(_mm256_set1_ps(-32.0f), max), sumlx = zero, suml2 = zero;
    for (int i = 0; i < 16; i++) {
        const __m256 l = clamp(round_even(_mm256_mul_ps(iscale, xt[i])), lo, hi);
        codes[i] = l;
        const __m256 wt = wts[i];
        sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(_mm256_mul_ps(wt, xt[i]), l));
        suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(wt, l), l));
    }
    __m256 scale = _mm256_and_ps(_mm256_cmp_ps(suml2, zero, _CMP_NEQ_UQ), _mm256_div_ps(sumlx, suml2));
    __m256 best = _mm256_mul_ps(scale, sumlx);
    for (int step = -9; step <= 9; step++) {
        if (step == 0) continue;
        iscale = _mm256_div_ps(_mm256_set1_ps(-(32.0f + 0.1f * (float)step)), max);
        sumlx = suml2 = zero;
        for (int i = 0; i < 16; i++) {
            trial[i] = clamp(round_even(_mm256_mul_ps(iscale, xt[i])), lo, hi);
            const __m256 wt = wts[i];
            sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(_mm256_mul_ps(wt, xt[i]), trial[i]));
            suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(wt, trial[i]), trial[i]));
        }
        const __m256 better = _mm256_and_ps(_mm256_cmp_ps(suml2, zero, _CMP_GT_OQ),
                                            _mm256_cmp_ps(_mm256_mul_ps(sumlx, sumlx), _mm256_mul_ps(best, suml2),
                                                          _CMP_GT_OQ));
        if (_mm256_movemask_ps(better) == 0) continue;
        for (int i = 0; i < 16; i++) codes[i] = blend(codes[i], trial[i], better);
        scale = blend(scale, _mm256_div_ps(sumlx, suml2), better);
        best = blend(best, _mm256_mul_ps(scale, sumlx), better);
    }
    _mm256_storeu_ps(scales, _mm256_andnot_ps(tiny, scale));
    float lanes[8];
    for (int i = 0; i < 16; i++) {
        _mm256_storeu_ps(lanes, _mm256_andnot_ps(tiny, _mm256_add_ps(codes[i], offset)));
        for (int j = 0; j < 8; j++) L[16 * j + i] = (uint8_t)lanes[j];
    }
}

OD_AVX2 void od_q6_k_search_avx2(const float *x, const float *qw, uint8_t *L, float *scales) {
    q6_k_search8(x, qw, L, scales);
    q6_k_search8(x + 128, qw ? qw + 128 : NULL, L + 128, scales + 8);
}

#endif /* x86-64 */
