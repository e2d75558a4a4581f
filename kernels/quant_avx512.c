/*
 * AVX-512 VNNI matrix-vector kernels for the repacked layouts (x86-64 with AVX512F/BW/VL/VNNI). The table is
 * od_ops_avx2 with these entries replaced; every function carries the target attribute, so the file is compiled
 * without -mavx512* and only runs after dispatch.c has checked the CPU.
 *
 * vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products into an int32 lane. In the X8
 * layouts (blocks.h) a 32-byte load holds 4 codes of each of 8 weight rows, so one vpdpbusd against a broadcast
 * 4-byte group of one activation row advances the 8 rows' integer dot products at once, with no int16 stage (no
 * overflow bound, no vpmaddwd). Unsigned codes (Q4_0, Q4_1, Q4_K nibbles) are the unsigned operand as they are;
 * Q8_0_X8 stores code + 128, and the 128 * sum(x) it adds is subtracted per block in integers; Q6_K_X8 codes are
 * 0..63 and its -32 is folded in the same way, per sub-block of 16. The integer sums
 * are exact, so the per-row arithmetic is: integer block dot -> one convert -> the float scale terms of the AVX2
 * kernels, identical for every number of activation rows (the OD_MATMUL_EXACT_ROWS contract).
 *
 * The tiles serve every M (weight groups outer, so M rows read the weights once): measured faster than the AVX2
 * GEMM for prefill too, and exact for every M.
 */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <pthread.h>
#include <string.h>

#include "od_internal.h"

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

/* activation rows one pass over a pair of weight groups serves, at most (the tiles' accumulator arrays) */
#define VNNI_G 8
/* ... and per type: Q6_K_X8 keeps 5 accumulators per row, and more than 4 rows spill (measured slower) */
#define VNNI_ROWS(type) ((type) == OD_TYPE_Q6_K_X8 ? 4 : 8)

/*
 * A tile is 16 weight rows: the groups of 8 at rows n and n + 8, side by side in the two 256-bit halves of each
 * zmm vector (w1 == w0 for a last single group, whose upper half is then computed and not stored). Each row's
 * lane sees the same integer sums and float operations whatever the tile, so results do not depend on M.
 */
typedef struct {
    const uint8_t *w0, *w1;
    int rows; /* 8 or 16 */
} pair_t;

OD_VNNI_INLINE pair_t weight_pair(const od_mm_args *a, int64_t n, int64_t n1) {
    const uint8_t *w0 = a->w + (size_t)n * a->row_bytes;
    const int both = n + OD_X8_ROWS < n1;
    return (pair_t){w0, both ? w0 + OD_X8_ROWS * a->row_bytes : w0, both ? 16 : 8};
}

/* 32 bytes at offset off of each group -> one zmm */
OD_VNNI_INLINE __m512i load_pair(const pair_t *p, size_t off) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p->w0 + off))),
                              _mm256_loadu_si256((const __m256i *)(p->w1 + off)), 1);
}

/* 8 fp16 at offset off of each group -> 16 floats */
OD_VNNI_INLINE __m512 load_pair_ph(const pair_t *p, size_t off) {
    const __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p->w0 + off))),
                                              _mm_loadu_si128((const __m128i *)(p->w1 + off)), 1);
    return _mm512_cvtph_ps(h);
}

/* 8 bytes at offset off of each group -> 16 int32 lanes, zero- or sign-extended */
OD_VNNI_INLINE __m128i load_pair_8(const pair_t *p, size_t off) {
    return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(p->w0 + off)),
                              _mm_loadl_epi64((const __m128i *)(p->w1 + off)));
}

OD_VNNI_INLINE void prefetch_pair(const pair_t *p, size_t off, size_t bytes) {
    for (size_t q = 0; q < bytes; q += 64) {
        _mm_prefetch((const char *)p->w0 + off + q, _MM_HINT_T0);
        _mm_prefetch((const char *)p->w1 + off + q, _MM_HINT_T0);
    }
}

OD_VNNI_INLINE __m512i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

