/*
 * Pieces of the repacked types' matrix-vector tiles shared by the AVX2 and AVX-512 VNNI kernels (the two differ in how
 * the integer dots are accumulated). Included by quant_avx2.c and quant_avx512.c.
 */
#ifndef ONDEVICE_X86_X8_H
#define ONDEVICE_X86_X8_H

#include <immintrin.h>

#include "od_internal.h"

#define OD_X8_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* Start of a repacked-type tile: activation rows j0..j0+G, zeroed accumulators. */
OD_X8_INLINE void x8_tile_start(const int G, const od_q8_act *act, int64_t j0, const int8_t **xq, const float **xds,
                                __m256 *acc, __m256 *acc_offset) {
    for (int g = 0; g < G; g++) {
        xq[g] = act->qs + (j0 + g) * act->k;
        xds[g] = act->ds + (j0 + g) * act->nb * 2;
        acc[g] = acc_offset[g] = _mm256_setzero_ps();
    }
}

/* Sub-block `sub` of a Q4_K_X8 super-block: the 8 rows' 6-bit scales (int32 lanes) and mins (floats). */
OD_X8_INLINE void x8_k_sub_scales(const uint8_t *blk, int sub, __m256i *sc, __m256 *mn) {
    *sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + OD_K_X8_SC + 8 * sub)));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + OD_K_X8_MN + 8 * sub))));
}

/* End of super-block sb for activation row g: acc += isum * d * d_x, offset += dmin * (sum of mn * s_x). */
OD_X8_INLINE void x8_k_finish(const uint8_t *blk, int64_t sb, const float *xds, __m256i isum, __m256 mins,
                              __m256 *acc, __m256 *offset) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(xds[2 * sb * 8])), *acc);
    *offset = _mm256_fmadd_ps(dmin, mins, *offset);
}

#endif /* ONDEVICE_X86_X8_H */
