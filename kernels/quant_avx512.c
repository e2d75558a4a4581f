/*
 * AVX-512 VNNI matrix-vector kernels for the repacked layouts (x86-64 with AVX512F/BW/VL/VNNI). The table is
 * od_ops_avx2 with these entries replaced; every function carries the target attribute, so the file is compiled
 * without -mavx512* and only runs after dispatch.c has checked the CPU.
 *
 * vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products into an int32 lane. In the X8
 * layouts (blocks.h) a 32-byte load holds 4 codes of each of 8 weight rows, so one vpdpbusd against a broadcast
 * 4-byte group of one activation row advances the 8 rows' integer dot products at once, with no int16 stage (no
 * overflow bound, no vpmaddwd). Unsigned codes (Q4_0, Q4_1, Q4_K nibbles) are the unsigned operand as they are;
 * Q8_0_X8 stores code + 128, and the 128 * sum(x) it adds is subtracted per block in integers. The integer sums
 * are exact, so the per-row arithmetic is: integer block dot -> one convert -> the float scale terms of the AVX2
 * kernels, identical for every number of activation rows (the OD_MATMUL_EXACT_ROWS contract).
 *
 * The tiles serve every M (weight groups outer, so M rows read the weights once) except Q4_0_X8 above
 * OD_MATMUL_EXACT_ROWS, which takes the AVX2 GEMM.
 */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <pthread.h>
#include <string.h>

#include "od_internal.h"
#include "x86_x8.h"

#define OD_VNNI_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
#define OD_VNNI __attribute__((target(OD_VNNI_TARGET)))
#define OD_VNNI_INLINE static inline __attribute__((always_inline, target(OD_VNNI_TARGET)))

#if defined(__clang__)
#define OD_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define OD_UNROLL _Pragma("GCC unroll 16")
#else
#define OD_UNROLL
#endif

/* activation rows one pass over a group of 8 weight rows serves (accumulators: 3 vectors per row) */
#define VNNI_G 4

OD_VNNI_INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

OD_VNNI_INLINE void store8(float *dst, __m256 v, int accumulate) {
    _mm256_storeu_ps(dst, accumulate ? _mm256_add_ps(_mm256_loadu_ps(dst), v) : v);
}

/* Q4_0_X8 (scale only, code bias 8) and Q4_1_X8 (scale and min): 8 weight rows x G activation rows from j0. */
OD_VNNI_INLINE void tile_q4_x8(const int with_min, const int G, const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t nb = act->nb;
    const size_t block_bytes = with_min ? OD_X8_Q4_1_BLOCK_BYTES : OD_X8_BLOCK_BYTES;
    const size_t codes = with_min ? 32 : 16;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m256 acc[VNNI_G], off[VNNI_G];
    x8_tile_start(G, act, j0, xq, xds, acc, off);
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = group + b * block_bytes;
        for (size_t p = 0; p < block_bytes; p += 64) _mm_prefetch((const char *)blk + 6 * block_bytes + p, _MM_HINT_T0);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i isum[VNNI_G];
        OD_UNROLL
        for (int g = 0; g < G; g++) isum[g] = _mm256_setzero_si256();
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + codes + 32 * c));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const int8_t *x = xq[g] + b * OD_QK + 4 * c;
                isum[g] = _mm256_dpbusd_epi32(isum[g], lo, bcast4(x));
                isum[g] = _mm256_dpbusd_epi32(isum[g], hi, bcast4(x + 16));
            }
        }
        const __m256 mw = with_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))) : dw;
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g]), _mm256_mul_ps(dw, _mm256_set1_ps(xds[g][2 * b])),
                                     acc[g]);
            off[g] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xds[g][2 * b + 1]), off[g]);
        }
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) {
        const __m256 v = with_min ? _mm256_add_ps(acc[g], off[g]) : _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), off[g], acc[g]);
        store8(a->out + (j0 + g) * a->ldo + n, v, a->accumulate);
    }
}