OD_VNNI_INLINE void store_pair(float *dst, __m512 v, int rows, int accumulate) {
    const __mmask16 m = rows == 16 ? 0xFFFF : 0x00FF;
    if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), v);
    _mm512_mask_storeu_ps(dst, m, v);
}

OD_VNNI_INLINE void tile_start(const int G, const od_q8_act *act, int64_t j0, const int8_t **xq, const float **xds,
                               __m512 *acc, __m512 *offset) {
    for (int g = 0; g < G; g++) {
        xq[g] = act->qs + (j0 + g) * act->k;
        xds[g] = act->ds + (j0 + g) * act->nb * 2;
        acc[g] = offset[g] = _mm512_setzero_ps();
    }
}

/* Q4_0_X8 (scale only, code bias 8) and Q4_1_X8 (scale and min): 16 weight rows x G activation rows from j0. */
OD_VNNI_INLINE void tile_q4_x8(const int with_min, const int G, const od_mm_args *a, const pair_t *p, int64_t n,
                               int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t nb = act->nb;
    const size_t block_bytes = with_min ? OD_X8_Q4_1_BLOCK_BYTES : OD_X8_BLOCK_BYTES;
    const size_t codes = with_min ? 32 : 16;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m512 acc[VNNI_G], off[VNNI_G];
    tile_start(G, act, j0, xq, xds, acc, off);
    for (int64_t b = 0; b < nb; b++) {
        const size_t blk = (size_t)b * block_bytes;
        prefetch_pair(p, blk + 6 * block_bytes, block_bytes);
        const __m512 dw = load_pair_ph(p, blk);
        /* few rows: the low and high nibbles in two dependency chains, added at the end (exact) */
        __m512i isum[VNNI_G], isum_hi[VNNI_G];
        OD_UNROLL
        for (int g = 0; g < G; g++) isum[g] = isum_hi[g] = _mm512_setzero_si512();
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const __m512i v = load_pair(p, blk + codes + 32 * c);
            const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const int8_t *x = xq[g] + b * OD_QK + 4 * c;
                isum[g] = _mm512_dpbusd_epi32(isum[g], lo, bcast4(x));
                if (G <= 4) isum_hi[g] = _mm512_dpbusd_epi32(isum_hi[g], hi, bcast4(x + 16));
                else isum[g] = _mm512_dpbusd_epi32(isum[g], hi, bcast4(x + 16));
            }
        }
        OD_UNROLL
        for (int g = 0; g < G && G <= 4; g++) isum[g] = _mm512_add_epi32(isum[g], isum_hi[g]);
        const __m512 mw = with_min ? load_pair_ph(p, blk + 16) : dw;
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g]), _mm512_mul_ps(dw, _mm512_set1_ps(xds[g][2 * b])),
                                     acc[g]);
            off[g] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xds[g][2 * b + 1]), off[g]);
        }
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) {
        const __m512 v = with_min ? _mm512_add_ps(acc[g], off[g]) : _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), off[g], acc[g]);
        store_pair(a->out + (j0 + g) * a->ldo + n, v, p->rows, a->accumulate);
    }
}