/* Q8_0_X8: codes stored + 128; xsum[g][b] = the activation block's code sum. */
OD_VNNI_INLINE void tile_q8_0_x8(const int G, const od_mm_args *a, int64_t n, int64_t j0, const int32_t *xsum) {
    const od_q8_act *act = a->act;
    const int64_t nb = act->nb;
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m256 acc[VNNI_G], unused[VNNI_G];
    x8_tile_start(G, act, j0, xq, xds, acc, unused);
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = group + b * OD_X8_Q8_0_BLOCK_BYTES;
        for (size_t p = 0; p < OD_X8_Q8_0_BLOCK_BYTES; p += 64)
            _mm_prefetch((const char *)blk + 4 * OD_X8_Q8_0_BLOCK_BYTES + p, _MM_HINT_T0);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i isum[VNNI_G];
        OD_UNROLL
        for (int g = 0; g < G; g++) isum[g] = _mm256_set1_epi32(-128 * xsum[(j0 + g) * nb + b]);
        OD_UNROLL
        for (int c = 0; c < 8; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c));
            OD_UNROLL
            for (int g = 0; g < G; g++) isum[g] = _mm256_dpbusd_epi32(isum[g], v, bcast4(xq[g] + b * OD_QK + 4 * c));
        }
        OD_UNROLL
        for (int g = 0; g < G; g++)
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[g]), _mm256_mul_ps(dw, _mm256_set1_ps(xds[g][2 * b])),
                                     acc[g]);
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) store8(a->out + (j0 + g) * a->ldo + n, acc[g], a->accumulate);
}

/*
 * Q4_K_X8: per sub-block of 32 the 8 steps' vpdpbusd give the 8 rows' integer dots, multiplied by the rows'
 * 6-bit sub-block scales in int32 and summed over the super-block before one convert and FMA with d * d_x; the
 * mins term is sum over sub-blocks of mn * s_x, times dmin (as the AVX2 kernel).
 */
OD_VNNI_INLINE void tile_q4_k_x8(const int G, const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t nsb = a->k / OD_QK_K;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m256 acc[VNNI_G], off[VNNI_G];
    x8_tile_start(G, act, j0, xq, xds, acc, off);
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = group + sb * OD_K_X8_SB_BYTES;
        __m256i isum[VNNI_G];
        __m256 mins[VNNI_G];
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            isum[g] = _mm256_setzero_si256();
            mins[g] = _mm256_setzero_ps();
        }
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const uint8_t *steps = blk + OD_K_X8_CODES + c * 8 * 32;
            for (size_t p = 0; p < 256; p += 64) _mm_prefetch((const char *)steps + 2 * OD_K_X8_SB_BYTES + p, _MM_HINT_T0);
            __m256i s_lo[VNNI_G], s_hi[VNNI_G];
            OD_UNROLL
            for (int g = 0; g < G; g++) s_lo[g] = s_hi[g] = _mm256_setzero_si256();
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(steps + 32 * s));
                const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    const int8_t *x = xq[g] + sb * OD_QK_K + 64 * c + 4 * s;
                    s_lo[g] = _mm256_dpbusd_epi32(s_lo[g], lo, bcast4(x));
                    s_hi[g] = _mm256_dpbusd_epi32(s_hi[g], hi, bcast4(x + 32));
                }
            }
            OD_UNROLL
            for (int h = 0; h < 2; h++) {
                const int sub = 2 * c + h;
                __m256i sc;
                __m256 mn;
                x8_k_sub_scales(blk, sub, &sc, &mn);
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    isum[g] = _mm256_add_epi32(isum[g], _mm256_mullo_epi32(h ? s_hi[g] : s_lo[g], sc));
                    mins[g] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xds[g][2 * (sb * 8 + sub) + 1]), mins[g]);
                }
            }
        }
        OD_UNROLL
        for (int g = 0; g < G; g++) x8_k_finish(blk, sb, xds[g], isum[g], mins[g], &acc[g], &off[g]);
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) store8(a->out + (j0 + g) * a->ldo + n, _mm256_sub_ps(acc[g], off[g]), a->accumulate);
}