/* Q8_0_X8: codes stored + 128; xsum[g][b] = the activation block's code sum. */
OD_VNNI_INLINE void tile_q8_0_x8(const int G, const od_mm_args *a, const pair_t *p, int64_t n, int64_t j0,
                                 const int32_t *xsum) {
    const od_q8_act *act = a->act;
    const int64_t nb = act->nb;
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m512 acc[VNNI_G], unused[VNNI_G];
    tile_start(G, act, j0, xq, xds, acc, unused);
    for (int64_t b = 0; b < nb; b++) {
        const size_t blk = (size_t)b * OD_X8_Q8_0_BLOCK_BYTES;
        prefetch_pair(p, blk + 4 * OD_X8_Q8_0_BLOCK_BYTES, OD_X8_Q8_0_BLOCK_BYTES);
        const __m512 dw = load_pair_ph(p, blk);
        __m512i isum[VNNI_G], isum_odd[VNNI_G];  /* few rows: even and odd chunks in two dependency chains */
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            isum[g] = _mm512_set1_epi32(-128 * xsum[(j0 + g) * nb + b]);
            isum_odd[g] = _mm512_setzero_si512();
        }
        OD_UNROLL
        for (int c = 0; c < 8; c++) {
            const __m512i v = load_pair(p, blk + 16 + 32 * c);
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const __m512i x = bcast4(xq[g] + b * OD_QK + 4 * c);
                if (G <= 4 && c % 2) isum_odd[g] = _mm512_dpbusd_epi32(isum_odd[g], v, x);
                else isum[g] = _mm512_dpbusd_epi32(isum[g], v, x);
            }
        }
        OD_UNROLL
        for (int g = 0; g < G && G <= 4; g++) isum[g] = _mm512_add_epi32(isum[g], isum_odd[g]);
        OD_UNROLL
        for (int g = 0; g < G; g++)
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g]), _mm512_mul_ps(dw, _mm512_set1_ps(xds[g][2 * b])),
                                     acc[g]);
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) store_pair(a->out + (j0 + g) * a->ldo + n, acc[g], p->rows, a->accumulate);
}

/*
 * Q4_K_X8: per sub-block of 32 the 8 steps' vpdpbusd give the rows' integer dots, multiplied by the rows'
 * 6-bit sub-block scales in int32 and summed over the super-block before one convert and FMA with d * d_x; the
 * mins term is sum over sub-blocks of mn * s_x, times dmin (as the AVX2 kernel).
 */
OD_VNNI_INLINE void tile_q4_k_x8(const int G, const od_mm_args *a, const pair_t *p, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t nsb = a->k / OD_QK_K;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m512 acc[VNNI_G], off[VNNI_G];
    tile_start(G, act, j0, xq, xds, acc, off);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const size_t blk = (size_t)sb * OD_K_X8_SB_BYTES;
        __m512i isum[VNNI_G];
        __m512 mins[VNNI_G];
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            isum[g] = _mm512_setzero_si512();
            mins[g] = _mm512_setzero_ps();
        }
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const size_t steps = blk + OD_K_X8_CODES + c * 8 * 32;
            prefetch_pair(p, steps + 2 * OD_K_X8_SB_BYTES, 256);
            __m512i s_lo[VNNI_G], s_hi[VNNI_G];
            OD_UNROLL
            for (int g = 0; g < G; g++) s_lo[g] = s_hi[g] = _mm512_setzero_si512();
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m512i v = load_pair(p, steps + 32 * s);
                const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    const int8_t *x = xq[g] + sb * OD_QK_K + 64 * c + 4 * s;
                    s_lo[g] = _mm512_dpbusd_epi32(s_lo[g], lo, bcast4(x));
                    s_hi[g] = _mm512_dpbusd_epi32(s_hi[g], hi, bcast4(x + 32));
                }
            }
            OD_UNROLL
            for (int h = 0; h < 2; h++) {
                const int sub = 2 * c + h;
                const __m512i sc = _mm512_cvtepu8_epi32(load_pair_8(p, blk + OD_K_X8_SC + 8 * sub));
                const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load_pair_8(p, blk + OD_K_X8_MN + 8 * sub)));
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    isum[g] = _mm512_add_epi32(isum[g], _mm512_mullo_epi32(h ? s_hi[g] : s_lo[g], sc));
                    mins[g] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xds[g][2 * (sb * 8 + sub) + 1]), mins[g]);
                }
            }
        }
        const __m512 d = load_pair_ph(p, blk), dmin = load_pair_ph(p, blk + 16);
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g]), _mm512_mul_ps(d, _mm512_set1_ps(xds[g][2 * sb * 8])),
                                     acc[g]);
            off[g] = _mm512_fmadd_ps(dmin, mins[g], off[g]);
        }
    }
    OD_UNROLL
    for (int g = 0; g < G; g++)
        store_pair(a->out + (j0 + g) * a->ldo + n, _mm512_sub_ps(acc[g], off[g]), p->rows, a->accumulate);
}