/* One group of 8 weight rows times activation rows [j0, j0 + G). */
OD_VNNI_INLINE void tile(const int type, const int G, const od_mm_args *a, int64_t n, int64_t j0, const int32_t *xsum) {
    switch (type) {
    case OD_TYPE_Q4_0_X8: tile_q4_x8(0, G, a, n, j0); break;
    case OD_TYPE_Q4_1_X8: tile_q4_x8(1, G, a, n, j0); break;
    case OD_TYPE_Q8_0_X8: tile_q8_0_x8(G, a, n, j0, xsum); break;
    default: tile_q4_k_x8(G, a, n, j0); break;
    }
}

/* Weight groups outer: every activation row passes over a group while it is in L1. */
OD_VNNI_INLINE void gemv_vnni(const int type, const od_mm_args *a, int64_t n0, int64_t n1) {
    int32_t *xsum = NULL;
    if (type == OD_TYPE_Q8_0_X8) {
        const od_q8_act *act = a->act;
        xsum = od_scratch(1, (size_t)(a->m * act->nb) * sizeof(int32_t));
        if (!xsum) return;
        for (int64_t i = 0; i < a->m * act->nb; i++) {
            int32_t s = 0;
            for (int e = 0; e < OD_QK; e++) s += act->qs[i * OD_QK + e];
            xsum[i] = s;
        }
    }
    for (int64_t n = n0; n < n1; n += OD_X8_ROWS) {
        int64_t j = 0;
        for (; j + VNNI_G <= a->m; j += VNNI_G) tile(type, VNNI_G, a, n, j, xsum);
        switch (a->m - j) {
        case 3: tile(type, 3, a, n, j, xsum); break;
        case 2: tile(type, 2, a, n, j, xsum); break;
        case 1: tile(type, 1, a, n, j, xsum); break;
        default: break;
        }
    }
}

/* Larger M: the same tiles (measured faster than the AVX2 GEMM for these layouts, and exact for every M), except
 * Q4_0_X8, whose AVX2 GEMM panel wins (benchmarks/kernels_bench.py, BENCHMARKS.md 4.1). */
OD_VNNI static void matmul_q4_0_x8_vnni(const od_mm_args *a, int64_t n0, int64_t n1) {
    if (a->m > OD_MATMUL_EXACT_ROWS) od_matmul_q4_0_x8_avx2(a, n0, n1);
    else gemv_vnni(OD_TYPE_Q4_0_X8, a, n0, n1);
}

#define DEFINE_VNNI_MATMUL(NAME, TYPE) \
    OD_VNNI static void NAME(const od_mm_args *a, int64_t n0, int64_t n1) { gemv_vnni(TYPE, a, n0, n1); }
DEFINE_VNNI_MATMUL(matmul_q4_k_x8_vnni, OD_TYPE_Q4_K_X8)
DEFINE_VNNI_MATMUL(matmul_q4_1_x8_vnni, OD_TYPE_Q4_1_X8)
DEFINE_VNNI_MATMUL(matmul_q8_0_x8_vnni, OD_TYPE_Q8_0_X8)

static od_isa_ops g_avx512;
static pthread_once_t g_avx512_once = PTHREAD_ONCE_INIT;

static void build_table(void) {
    g_avx512 = od_ops_avx2;
    g_avx512.name = "avx512";
    g_avx512.matmul[OD_TYPE_Q4_0_X8] = matmul_q4_0_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q4_K_X8] = matmul_q4_k_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q4_1_X8] = matmul_q4_1_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q8_0_X8] = matmul_q8_0_x8_vnni;
}

const od_isa_ops *od_ops_avx512(void) {
    pthread_once(&g_avx512_once, build_table);
    return &g_avx512;
}

#endif /* x86-64 */