/*
 * Q6_K_X8: codes q = low 4 bits | top 2 bits << 4, unsigned; the -32 is folded into each sub-block's dot by
 * starting it at -32 * (the activation's code sum over those 16 elements, xsum), then the rows' int8 sub-block
 * scales multiply in int32 and everything is summed over the super-block before one convert and FMA with d * d_x.
 */
OD_VNNI_INLINE void tile_q6_k_x8(const int G, const od_mm_args *a, const pair_t *p, int64_t n, int64_t j0,
                                 const int32_t *xsum) {
    const od_q8_act *act = a->act;
    const int64_t nsb = a->k / OD_QK_K, nsub = a->k / 16;
    const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30);
    const int8_t *xq[VNNI_G];
    const float *xds[VNNI_G];
    __m512 acc[VNNI_G], unused[VNNI_G];
    tile_start(G, act, j0, xq, xds, acc, unused);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const size_t blk = (size_t)sb * OD_K6_X8_SB_BYTES;
        __m512i isum[VNNI_G];
        OD_UNROLL
        for (int g = 0; g < G; g++) isum[g] = _mm512_setzero_si512();
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const size_t chunk = blk + OD_K6_X8_CODES + c * OD_K6_X8_CHUNK_BYTES;
            prefetch_pair(p, chunk + 2 * OD_K6_X8_SB_BYTES, OD_K6_X8_CHUNK_BYTES);
            __m512i dot[VNNI_G][4];
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const int32_t *xs = xsum + (j0 + g) * nsub + sb * 16 + 4 * c;
                OD_UNROLL
                for (int i = 0; i < 4; i++) dot[g][i] = _mm512_set1_epi32(-32 * xs[i]);
            }
            OD_UNROLL
            for (int h = 0; h < 4; h++) {
                const __m512i hb = load_pair(p, chunk + 32 * (8 + h));
                const __m512i v0 = load_pair(p, chunk + 32 * h), v1 = load_pair(p, chunk + 32 * (h + 4));
                __m512i q[4];
                q[0] = _mm512_ternarylogic_epi32(v0, low4, _mm512_and_si512(_mm512_slli_epi16(hb, 4), top2), 0xEA);
                q[1] = _mm512_ternarylogic_epi32(v1, low4, _mm512_and_si512(hb, top2), 0xEA);
                q[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 4), low4,
                                                 _mm512_and_si512(_mm512_slli_epi16(hb, 2), top2), 0xEA);
                q[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v1, 4), low4,
                                                 _mm512_and_si512(_mm512_srli_epi16(hb, 2), top2), 0xEA);
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    const int8_t *x = xq[g] + sb * OD_QK_K + 64 * c + 4 * h;
                    OD_UNROLL
                    for (int i = 0; i < 4; i++) dot[g][i] = _mm512_dpbusd_epi32(dot[g][i], q[i], bcast4(x + 16 * i));
                }
            }
            OD_UNROLL
            for (int i = 0; i < 4; i++) {
                const __m512i sc = _mm512_cvtepi8_epi32(load_pair_8(p, blk + OD_K6_X8_SC + OD_X8_ROWS * (4 * c + i)));
                OD_UNROLL
                for (int g = 0; g < G; g++) isum[g] = _mm512_add_epi32(isum[g], _mm512_mullo_epi32(dot[g][i], sc));
            }
        }
        const __m512 d = load_pair_ph(p, blk);
        OD_UNROLL
        for (int g = 0; g < G; g++)
            acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[g]), _mm512_mul_ps(d, _mm512_set1_ps(xds[g][2 * sb * 8])),
                                     acc[g]);
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) store_pair(a->out + (j0 + g) * a->ldo + n, acc[g], p->rows, a->accumulate);
}

/* Weight rows [n, n + p->rows) times activation rows [j0, j0 + G). */
OD_VNNI_INLINE void tile(const int type, const int G, const od_mm_args *a, const pair_t *p, int64_t n, int64_t j0,
                         const int32_t *xsum) {
    switch (type) {
    case OD_TYPE_Q4_0_X8: tile_q4_x8(0, G, a, p, n, j0); break;
    case OD_TYPE_Q4_1_X8: tile_q4_x8(1, G, a, p, n, j0); break;
    case OD_TYPE_Q8_0_X8: tile_q8_0_x8(G, a, p, n, j0, xsum); break;
    case OD_TYPE_Q6_K_X8: tile_q6_k_x8(G, a, p, n, j0, xsum); break;
    default: tile_q4_k_x8(G, a, p, n, j0); break;
    }
}

/* Weight pairs outer: every activation row passes over a pair of groups while it is in L1. */
OD_VNNI_INLINE void gemv_vnni(const int type, const od_mm_args *a, int64_t n0, int64_t n1) {
    /* the activation rows' code sums per 32 (Q8_0_X8) or 16 (Q6_K_X8) elements */
    int32_t *xsum = NULL;
    if (type == OD_TYPE_Q8_0_X8 || type == OD_TYPE_Q6_K_X8) {
        const int span = type == OD_TYPE_Q8_0_X8 ? OD_QK : 16;
        const int64_t sums = a->m * (a->k / span);
        xsum = od_scratch(1, (size_t)sums * sizeof(int32_t));
        if (!xsum) return;
        for (int64_t i = 0; i < sums; i++) {
            int32_t s = 0;
            for (int e = 0; e < span; e++) s += a->act->qs[i * span + e];
            xsum[i] = s;
        }
    }
    for (int64_t n = n0; n < n1; n += 2 * OD_X8_ROWS) {
        const pair_t p = weight_pair(a, n, n1);
        int64_t j = 0;
        for (; j + VNNI_ROWS(type) <= a->m; j += VNNI_ROWS(type)) tile(type, VNNI_ROWS(type), a, &p, n, j, xsum);
        switch (a->m - j) {
        case 7: tile(type, 7, a, &p, n, j, xsum); break;
        case 6: tile(type, 6, a, &p, n, j, xsum); break;
        case 5: tile(type, 5, a, &p, n, j, xsum); break;
        case 4: tile(type, 4, a, &p, n, j, xsum); break;
        case 3: tile(type, 3, a, &p, n, j, xsum); break;
        case 2: tile(type, 2, a, &p, n, j, xsum); break;
        case 1: tile(type, 1, a, &p, n, j, xsum); break;
        default: break;
        }
    }
}

#define DEFINE_VNNI_MATMUL(NAME, TYPE) \
    OD_VNNI static void NAME(const od_mm_args *a, int64_t n0, int64_t n1) { gemv_vnni(TYPE, a, n0, n1); }
DEFINE_VNNI_MATMUL(matmul_q4_0_x8_vnni, OD_TYPE_Q4_0_X8)
DEFINE_VNNI_MATMUL(matmul_q4_k_x8_vnni, OD_TYPE_Q4_K_X8)
DEFINE_VNNI_MATMUL(matmul_q4_1_x8_vnni, OD_TYPE_Q4_1_X8)
DEFINE_VNNI_MATMUL(matmul_q8_0_x8_vnni, OD_TYPE_Q8_0_X8)
DEFINE_VNNI_MATMUL(matmul_q6_k_x8_vnni, OD_TYPE_Q6_K_X8)

static od_isa_ops g_avx512;
static pthread_once_t g_avx512_once = PTHREAD_ONCE_INIT;

static void build_table(void) {
    g_avx512 = od_ops_avx2;
    g_avx512.name = "avx512";
    g_avx512.matmul[OD_TYPE_Q4_0_X8] = matmul_q4_0_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q4_K_X8] = matmul_q4_k_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q4_1_X8] = matmul_q4_1_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q8_0_X8] = matmul_q8_0_x8_vnni;
    g_avx512.matmul[OD_TYPE_Q6_K_X8] = matmul_q6_k_x8_vnni;
}

const od_isa_ops *od_ops_avx512(void) {
    pthread_once(&g_avx512_once, build_table);
    return &g_avx512;
}

#endif /* x86-64 */
