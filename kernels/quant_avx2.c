/*
 * AVX2 + FMA + F16C matmul kernels (x86-64). Every function carries the target attribute, so this
 * file is compiled without -mavx2 and only runs after dispatch.c has checked the CPU.
 *
 * Quantized weights meet 8-bit activations (od_q8_act) in integer dot products:
 *   - unsigned codes (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K) go straight into vpmaddubsw as the unsigned
 *     operand; the format's offset (-8d, -16d, m, -dmin*m) becomes one float multiply-add per block
 *     with the activation block sum s = d_x * sum(q_x);
 *   - signed codes (Q8_0, Q6_K) use the sign trick: |w| * sign(x, w).
 *
 * Two schedules:
 *   - GEMV (few rows of x, i.e. decode): blocks are decoded straight from the GGUF bytes and dotted
 *     with up to 4 activation rows while in registers. This is memory-bound; it only has to keep up
 *     with DRAM.
 *   - GEMM (prefill): 8 weight rows are decoded once into an L1-resident panel, interleaved so that
 *     one 32-byte vector holds 4 consecutive codes of each of the 8 rows. A 4-byte group of one
 *     activation row is broadcast against it, so vpmaddubsw works on 8 output columns at once and the
 *     16-bit partial sums of a whole 32-block can be added before a single vpmaddwd; each block then
 *     costs one convert and two FMAs per activation row for 8 outputs, and results land in 8
 *     consecutive output columns (no horizontal sums). The panel is reused for all rows of x.
 */
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>
#include <string.h>

#include "od_internal.h"

#define OD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OD_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* Start of a repacked-type tile: activation rows j0..j0+G, zeroed accumulators. */
OD_AVX2_INLINE void x8_tile_start(const int G, const od_q8_act *act, int64_t j0, const int8_t **xq, const float **xds,
                                  __m256 *acc, __m256 *acc_offset) {
    for (int g = 0; g < G; g++) {
        xq[g] = act->qs + (j0 + g) * act->k;
        xds[g] = act->ds + (j0 + g) * act->nb * 2;
        acc[g] = acc_offset[g] = _mm256_setzero_ps();
    }
}

/* How far ahead the K-quant tiles prefetch, in super-blocks. */
#define PREFETCH_SUPERBLOCKS 4

/* Every line of the super-block PREFETCH_SUPERBLOCKS past `blk` (sb_bytes each), scales included, in one burst:
 * prefetching only the codes, a quarter per chunk, left one core well short of DRAM's rate (BENCHMARKS 4.1.4). */
OD_AVX2_INLINE void prefetch_superblock(const uint8_t *blk, size_t sb_bytes) {
    const char *next = (const char *)blk + PREFETCH_SUPERBLOCKS * sb_bytes;
    for (size_t off = 0; off < sb_bytes + 64; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
}

/* Sub-block `sub` of a Q4_K_X8 super-block: the 8 rows' 6-bit scales (int32 lanes) and mins (floats). */
OD_AVX2_INLINE void x8_k_sub_scales(const uint8_t *blk, int sub, __m256i *sc, __m256 *mn) {
    *sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + OD_K_X8_SC + 8 * sub)));
    *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + OD_K_X8_MN + 8 * sub))));
}

/* End of super-block sb for activation row g: acc += isum * d * d_x, offset += dmin * (sum of mn * s_x). */
OD_AVX2_INLINE void x8_k_finish(const uint8_t *blk, int64_t sb, const float *xds, __m256i isum, __m256 mins,
                                __m256 *acc, __m256 *offset) {
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(xds[2 * sb * 8])), *acc);
    *offset = _mm256_fmadd_ps(dmin, mins, *offset);
}

/* Small fixed-count loops over registers must be unrolled early so the accumulator arrays live in
 * registers (otherwise GCC mirrors them on the stack every iteration). */
#if defined(__clang__)
#define OD_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define OD_UNROLL _Pragma("GCC unroll 16")
#else
#define OD_UNROLL
#endif

/* Empty asm that claims to modify v: stops the compiler from re-associating an accumulation chain
 * into a tree (which needs more registers than we have and spills). Emits no instruction. */
#define OD_KEEP(v) __asm__("" : "+x"(v))

/* Up to OD_MATMUL_EXACT_ROWS activation rows take the GEMV schedule, whose per-row arithmetic does not depend on
 * M (the contract in ondevice_kernels.h); the tiled GEMM rounds differently and only takes larger M. */
#define GEMM_MIN_M (OD_MATMUL_EXACT_ROWS + 1)
/* W rows the GEMV schedule multiplies by every activation row before moving on: small enough to stay in L1/L2
 * while the groups of activation rows pass over them, so M rows read W from memory once. */
#define GEMV_W_CHUNK 16
#define PANEL_ROWS 8

OD_AVX2_INLINE float half_to_f32(const void *p) { return _cvtsh_ss(od_read_u16(p)); }

OD_AVX2_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

OD_AVX2_INLINE int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ------------------------------------------------------------------ activation quantization */

OD_AVX2_INLINE float block_amax_avx2(const float *xb) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 mx = _mm256_max_ps(
        _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb), abs_mask), _mm256_and_ps(_mm256_loadu_ps(xb + 8), abs_mask)),
        _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb + 16), abs_mask),
                      _mm256_and_ps(_mm256_loadu_ps(xb + 24), abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    return _mm_cvtss_f32(m4);
}

/* 32 activations -> int8 codes round-half-even(x * id); returns their sum. */
OD_AVX2_INLINE int quantize_block_avx2(const float *xb, float id, int8_t *qb) {
    const __m256 vid = _mm256_set1_ps(id);
    const int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb), vid), rounding));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8), vid), rounding));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 16), vid), rounding));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 24), vid), rounding));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
    /* packs interleave 128-bit lanes; the permute restores element order */
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qb, packed);
    return _mm_cvtsi128_si32(t4);
}

OD_AVX2 static void quantize_act_avx2(const float *x, od_q8_act *act, int64_t m0, int64_t m1) {
    od_quantize_act_rows(x, act, m0, m1, block_amax_avx2, quantize_block_avx2);
}

/* ------------------------------------------------------------------ block decoding */

/* 16 bytes of nibbles -> 32 codes in element order (low nibbles are elements 0..15). */
OD_AVX2_INLINE __m256i nibbles_32(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

/* 4-bit codes -> the IQ4 levels they index (signed) */
OD_AVX2_INLINE __m256i iq4_levels_32(__m256i codes) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)od_iq4_levels)), codes);
}

/* bit e of qh -> 0x10 in byte e */
OD_AVX2_INLINE __m256i fifth_bits_32(uint32_t qh) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                            3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* Q3_K sub-block t (0..7) of a super-block: its signed codes q - 4 from the 32 qs bytes of its half (bits 2*(t%4))
 * and the hmask (bit t; the 16-bit shift cannot carry a bit into bit 0 of a byte). */
OD_AVX2_INLINE __m256i q3_k_codes(__m256i qs_half, __m256i hmask, const int t) {
    const __m128i low_shift = _mm_cvtsi32_si128(2 * (t % 4)), high_shift = _mm_cvtsi32_si128(t);
    const __m256i low = _mm256_and_si256(_mm256_srl_epi16(qs_half, low_shift), _mm256_set1_epi8(3));
    const __m256i high = _mm256_and_si256(_mm256_srl_epi16(hmask, high_shift), _mm256_set1_epi8(1));
    return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 2)), _mm256_set1_epi8(4));
}

/*
 * Block b (32 weights) of a row: returns the codes (unsigned for the offset formats, signed for
 * Q8_0/Q6_K), the scale dw and offset mw with w = dw * code + mw, and for Q6_K the two integer
 * sub-scales (w = dw * sc * code).
 */
OD_AVX2_INLINE __m256i load_block(const int type, const uint8_t *row, int64_t b, float *dw, float *mw, int *sc_lo,
                                  int *sc_hi) {
    switch (type) {
    case OD_TYPE_Q4_0: {
        const block_q4_0 *blk = (const block_q4_0 *)row + b;
        *dw = half_to_f32(&blk->d);
        *mw = -8.0f * *dw;
        return nibbles_32(blk->qs);
    }
    case OD_TYPE_Q4_1: {
        const block_q4_1 *blk = (const block_q4_1 *)row + b;
        *dw = half_to_f32(&blk->d);
        *mw = half_to_f32(&blk->m);
        return nibbles_32(blk->qs);
    }
    case OD_TYPE_Q5_0: {
        const block_q5_0 *blk = (const block_q5_0 *)row + b;
        *dw = half_to_f32(&blk->d);
        *mw = -16.0f * *dw;
        return _mm256_or_si256(nibbles_32(blk->qs), fifth_bits_32(od_read_u32(blk->qh)));
    }
    case OD_TYPE_Q5_1: {
        const block_q5_1 *blk = (const block_q5_1 *)row + b;
        *dw = half_to_f32(&blk->d);
        *mw = half_to_f32(&blk->m);
        return _mm256_or_si256(nibbles_32(blk->qs), fifth_bits_32(od_read_u32(blk->qh)));
    }
    case OD_TYPE_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        *dw = half_to_f32(&blk->d);
        *mw = 0.0f;
        return _mm256_loadu_si256((const __m256i *)blk->qs);
    }
    case OD_TYPE_Q4_K: {
        const block_q4_K *blk = (const block_q4_K *)row + b / 8;
        const int sub = (int)(b % 8);
        uint8_t sc, mn;
        od_q4k_scale_min(sub, blk->scales, &sc, &mn);
        *dw = half_to_f32(&blk->d) * (float)sc;
        *mw = -(half_to_f32(&blk->dmin) * (float)mn);
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + (sub / 2) * 32));
        if (sub & 1) v = _mm256_srli_epi16(v, 4);
        return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    }
    case OD_TYPE_Q5_K: {
        const block_q5_K *blk = (const block_q5_K *)row + b / 8;
        const int sub = (int)(b % 8);
        uint8_t sc, mn;
        od_q4k_scale_min(sub, blk->scales, &sc, &mn);
        *dw = half_to_f32(&blk->d) * (float)sc;
        *mw = -(half_to_f32(&blk->dmin) * (float)mn);
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + (sub / 2) * 32));
        if (sub & 1) v = _mm256_srli_epi16(v, 4);
        /* bit `sub` of each qh byte -> bit 4 (the 16-bit shift cannot carry a bit into bit 0 of a byte) */
        const __m256i qh = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)blk->qh), _mm_cvtsi32_si128(sub));
        return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi8(0x0F)),
                               _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(1)), 4));
    }
    case OD_TYPE_IQ4_NL: {
        const block_iq4_nl *blk = (const block_iq4_nl *)row + b;
        *dw = half_to_f32(&blk->d);
        *mw = 0.0f;
        return iq4_levels_32(nibbles_32(blk->qs));
    }
    case OD_TYPE_IQ4_XS: {
        const block_iq4_xs *blk = (const block_iq4_xs *)row + b / 8;
        *dw = half_to_f32(&blk->d) * (float)od_iq4_xs_scale(blk, (int)(b % 8));
        *mw = 0.0f;
        return iq4_levels_32(nibbles_32(blk->qs + 16 * (b % 8)));
    }
    case OD_TYPE_Q3_K: {
        const block_q3_K *blk = (const block_q3_K *)row + b / 8;
        const int sub = (int)(b % 8);
        int8_t sc[16];
        od_q3k_scales(blk->scales, sc);
        *dw = half_to_f32(&blk->d);
        *mw = 0.0f;
        *sc_lo = sc[sub * 2];
        *sc_hi = sc[sub * 2 + 1];
        return q3_k_codes(_mm256_loadu_si256((const __m256i *)(blk->qs + 32 * (sub / 4))),
                          _mm256_loadu_si256((const __m256i *)blk->hmask), sub);
    }
    case OD_TYPE_Q6_K: {
        const block_q6_K *blk = (const block_q6_K *)row + b / 8;
        const int sub = (int)(b % 8), half = sub / 4, part = sub % 4;
        *dw = half_to_f32(&blk->d);
        *mw = 0.0f;
        *sc_lo = blk->scales[sub * 2];
        *sc_hi = blk->scales[sub * 2 + 1];
        __m256i low = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * half + (part & 1) * 32));
        __m256i high = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * half));
        low = _mm256_and_si256(_mm256_srli_epi16(low, (part >> 1) * 4), _mm256_set1_epi8(0x0F));
        high = _mm256_and_si256(_mm256_srli_epi16(high, part * 2), _mm256_set1_epi8(0x03));
        const __m256i q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
        return _mm256_sub_epi8(q, _mm256_set1_epi8(32));
    }
    default:
        *dw = 0.0f;
        *mw = 0.0f;
        return _mm256_setzero_si256();
    }
}

#define IS_SIGNED_TYPE(t) ((t) == OD_TYPE_Q8_0 || (t) == OD_TYPE_Q6_K || (t) == OD_TYPE_Q3_K || (t) == OD_TYPE_IQ4_NL || (t) == OD_TYPE_IQ4_XS)

/* ------------------------------------------------------------------ GEMV schedule */

/* Bytes of one 32-weight block of the simple formats. */
#define BLOCK32_BYTES(t)                                                                                 \
    ((t) == OD_TYPE_Q4_0 || (t) == OD_TYPE_IQ4_NL ? 18 : (t) == OD_TYPE_Q4_1 ? 20 : (t) == OD_TYPE_Q5_0 ? 22 \
     : (t) == OD_TYPE_Q5_1 ? 24 : 34)
#define HAS_MIN_FIELD(t) ((t) == OD_TYPE_Q4_1 || (t) == OD_TYPE_Q5_1)
/* w = d * (code - bias) for the formats without a min field */
#define CODE_BIAS(t) ((t) == OD_TYPE_Q4_0 ? 8.0f : (t) == OD_TYPE_Q5_0 ? 16.0f : 0.0f)

/* Codes of a simple 32-weight block (unsigned, or signed for Q8_0 and IQ4_NL). */
OD_AVX2_INLINE __m256i block32_codes(const int type, const uint8_t *blk) {
    switch (type) {
    case OD_TYPE_Q4_0: return nibbles_32(blk + 2);
    case OD_TYPE_Q4_1: return nibbles_32(blk + 4);
    case OD_TYPE_Q5_0: return _mm256_or_si256(nibbles_32(blk + 6), fifth_bits_32(od_read_u32(blk + 2)));
    case OD_TYPE_Q5_1: return _mm256_or_si256(nibbles_32(blk + 8), fifth_bits_32(od_read_u32(blk + 4)));
    case OD_TYPE_IQ4_NL: return iq4_levels_32(nibbles_32(blk + 2));
    default: return _mm256_loadu_si256((const __m256i *)(blk + 2));
    }
}

/*
 * GEMV for the simple 32-weight formats, R weight rows x G activation rows at a time so that R*G
 * independent FMA chains hide the FMA latency (one chain would cost ~5 cycles a block). One
 * vcvtph2ps turns the block's (d, m) - or (d, d) - into
 * floats and one multiply by the activation pair (d_x, s_x) yields both the scale of the integer dot
 * (lane 0) and the offset term (lane 1), which accumulates in its own register.
 */
OD_AVX2_INLINE void gemv32_tile(const int type, const int R, const int G, const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t k = a->k, nb = act->nb;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq[4];
    const float *xds[4];
    const uint8_t *rows[4];
    __m256 acc[4][4];
    __m128 acc_offset[4][4];
    OD_UNROLL
    for (int g = 0; g < G; g++) {
        xq[g] = act->qs + (j0 + g) * k;
        xds[g] = act->ds + (j0 + g) * nb * 2;
    }
    OD_UNROLL
    for (int r = 0; r < R; r++) {
        rows[r] = a->w + (size_t)(n + r) * a->row_bytes;
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            acc[r][g] = _mm256_setzero_ps();
            acc_offset[r][g] = _mm_setzero_ps();
        }
    }
    /* the R rows are contiguous: prefetch the next R rows linearly while walking these */
    const uint8_t *next_tile = rows[0] + (size_t)R * a->row_bytes;
    const size_t step_bytes = (size_t)R * BLOCK32_BYTES(type);
    for (int64_t b = 0; b < nb; b++) {
        OD_UNROLL
        for (size_t off = 0; off < step_bytes + 63; off += 64)
            _mm_prefetch((const char *)next_tile + b * step_bytes + off, _MM_HINT_T0);
        OD_UNROLL
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = rows[r] + b * BLOCK32_BYTES(type);
            const __m128 dm = HAS_MIN_FIELD(type) ? _mm_cvtph_ps(_mm_cvtsi32_si128(load_i32(blk)))
                                                  : _mm_cvtph_ps(_mm_set1_epi16((short)od_read_u16(blk)));
            const __m256i q = block32_codes(type, blk);
            const __m256i qa = IS_SIGNED_TYPE(type) ? _mm256_sign_epi8(q, q) : q;
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const __m128 scales = _mm_mul_ps(dm, _mm_castpd_ps(_mm_load_sd((const double *)(xds[g] + 2 * b))));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[g] + b * OD_QK));
                if (IS_SIGNED_TYPE(type)) xv = _mm256_sign_epi8(xv, q);
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(qa, xv), ones);
                acc[r][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(scales), acc[r][g]);
                if (!IS_SIGNED_TYPE(type)) acc_offset[r][g] = _mm_add_ps(acc_offset[r][g], scales);
            }
        }
    }
    OD_UNROLL
    for (int r = 0; r < R; r++) {
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            float *dst = a->out + (j0 + g) * a->ldo + n + r;
            float v = hsum_ps(acc[r][g]);
            if (!IS_SIGNED_TYPE(type)) {
                const float offset = _mm_cvtss_f32(_mm_shuffle_ps(acc_offset[r][g], acc_offset[r][g], 1));
                v += HAS_MIN_FIELD(type) ? offset : -CODE_BIAS(type) * offset;
            }
            *dst = a->accumulate ? *dst + v : v;
        }
    }
}

/* lane s of the result = sum of the 8 int32 lanes of p[s] */
OD_AVX2_INLINE __m256i reduce8_epi32(const __m256i p[8]) {
    const __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i x = _mm256_hadd_epi32(h01, h23), y = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(x, y, 0x20), _mm256_permute2x128_si256(x, y, 0x31));
}

/* activation scales d and sums s of the 8 blocks of a super-block, deinterleaved */
OD_AVX2_INLINE void load_ds8(const float *ds, __m256 *d, __m256 *s) {
    const __m256 lo = _mm256_loadu_ps(ds), hi = _mm256_loadu_ps(ds + 8);
    *d = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
    *s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
}

/* Q5_K: sub-block t's fifth bits (bit t of each qh byte) moved to bit 4; one AND and one shift. */
OD_AVX2_INLINE __m256i q5_k_fifth_bits(__m256i qh, const int t) {
    const __m256i bit = _mm256_and_si256(qh, _mm256_set1_epi8((char)(1 << t)));
    return t <= 4 ? _mm256_slli_epi16(bit, 4 - t) : _mm256_srli_epi16(bit, t - 4);
}

/*
 * GEMV for Q4_K, Q5_K and Q6_K. Per super-block and weight row the scales are decoded once into 8-lane
 * float vectors (one lane per 32-weight sub-block); the 8 integer sub-block dots are reduced into
 * one vector with a hadd tree, so each super-block ends in a single convert and FMA.
 */
OD_AVX2_INLINE void gemv_k_tile(const int type, const int R, const int G, const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t k = a->k, nsb = k / OD_QK_K;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
    const int8_t *xq[4];
    const float *xds[4];
    const uint8_t *rows[4];
    __m256 acc[4][4], acc_offset[4][4];
    OD_UNROLL
    for (int g = 0; g < G; g++) {
        xq[g] = act->qs + (j0 + g) * k;
        xds[g] = act->ds + (j0 + g) * act->nb * 2;
    }
    OD_UNROLL
    for (int r = 0; r < R; r++) {
        rows[r] = a->w + (size_t)(n + r) * a->row_bytes;
        OD_UNROLL
        for (int g = 0; g < G; g++) acc[r][g] = acc_offset[r][g] = _mm256_setzero_ps();
    }
    const uint8_t *next_tile = rows[0] + (size_t)R * a->row_bytes;
    const size_t sb_bytes = type == OD_TYPE_Q4_K ? sizeof(block_q4_K) : type == OD_TYPE_Q5_K ? sizeof(block_q5_K)
                            : type == OD_TYPE_IQ4_XS ? sizeof(block_iq4_xs) : type == OD_TYPE_Q3_K ? sizeof(block_q3_K)
                            : sizeof(block_q6_K);
    const size_t step_bytes = (size_t)R * sb_bytes;
    for (int64_t sb = 0; sb < nsb; sb++) {
        for (size_t off = 0; off < step_bytes + 63; off += 64)
            _mm_prefetch((const char *)next_tile + sb * step_bytes + off, _MM_HINT_T0);
        __m256 xd[4], xs[4];
        OD_UNROLL
        for (int g = 0; g < G; g++) load_ds8(xds[g] + sb * 16, &xd[g], &xs[g]);
        OD_UNROLL
        for (int r = 0; r < R; r++) {
            if (type == OD_TYPE_Q4_K || type == OD_TYPE_Q5_K) {
                /* Q5_K's d, dmin and scales are laid out as Q4_K's (its fifth bits qh come before qs) */
                const block_q4_K *blk = (const block_q4_K *)(rows[r] + sb * sb_bytes);
                const block_q5_K *blk5 = (const block_q5_K *)blk;
                const uint32_t w0 = od_read_u32(blk->scales), w1 = od_read_u32(blk->scales + 4);
                const uint32_t w2 = od_read_u32(blk->scales + 8);
                const uint32_t sc_lo = w0 & 0x3F3F3F3Fu, sc_hi = (w2 & 0x0F0F0F0Fu) | ((w0 >> 2) & 0x30303030u);
                const uint32_t m_lo = w1 & 0x3F3F3F3Fu, m_hi = ((w2 >> 4) & 0x0F0F0F0Fu) | ((w1 >> 2) & 0x30303030u);
                const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
                const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo)));
                const __m256 scale = _mm256_mul_ps(sc, _mm256_set1_ps(half_to_f32(&blk->d)));
                const __m256 minv = _mm256_mul_ps(mn, _mm256_set1_ps(half_to_f32(&blk->dmin)));
                __m256i codes[8];
                OD_UNROLL
                for (int c = 0; c < 4; c++) {
                    const uint8_t *qs = type == OD_TYPE_Q4_K ? blk->qs : blk5->qs;
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                    codes[2 * c] = _mm256_and_si256(v, low4);
                    codes[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    if (type == OD_TYPE_Q5_K) {
                        const __m256i qh = _mm256_loadu_si256((const __m256i *)blk5->qh);
                        codes[2 * c] = _mm256_or_si256(codes[2 * c], q5_k_fifth_bits(qh, 2 * c));
                        codes[2 * c + 1] = _mm256_or_si256(codes[2 * c + 1], q5_k_fifth_bits(qh, 2 * c + 1));
                    }
                }
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    __m256i p[8];
                    const int8_t *x = xq[g] + sb * OD_QK_K;
                    OD_UNROLL
                    for (int t = 0; t < 8; t++)
                        p[t] = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(codes[t], _mm256_loadu_si256((const __m256i *)(x + 32 * t))), ones);
                    acc[r][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8_epi32(p)), _mm256_mul_ps(scale, xd[g]), acc[r][g]);
                    acc_offset[r][g] = _mm256_fmadd_ps(minv, xs[g], acc_offset[r][g]);
                }
            } else if (type == OD_TYPE_IQ4_XS) {
                const block_iq4_xs *blk = (const block_iq4_xs *)(rows[r] + sb * sb_bytes);
                /* the 8 six-bit scales: 4-bit halves from scales_l, 2-bit tops from scales_h, minus 32 */
                const __m256i low = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)od_read_u32(blk->scales_l)),
                                                                       _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                                     _mm256_set1_epi32(0x0F));
                const __m256i high = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(od_read_u16(&blk->scales_h)),
                                                                        _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
                                                      _mm256_set1_epi32(3));
                const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(high, 4)), _mm256_set1_epi32(32));
                const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(half_to_f32(&blk->d)), _mm256_cvtepi32_ps(ls));
                __m256i codes[8], mags[8];
                OD_UNROLL
                for (int t = 0; t < 8; t++) {
                    codes[t] = iq4_levels_32(nibbles_32(blk->qs + 16 * t));
                    mags[t] = _mm256_sign_epi8(codes[t], codes[t]);
                }
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    __m256i p[8];
                    const int8_t *x = xq[g] + sb * OD_QK_K;
                    OD_UNROLL
                    for (int t = 0; t < 8; t++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * t));
                        p[t] = _mm256_madd_epi16(_mm256_maddubs_epi16(mags[t], _mm256_sign_epi8(xv, codes[t])), ones);
                    }
                    acc[r][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8_epi32(p)), _mm256_mul_ps(scale, xd[g]), acc[r][g]);
                }
            } else { /* Q3_K and Q6_K: signed codes, 16 int8 sub-scales */
                /* int16 scales: even ones in the low lane, odd ones in the high lane, so one vpshufb
                 * per sub-block spreads (scale[2t], scale[2t+1]) over the two 16-weight halves */
                int8_t q3_scales[16];
                const block_q3_K *blk3 = (const block_q3_K *)(rows[r] + sb * sb_bytes);
                const block_q6_K *blk = (const block_q6_K *)(rows[r] + sb * sb_bytes);
                if (type == OD_TYPE_Q3_K) od_q3k_scales(blk3->scales, q3_scales);
                const __m128i sc8 = _mm_loadu_si128((const __m128i *)(type == OD_TYPE_Q3_K ? q3_scales : blk->scales));
                const __m128i even_odd = _mm_shuffle_epi8(sc8, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
                const __m256i sc16 = _mm256_set_m128i(_mm_cvtepi8_epi16(_mm_srli_si128(even_odd, 8)), _mm_cvtepi8_epi16(even_odd));
                const __m256 d = _mm256_set1_ps(half_to_f32(type == OD_TYPE_Q3_K ? &blk3->d : &blk->d));
                __m256i codes[8];
                if (type == OD_TYPE_Q3_K) {
                    const __m256i hm = _mm256_loadu_si256((const __m256i *)blk3->hmask);
                    OD_UNROLL
                    for (int t = 0; t < 8; t++)
                        codes[t] = q3_k_codes(_mm256_loadu_si256((const __m256i *)(blk3->qs + 32 * (t / 4))), hm, t);
                } else {
                    OD_UNROLL
                    for (int h = 0; h < 2; h++) {
                        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h));
                        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h + 32));
                        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
                        const __m256i two = _mm256_set1_epi8(0x03), bias = _mm256_set1_epi8(32);
                        codes[4 * h + 0] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(ql0, low4),
                                                                           _mm256_slli_epi16(_mm256_and_si256(qh, two), 4)), bias);
                        codes[4 * h + 1] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(ql1, low4),
                                                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4)), bias);
                        codes[4 * h + 2] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4)), bias);
                        codes[4 * h + 3] = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                                                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4)), bias);
                    }
                }
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    __m256i p[8];
                    const int8_t *x = xq[g] + sb * OD_QK_K;
                    OD_UNROLL
                    for (int t = 0; t < 8; t++) {
                        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 32 * t));
                        const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(codes[t], codes[t]), _mm256_sign_epi8(xv, codes[t]));
                        const __m256i spread = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * t)));
                        p[t] = _mm256_madd_epi16(prod, spread);
                    }
                    acc[r][g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8_epi32(p)), _mm256_mul_ps(d, xd[g]), acc[r][g]);
                }
            }
        }
    }
    OD_UNROLL
    for (int r = 0; r < R; r++) {
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            float *dst = a->out + (j0 + g) * a->ldo + n + r;
            float v = hsum_ps(acc[r][g]);
            if (type == OD_TYPE_Q4_K || type == OD_TYPE_Q5_K) v -= hsum_ps(acc_offset[r][g]);
            *dst = a->accumulate ? *dst + v : v;
        }
    }
}

OD_AVX2_INLINE void gemv_cols(const int type, const int G, const od_mm_args *a, int64_t n0, int64_t n1, int64_t j0) {
    /* keep R*G at 4..6 accumulator chains */
    int64_t n = n0;
    if (type == OD_TYPE_Q4_K || type == OD_TYPE_Q5_K || type == OD_TYPE_Q6_K || type == OD_TYPE_IQ4_XS ||
        type == OD_TYPE_Q3_K) {
        if (G == 1) {
            for (; n + 2 <= n1; n += 2) gemv_k_tile(type, 2, 1, a, n, j0);
        }
        for (; n < n1; n++) gemv_k_tile(type, 1, G, a, n, j0);
    } else {
        if (G == 1) {
            for (; n + 4 <= n1; n += 4) gemv32_tile(type, 4, 1, a, n, j0);
        } else if (G == 2) {
            for (; n + 2 <= n1; n += 2) gemv32_tile(type, 2, 2, a, n, j0);
        }
        for (; n < n1; n++) gemv32_tile(type, 1, G, a, n, j0);
    }
}

OD_AVX2_INLINE void gemv_quant(const int type, const od_mm_args *a, int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += GEMV_W_CHUNK) {
        const int64_t c1 = c0 + GEMV_W_CHUNK < n1 ? c0 + GEMV_W_CHUNK : n1;
        int64_t j = 0;
        for (; j + 3 <= a->m; j += 3) gemv_cols(type, 3, a, c0, c1, j);
        switch (a->m - j) {
        case 2: gemv_cols(type, 2, a, c0, c1, j); break;
        case 1: gemv_cols(type, 1, a, c0, c1, j); break;
        default: break;
        }
    }
}

/* ------------------------------------------------------------------ GEMM schedule */

/* r[i] holds 8 dwords of row i; afterwards r[s] holds dword s of rows 0..7. */
OD_AVX2_INLINE void transpose8_epi32(__m256i r[8]) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

typedef struct {
    uint8_t *codes;  /* [nb][8 steps][8 rows][4]: |w| codes for signed types */
    uint8_t *signs;  /* same layout, signed codes (signed types only) */
    float *dw;       /* [nb][8] */
    float *mw;       /* [nb][8] */
    int16_t *scales; /* Q6_K: [nb][2 halves][8 rows][2] sub-scales, duplicated for vpmaddwd */
} panel_t;

/* Decodes rows [n, n+rows) (rows <= 8; missing rows are zero) into the interleaved panel. */
OD_AVX2_INLINE void pack_panel(const int type, const od_mm_args *a, int64_t n, int rows, const panel_t *p) {
    const int64_t nb = a->k / OD_QK;
    for (int64_t b = 0; b < nb; b++) {
        __m256i codes[8], signs[8];
        OD_UNROLL
        for (int i = 0; i < PANEL_ROWS; i++) {
            float dw = 0.0f, mw = 0.0f;
            int sc_lo = 0, sc_hi = 0;
            __m256i q = _mm256_setzero_si256();
            if (i < rows) q = load_block(type, a->w + (size_t)(n + i) * a->row_bytes, b, &dw, &mw, &sc_lo, &sc_hi);
            if (IS_SIGNED_TYPE(type)) {
                codes[i] = _mm256_sign_epi8(q, q);
                signs[i] = q;
            } else {
                codes[i] = q;
            }
            p->dw[b * 8 + i] = dw;
            p->mw[b * 8 + i] = mw;
            if (type == OD_TYPE_Q6_K || type == OD_TYPE_Q3_K) {
                int16_t *s = p->scales + b * 32;
                s[2 * i] = s[2 * i + 1] = (int16_t)sc_lo;
                s[16 + 2 * i] = s[16 + 2 * i + 1] = (int16_t)sc_hi;
            }
        }
        transpose8_epi32(codes);
        OD_UNROLL
        for (int s = 0; s < 8; s++) _mm256_store_si256((__m256i *)(p->codes + b * 256 + s * 32), codes[s]);
        if (IS_SIGNED_TYPE(type)) {
            transpose8_epi32(signs);
            OD_UNROLL
            for (int s = 0; s < 8; s++) _mm256_store_si256((__m256i *)(p->signs + b * 256 + s * 32), signs[s]);
        }
    }
}

OD_AVX2_INLINE void store_tile_row(float *dst, __m256 v, int nvalid, int accumulate) {
    if (nvalid == 8) {
        if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(dst));
        _mm256_storeu_ps(dst, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        for (int i = 0; i < nvalid; i++) dst[i] = accumulate ? dst[i] + tmp[i] : tmp[i];
    }
}


/*
 * GEMV over Q4_0_X8 (8 rows interleaved at load, layout in blocks.h): per block, 4 loads bring the codes of
 * 8 rows; each 4-byte group of the activation block is broadcast once for all 8 rows; the 8 vpmaddubsw
 * products of a block add in int16 (|sum| <= 8 * 2 * 15 * 128 < 32768) before one vpmaddwd; one convert
 * and two FMAs finish the block for 8 outputs, with the 8 fp16 scales converted by one vcvtph2ps. About a
 * third of the instructions per byte of the row-at-a-time kernel above, and the results are stored as one
 * vector of 8 consecutive outputs.
 */

OD_AVX2_INLINE void gemv_x8_tile(const int type, const int G, const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t nb = act->nb;
    /* Q4_1_X8: d[8], m[8], codes; Q4_0_X8: d[8], codes */
    const int has_min = type == OD_TYPE_Q4_1_X8;
    const size_t block_bytes = has_min ? OD_X8_Q4_1_BLOCK_BYTES : OD_X8_BLOCK_BYTES, codes_at = has_min ? 32 : 16;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
    const int8_t *xq[3];
    const float *xds[3];
    __m256 acc[3], acc_offset[3];
    x8_tile_start(G, act, j0, xq, xds, acc, acc_offset);
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = group + b * block_bytes;
        OD_UNROLL
        for (size_t off = 0; off < block_bytes; off += 64)
            _mm_prefetch((const char *)blk + 8 * block_bytes + off, _MM_HINT_T0);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        /* the offset term per block: -8 d s_x (accumulated as d s_x) or m s_x */
        const __m256 ow = has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))) : dw;
        __m256i s16[3];
        OD_UNROLL
        for (int g = 0; g < G; g++) s16[g] = _mm256_setzero_si256();
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + codes_at + 32 * c));
            const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const int8_t *x = xq[g] + b * OD_QK + 4 * c;
                s16[g] = _mm256_add_epi16(s16[g], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x))));
                s16[g] = _mm256_add_epi16(s16[g], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x + 16))));
            }
        }
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[g], ones));
            acc[g] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_set1_ps(xds[g][2 * b])), acc[g]);
            acc_offset[g] = _mm256_fmadd_ps(ow, _mm256_set1_ps(xds[g][2 * b + 1]), acc_offset[g]);
        }
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) {
        const __m256 v = has_min ? _mm256_add_ps(acc[g], acc_offset[g])
                                 : _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), acc_offset[g], acc[g]);
        store_tile_row(a->out + (j0 + g) * a->ldo + n, v, OD_X8_ROWS, a->accumulate);
    }
}


/* The GEMM panel of 8 Q4_0_X8 or Q4_1_X8 rows: the interleaved chunks already are its layout, nibbles not yet
 * split; mw is the offset term's weight as gemv_x8_tile takes it (Q4_0's d, to be scaled by -8 at the end, or
 * Q4_1's m). */
OD_AVX2_INLINE void pack_panel_x8(const int type, const od_mm_args *a, int64_t n, const panel_t *p) {
    const int64_t nb = a->k / OD_QK;
    const int has_min = type == OD_TYPE_Q4_1_X8;
    const size_t block_bytes = has_min ? OD_X8_Q4_1_BLOCK_BYTES : OD_X8_BLOCK_BYTES, codes_at = has_min ? 32 : 16;
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = group + b * block_bytes;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        _mm256_storeu_ps(p->dw + b * 8, dw);
        _mm256_storeu_ps(p->mw + b * 8, has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))) : dw);
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + codes_at + 32 * c));
            _mm256_store_si256((__m256i *)(p->codes + b * 256 + c * 32), _mm256_and_si256(v, low4));
            _mm256_store_si256((__m256i *)(p->codes + b * 256 + (c + 4) * 32),
                               _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        }
    }
}


/*
 * GEMV over Q4_K_X8 (layout in blocks.h), the Q4_0_X8 scheme per sub-block: the 8 steps of a sub-block add in
 * int16, one vpmaddwd applies the 8 rows' integer sub-block scales (each duplicated into both int16 halves of
 * its lane), and the whole super-block sums in int32 before one convert and FMA with the 8 rows' d times the
 * activation's d. The mins term is sum over sub-blocks of mn * s_x, times dmin.
 */
OD_AVX2_INLINE void gemv_k_x8_tile(const int G, const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t k = a->k, nsb = k / OD_QK_K;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int8_t *xq[3];
    const float *xds[3];
    __m256 acc[3], acc_offset[3];
    x8_tile_start(G, act, j0, xq, xds, acc, acc_offset);
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = group + sb * OD_K_X8_SB_BYTES;
        prefetch_superblock(blk, OD_K_X8_SB_BYTES);
        __m256i isum[3];
        __m256 mins[3];
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            isum[g] = _mm256_setzero_si256();
            mins[g] = _mm256_setzero_ps();
        }
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const uint8_t *steps = blk + OD_K_X8_CODES + c * 8 * 32;
            __m256i s_lo[3], s_hi[3];
            OD_UNROLL
            for (int g = 0; g < G; g++) s_lo[g] = s_hi[g] = _mm256_setzero_si256();
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(steps + 32 * s));
                const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    const int8_t *x = xq[g] + sb * OD_QK_K + 64 * c + 4 * s;
                    s_lo[g] = _mm256_add_epi16(s_lo[g], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x))));
                    s_hi[g] = _mm256_add_epi16(s_hi[g], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x + 32))));
                }
            }
            OD_UNROLL
            for (int h = 0; h < 2; h++) {
                const int sub = 2 * c + h;
                __m256i sc32;
                __m256 mn;
                x8_k_sub_scales(blk, sub, &sc32, &mn);
                const __m256i sc16 = _mm256_or_si256(sc32, _mm256_slli_epi32(sc32, 16));
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    isum[g] = _mm256_add_epi32(isum[g], _mm256_madd_epi16(h ? s_hi[g] : s_lo[g], sc16));
                    mins[g] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xds[g][2 * (sb * 8 + sub) + 1]), mins[g]);
                }
            }
        }
        OD_UNROLL
        for (int g = 0; g < G; g++) x8_k_finish(blk, sb, xds[g], isum[g], mins[g], &acc[g], &acc_offset[g]);
    }
    OD_UNROLL
    for (int g = 0; g < G; g++)
        store_tile_row(a->out + (j0 + g) * a->ldo + n, _mm256_sub_ps(acc[g], acc_offset[g]), OD_X8_ROWS, a->accumulate);
}

/*
 * GEMV over Q6_K_X8 (layout in blocks.h): a step's codes q = low 4 bits | top 2 bits << 4 (0..63) go unsigned
 * into vpmaddubsw (pair sums <= 2 * 63 * 127, no saturation), each product at once into vpmaddwd with its
 * sub-block's int8 scale for the 8 rows (duplicated into both int16 halves of a lane), summed in int32 over the
 * super-block. The codes' -32 is subtracted once per super-block: 32 * sum over sub-blocks of scale times the
 * activation's code sum over those 16 elements (xsum, |.| <= 2032, kept in the low int16 half of a lane so that
 * vpmaddwd with the duplicated scales gives scale * xsum).
 */
OD_AVX2_INLINE void gemv_k6_x8_tile(const int G, const od_mm_args *a, int64_t n, int64_t j0, const int32_t *xsum) {
    const od_q8_act *act = a->act;
    const int64_t nsb = a->k / OD_QK_K, nsub = a->k / 16;
    const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
    const int8_t *xq[3];
    const float *xds[3];
    __m256 acc[3], unused[3];
    x8_tile_start(G, act, j0, xq, xds, acc, unused);
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = group + sb * OD_K6_X8_SB_BYTES;
        prefetch_superblock(blk, OD_K6_X8_SB_BYTES);
        __m256i isum[3], off[3];
        OD_UNROLL
        for (int g = 0; g < G; g++) isum[g] = off[g] = _mm256_setzero_si256();
        OD_UNROLL
        for (int c = 0; c < 4; c++) {
            const uint8_t *chunk = blk + OD_K6_X8_CODES + c * OD_K6_X8_CHUNK_BYTES;
            /* sub-blocks 4c..4c+3's scales, each row's duplicated into both int16 halves of its lane */
            __m256i sc16[4];
            OD_UNROLL
            for (int i = 0; i < 4; i += 2) {
                const __m256i two = _mm256_cvtepi8_epi16(
                    _mm_loadu_si128((const __m128i *)(blk + OD_K6_X8_SC + OD_X8_ROWS * (4 * c + i))));
                const __m256i lo = _mm256_unpacklo_epi16(two, two), hi = _mm256_unpackhi_epi16(two, two);
                sc16[i] = _mm256_permute2x128_si256(lo, hi, 0x20);
                sc16[i + 1] = _mm256_permute2x128_si256(lo, hi, 0x31);
            }
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const int32_t *xs = xsum + (j0 + g) * nsub + sb * 16 + 4 * c;
                OD_UNROLL
                for (int i = 0; i < 4; i++) off[g] = _mm256_add_epi32(off[g], _mm256_madd_epi16(sc16[i], _mm256_set1_epi32(xs[i])));
            }
            OD_UNROLL
            for (int h = 0; h < 4; h++) {
                const __m256i hb = _mm256_loadu_si256((const __m256i *)(chunk + 32 * (8 + h)));
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(chunk + 32 * h));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(chunk + 32 * (h + 4)));
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(v0, low4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), top2));
                q[1] = _mm256_or_si256(_mm256_and_si256(v1, low4), _mm256_and_si256(hb, top2));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low4),
                                       _mm256_and_si256(_mm256_slli_epi16(hb, 2), top2));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low4),
                                       _mm256_and_si256(_mm256_srli_epi16(hb, 2), top2));
                OD_UNROLL
                for (int g = 0; g < G; g++) {
                    const int8_t *x = xq[g] + sb * OD_QK_K + 64 * c + 4 * h;
                    OD_UNROLL
                    for (int i = 0; i < 4; i++) {
                        const __m256i prod = _mm256_maddubs_epi16(q[i], _mm256_set1_epi32(load_i32(x + 16 * i)));
                        isum[g] = _mm256_add_epi32(isum[g], _mm256_madd_epi16(prod, sc16[i]));
                    }
                }
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[g], _mm256_slli_epi32(off[g], 5)));
            acc[g] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(xds[g][2 * sb * 8])), acc[g]);
        }
    }
    OD_UNROLL
    for (int g = 0; g < G; g++) store_tile_row(a->out + (j0 + g) * a->ldo + n, acc[g], OD_X8_ROWS, a->accumulate);
}

/* Q6_K_X8: the activation rows' code sums per 16 elements (|.| <= 2032), each in the low int16 half of its lane so
 * that vpmaddwd with a duplicated scale gives scale * sum. */
OD_AVX2_INLINE void k6_code_sums(const od_mm_args *a, int32_t *xsum) {
    const int64_t sums = a->m * (a->k / 16);
    for (int64_t i = 0; i < sums; i++) {
        int32_t sum = 0;
        for (int e = 0; e < 16; e++) sum += a->act->qs[i * 16 + e];
        xsum[i] = (int32_t)(uint16_t)(int16_t)sum;
    }
}

/* GEMV over a repacked type, 8 rows x up to 3 activation rows a tile. */
OD_AVX2_INLINE void gemv_x8_tiles(const int type, const int G, const od_mm_args *a, int64_t n, int64_t j,
                                  const int32_t *xsum) {
    if (type == OD_TYPE_Q4_K_X8) gemv_k_x8_tile(G, a, n, j);
    else if (type == OD_TYPE_Q6_K_X8) gemv_k6_x8_tile(G, a, n, j, xsum);
    else gemv_x8_tile(type, G, a, n, j);
}

OD_AVX2_INLINE void gemv_x8(const int type, const od_mm_args *a, int64_t n0, int64_t n1) {
    /* Q6_K_X8: the activation rows' code sums per 16 elements */
    int32_t *xsum = NULL;
    if (type == OD_TYPE_Q6_K_X8) {
        xsum = od_scratch(1, (size_t)a->m * (a->k / 16) * sizeof(int32_t));
        if (!xsum) return;
        k6_code_sums(a, xsum);
    }
    /* W groups outer: every activation row passes over a group while it is in cache */
    for (int64_t n = n0; n < n1; n += OD_X8_ROWS) {
        int64_t j = 0;
        for (; j + 3 <= a->m; j += 3) gemv_x8_tiles(type, 3, a, n, j, xsum);
        const int rest = (int)(a->m - j);
        if (rest == 2) gemv_x8_tiles(type, 2, a, n, j, xsum);
        else if (rest == 1) gemv_x8_tiles(type, 1, a, n, j, xsum);
    }
}

/* The GEMM panel of 8 Q4_K_X8 rows, for gemm_k_x8_tile: per super-block sb, sub-block u, the 8 steps' nibbles
 * split (codes, as the other panels: 32-weight block sb * 8 + u); the rows' sub-block scales duplicated into both
 * int16 halves of a lane (scales[sb][u][8 rows][2]); the mins as floats (dw[sb][u][8]); d and dmin (mw[sb][16]). */
OD_AVX2_INLINE void pack_panel_k_x8(const od_mm_args *a, int64_t n, const panel_t *p) {
    const int64_t nsb = a->k / OD_QK_K;
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = group + sb * OD_K_X8_SB_BYTES;
        _mm256_storeu_ps(p->mw + sb * 16, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)));
        _mm256_storeu_ps(p->mw + sb * 16 + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16))));
        for (int u = 0; u < 8; u++) {
            __m256i sc32;
            __m256 mn;
            x8_k_sub_scales(blk, u, &sc32, &mn);
            _mm256_storeu_si256((__m256i *)(p->scales + (sb * 8 + u) * 16), _mm256_or_si256(sc32, _mm256_slli_epi32(sc32, 16)));
            _mm256_storeu_ps(p->dw + (sb * 8 + u) * 8, mn);
            const int c = u / 2, shift = (u & 1) * 4;
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + OD_K_X8_CODES + (c * 8 + s) * 32));
                _mm256_store_si256((__m256i *)(p->codes + (sb * 8 + u) * 256 + s * 32),
                                   _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), low4));
            }
        }
    }
}

/* 8 Q4_K_X8 panel rows x RM activation rows: gemv_k_x8_tile's arithmetic (integer sums per super-block, one
 * float step per super-block, mins apart), so every row has its one-row bits whatever M. */
OD_AVX2_INLINE void gemm_k_x8_tile(const int RM, const panel_t *p, const od_mm_args *a, int64_t j0, int64_t n,
                                   int nvalid) {
    const od_q8_act *act = a->act;
    const int64_t nsb = a->k / OD_QK_K;
    const int8_t *xq[4];
    const float *xds[4];
    __m256 acc[4], offset[4];
    x8_tile_start(RM, act, j0, xq, xds, acc, offset);
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m256i isum[4];
        __m256 mins[4];
        OD_UNROLL
        for (int j = 0; j < RM; j++) {
            isum[j] = _mm256_setzero_si256();
            mins[j] = _mm256_setzero_ps();
        }
        for (int u = 0; u < 8; u++) {
            const uint8_t *codes = p->codes + (sb * 8 + u) * 256;
            __m256i s16[4];
            OD_UNROLL
            for (int j = 0; j < RM; j++) s16[j] = _mm256_setzero_si256();
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256i w = _mm256_load_si256((const __m256i *)(codes + s * 32));
                OD_UNROLL
                for (int j = 0; j < RM; j++) {
                    const __m256i xb = _mm256_set1_epi32(load_i32(xq[j] + sb * OD_QK_K + 32 * u + 4 * s));
                    s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(w, xb));
                    OD_KEEP(s16[j]);
                }
            }
            const __m256i sc16 = _mm256_loadu_si256((const __m256i *)(p->scales + (sb * 8 + u) * 16));
            const __m256 mn = _mm256_loadu_ps(p->dw + (sb * 8 + u) * 8);
            OD_UNROLL
            for (int j = 0; j < RM; j++) {
                isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(s16[j], sc16));
                mins[j] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xds[j][2 * (sb * 8 + u) + 1]), mins[j]);
            }
        }
        const __m256 d = _mm256_loadu_ps(p->mw + sb * 16), dmin = _mm256_loadu_ps(p->mw + sb * 16 + 8);
        OD_UNROLL
        for (int j = 0; j < RM; j++) {
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), _mm256_mul_ps(d, _mm256_set1_ps(xds[j][2 * sb * 8])),
                                     acc[j]);
            offset[j] = _mm256_fmadd_ps(dmin, mins[j], offset[j]);
        }
    }
    OD_UNROLL
    for (int j = 0; j < RM; j++)
        store_tile_row(a->out + (j0 + j) * a->ldo + n, _mm256_sub_ps(acc[j], offset[j]), nvalid, a->accumulate);
}

/* The GEMM panel of 8 Q6_K_X8 rows, for gemm_k6_x8_tile: codes q (0..63, unsigned) of 32-weight block b of
 * super-block sb (elements 64c + 32o .. +31, c = b / 2, o = b % 2) in its 8 steps, step s from low step s of chunk
 * c (low or high nibble by o) and high step s % 4; each 16-weight sub-block's scales duplicated into both int16
 * halves of a lane (scales[sb][16][8 rows][2]); d (mw[sb][8]). */
OD_AVX2_INLINE void pack_panel_k6_x8(const od_mm_args *a, int64_t n, const panel_t *p) {
    const int64_t nb = a->k / OD_QK;
    const uint8_t *group = a->w + (size_t)n * a->row_bytes;
    const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x03);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = group + (b / 8) * OD_K6_X8_SB_BYTES;
        const int bi = (int)(b % 8), c = bi / 2, o = bi % 2;
        const uint8_t *chunk = blk + OD_K6_X8_CODES + c * OD_K6_X8_CHUNK_BYTES;
        if (bi == 0) _mm256_storeu_ps(p->mw + (b / 8) * 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)));
        OD_UNROLL
        for (int s = 0; s < 8; s++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(chunk + 32 * s));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(chunk + 32 * (8 + s % 4)));
            /* top bits of form i = 2o + (s >= 4) sit at bits 0-1, 4-5, 2-3, 6-7 of the high step */
            const int form = 2 * o + (s >= 4), top_shift = form == 0 ? 0 : form == 1 ? 4 : form == 2 ? 2 : 6;
            const __m256i lo = _mm256_and_si256(o ? _mm256_srli_epi16(v, 4) : v, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(top_shift)), top2);
            _mm256_store_si256((__m256i *)(p->codes + b * 256 + s * 32), _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)));
        }
        for (int half = 0; half < 2; half++) {
            const int8_t *sub = (const int8_t *)blk + OD_K6_X8_SC + OD_X8_ROWS * (4 * c + 2 * o + half);
            int16_t *sc = p->scales + (b * 2 + half) * 16;
            for (int r = 0; r < OD_X8_ROWS; r++) sc[2 * r] = sc[2 * r + 1] = sub[r];
        }
    }
}

/* 8 Q6_K_X8 panel rows x RM activation rows: the integer sum of gemv_k6_x8_tile (codes times sub-block scales,
 * minus 32 * scales times xsum) in another order, the same float step per super-block, so every row has its
 * one-row bits whatever M. Two steps' vpmaddubsw pairs add in int16 first (<= 4 * 63 * 127 < 32768). */
OD_AVX2_INLINE void gemm_k6_x8_tile(const int RM, const panel_t *p, const od_mm_args *a, int64_t j0, int64_t n,
                                    int nvalid, const int32_t *xsum) {
    const od_q8_act *act = a->act;
    const int64_t nsb = a->k / OD_QK_K, nsub = a->k / 16;
    const int8_t *xq[4];
    const float *xds[4];
    __m256 acc[4], unused[4];
    x8_tile_start(RM, act, j0, xq, xds, acc, unused);
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m256i isum[4], off[4];
        OD_UNROLL
        for (int j = 0; j < RM; j++) isum[j] = off[j] = _mm256_setzero_si256();
        for (int u = 0; u < 16; u++) {
            const uint8_t *codes = p->codes + (sb * 8 + u / 2) * 256 + (u % 2) * 128;
            const __m256i sc16 = _mm256_loadu_si256((const __m256i *)(p->scales + (sb * 16 + u) * 16));
            OD_UNROLL
            for (int t = 0; t < 2; t++) {
                const __m256i w0 = _mm256_load_si256((const __m256i *)(codes + 64 * t));
                const __m256i w1 = _mm256_load_si256((const __m256i *)(codes + 64 * t + 32));
                OD_UNROLL
                for (int j = 0; j < RM; j++) {
                    const int8_t *x = xq[j] + sb * OD_QK_K + 16 * u + 8 * t;
                    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(w0, _mm256_set1_epi32(load_i32(x))),
                                                         _mm256_maddubs_epi16(w1, _mm256_set1_epi32(load_i32(x + 4))));
                    isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(s16, sc16));
                    OD_KEEP(isum[j]);
                }
            }
            OD_UNROLL
            for (int j = 0; j < RM; j++)
                off[j] = _mm256_add_epi32(off[j], _mm256_madd_epi16(sc16, _mm256_set1_epi32(xsum[(j0 + j) * nsub + sb * 16 + u])));
        }
        const __m256 d = _mm256_loadu_ps(p->mw + sb * 8);
        OD_UNROLL
        for (int j = 0; j < RM; j++) {
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[j], _mm256_slli_epi32(off[j], 5)));
            acc[j] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(xds[j][2 * sb * 8])), acc[j]);
        }
    }
    OD_UNROLL
    for (int j = 0; j < RM; j++) store_tile_row(a->out + (j0 + j) * a->ldo + n, acc[j], nvalid, a->accumulate);
}

/* 8 panel rows x RM activation rows starting at j0. */
OD_AVX2_INLINE void gemm_tile(const int type, const int RM, const panel_t *p, const od_mm_args *a, int64_t j0,
                              int64_t n, int nvalid) {
    const od_q8_act *act = a->act;
    const int64_t k = a->k, nb = act->nb;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *xq[4];
    const float *xds[4];
    /* Q4_0_X8 / Q4_1_X8 keep the offset term apart and combine it at the end as gemv_x8_tile does, so that every
     * row has the bits of a one-row call whatever M (the ordering of the int16 sums does not matter: exact) */
    const int x8_offset = type == OD_TYPE_Q4_0_X8 || type == OD_TYPE_Q4_1_X8;
    __m256 acc[4], off[4];
    OD_UNROLL
    for (int j = 0; j < RM; j++) {
        xq[j] = act->qs + (j0 + j) * k;
        xds[j] = act->ds + (j0 + j) * nb * 2;
        acc[j] = off[j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *codes = p->codes + b * 256;
        __m256i isum[4];
        if (type == OD_TYPE_Q4_0 || type == OD_TYPE_Q4_0_X8 || type == OD_TYPE_Q4_1 || type == OD_TYPE_Q4_1_X8 ||
            type == OD_TYPE_Q4_K || type == OD_TYPE_Q4_K_X8) {
            /* 4-bit codes: |pair sum| <= 2*15*127, so all 8 steps fit in int16 */
            __m256i s16[4];
            OD_UNROLL
            for (int j = 0; j < RM; j++) s16[j] = _mm256_setzero_si256();
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256i w = _mm256_load_si256((const __m256i *)(codes + s * 32));
                OD_UNROLL
                for (int j = 0; j < RM; j++) {
                    const __m256i xb = _mm256_set1_epi32(load_i32(xq[j] + b * OD_QK + s * 4));
                    s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(w, xb));
                    OD_KEEP(s16[j]);
                }
            }
            OD_UNROLL
            for (int j = 0; j < RM; j++) isum[j] = _mm256_madd_epi16(s16[j], ones);
        } else if (type == OD_TYPE_Q5_0 || type == OD_TYPE_Q5_1 || type == OD_TYPE_Q5_K) {
            /* 5-bit codes: 4 steps fit in int16 */
            OD_UNROLL
            for (int j = 0; j < RM; j++) isum[j] = _mm256_setzero_si256();
            OD_UNROLL
            for (int half = 0; half < 2; half++) {
                __m256i s16[4];
                OD_UNROLL
                for (int j = 0; j < RM; j++) s16[j] = _mm256_setzero_si256();
                OD_UNROLL
                for (int s = half * 4; s < half * 4 + 4; s++) {
                    const __m256i w = _mm256_load_si256((const __m256i *)(codes + s * 32));
                    OD_UNROLL
                    for (int j = 0; j < RM; j++) {
                        const __m256i xb = _mm256_set1_epi32(load_i32(xq[j] + b * OD_QK + s * 4));
                        s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(w, xb));
                        OD_KEEP(s16[j]);
                    }
                }
                OD_UNROLL
                for (int j = 0; j < RM; j++) isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(s16[j], ones));
            }
        } else {
            /* signed codes: sign trick, one vpmaddwd per step (Q6_K: with its sub-scales) */
            const uint8_t *signs = p->signs + b * 256;
            OD_UNROLL
            for (int j = 0; j < RM; j++) isum[j] = _mm256_setzero_si256();
            OD_UNROLL
            for (int s = 0; s < 8; s++) {
                const __m256i w = _mm256_load_si256((const __m256i *)(codes + s * 32));
                const __m256i sg = _mm256_load_si256((const __m256i *)(signs + s * 32));
                const __m256i mul16 = type == OD_TYPE_Q6_K || type == OD_TYPE_Q3_K
                                          ? _mm256_loadu_si256((const __m256i *)(p->scales + b * 32 + (s / 4) * 16))
                                          : ones;
                OD_UNROLL
                for (int j = 0; j < RM; j++) {
                    const __m256i xb = _mm256_set1_epi32(load_i32(xq[j] + b * OD_QK + s * 4));
                    const __m256i prod = _mm256_maddubs_epi16(w, _mm256_sign_epi8(xb, sg));
                    isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(prod, mul16));
                    OD_KEEP(isum[j]);
                }
            }
        }
        const __m256 dw = _mm256_load_ps(p->dw + b * 8);
        OD_UNROLL
        for (int j = 0; j < RM; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), _mm256_mul_ps(dw, _mm256_set1_ps(xds[j][2 * b])), acc[j]);
        if (x8_offset) {
            const __m256 mw = _mm256_load_ps(p->mw + b * 8);
            OD_UNROLL
            for (int j = 0; j < RM; j++) off[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xds[j][2 * b + 1]), off[j]);
        } else if (!IS_SIGNED_TYPE(type)) {
            const __m256 mw = _mm256_load_ps(p->mw + b * 8);
            OD_UNROLL
            for (int j = 0; j < RM; j++) acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xds[j][2 * b + 1]), acc[j]);
        }
    }
    if (x8_offset) {
        OD_UNROLL
        for (int j = 0; j < RM; j++)
            acc[j] = type == OD_TYPE_Q4_1_X8 ? _mm256_add_ps(acc[j], off[j])
                                             : _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), off[j], acc[j]);
    }
    OD_UNROLL
    for (int j = 0; j < RM; j++) store_tile_row(a->out + (j0 + j) * a->ldo + n, acc[j], nvalid, a->accumulate);
}

/* One panel x RM activation rows, by the type's tile. */
OD_AVX2_INLINE void gemm_rows(const int type, const int RM, const panel_t *p, const od_mm_args *a, int64_t j0,
                              int64_t n, int nvalid, const int32_t *xsum) {
    if (type == OD_TYPE_Q6_K_X8) gemm_k6_x8_tile(RM, p, a, j0, n, nvalid, xsum);
    else if (type == OD_TYPE_Q4_K_X8) gemm_k_x8_tile(RM, p, a, j0, n, nvalid);
    else gemm_tile(type, RM, p, a, j0, n, nvalid);
}

OD_AVX2_INLINE void gemm_quant(const int type, const od_mm_args *a, int64_t n0, int64_t n1) {
    const int64_t nb = a->k / OD_QK;
    const size_t code_bytes = (size_t)nb * 256;
    const size_t bytes = code_bytes * 2 + (size_t)nb * 8 * sizeof(float) * 2 + (size_t)nb * 32 * sizeof(int16_t);
    const size_t xsum_bytes = type == OD_TYPE_Q6_K_X8 ? (size_t)a->m * (a->k / 16) * sizeof(int32_t) : 0;
    uint8_t *buf = od_scratch(1, bytes + xsum_bytes);
    if (!buf) return;
    int32_t *xsum = (int32_t *)(buf + bytes);
    if (xsum_bytes) k6_code_sums(a, xsum);
    panel_t p = {.codes = buf, .signs = buf + code_bytes, .dw = (float *)(buf + 2 * code_bytes)};
    p.mw = p.dw + nb * 8;
    p.scales = (int16_t *)(p.mw + nb * 8);
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
        const int rows = (int)(n1 - n < PANEL_ROWS ? n1 - n : PANEL_ROWS);
        if (type == OD_TYPE_Q4_0_X8 || type == OD_TYPE_Q4_1_X8) pack_panel_x8(type, a, n, &p);
        else if (type == OD_TYPE_Q4_K_X8) pack_panel_k_x8(a, n, &p);
        else if (type == OD_TYPE_Q6_K_X8) pack_panel_k6_x8(a, n, &p);
        else pack_panel(type, a, n, rows, &p);
        int64_t j = 0;
        for (; j + 4 <= a->m; j += 4) gemm_rows(type, 4, &p, a, j, n, rows, xsum);
        switch (a->m - j) {
        case 3: gemm_rows(type, 3, &p, a, j, n, rows, xsum); break;
        case 2: gemm_rows(type, 2, &p, a, j, n, rows, xsum); break;
        case 1: gemm_rows(type, 1, &p, a, j, n, rows, xsum); break;
        default: break;
        }
    }
}

#define IS_X8_TYPE(t) \
    ((t) == OD_TYPE_Q4_0_X8 || (t) == OD_TYPE_Q4_1_X8 || (t) == OD_TYPE_Q4_K_X8 || (t) == OD_TYPE_Q6_K_X8)
#define DEFINE_QUANT_MATMUL(NAME, TYPE)                                          \
    OD_AVX2 static void NAME(const od_mm_args *a, int64_t n0, int64_t n1) {     \
        if (a->m >= GEMM_MIN_M) gemm_quant(TYPE, a, n0, n1);                     \
        else if (IS_X8_TYPE(TYPE)) gemv_x8(TYPE, a, n0, n1);                  \
        else gemv_quant(TYPE, a, n0, n1);                                        \
    }

DEFINE_QUANT_MATMUL(matmul_q4_0_avx2, OD_TYPE_Q4_0)
DEFINE_QUANT_MATMUL(matmul_q4_1_avx2, OD_TYPE_Q4_1)

DEFINE_QUANT_MATMUL(matmul_q4_0_x8_avx2, OD_TYPE_Q4_0_X8)
DEFINE_QUANT_MATMUL(matmul_q4_k_x8_avx2, OD_TYPE_Q4_K_X8)
DEFINE_QUANT_MATMUL(matmul_q4_1_x8_avx2, OD_TYPE_Q4_1_X8)
DEFINE_QUANT_MATMUL(matmul_q6_k_x8_avx2, OD_TYPE_Q6_K_X8)
DEFINE_QUANT_MATMUL(matmul_q5_0_avx2, OD_TYPE_Q5_0)
DEFINE_QUANT_MATMUL(matmul_q5_1_avx2, OD_TYPE_Q5_1)
DEFINE_QUANT_MATMUL(matmul_q8_0_avx2, OD_TYPE_Q8_0)
DEFINE_QUANT_MATMUL(matmul_q4_k_avx2, OD_TYPE_Q4_K)
DEFINE_QUANT_MATMUL(matmul_q5_k_avx2, OD_TYPE_Q5_K)
DEFINE_QUANT_MATMUL(matmul_iq4_nl_avx2, OD_TYPE_IQ4_NL)
DEFINE_QUANT_MATMUL(matmul_iq4_xs_avx2, OD_TYPE_IQ4_XS)
DEFINE_QUANT_MATMUL(matmul_q6_k_avx2, OD_TYPE_Q6_K)
DEFINE_QUANT_MATMUL(matmul_q3_k_avx2, OD_TYPE_Q3_K)

/* ------------------------------------------------------------------ float weights */

OD_AVX2_INLINE __m256 load_w8(const int type, const uint8_t *row, int64_t i) {
    if (type == OD_TYPE_F32) return _mm256_loadu_ps((const float *)row + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * i));
    if (type == OD_TYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

OD_AVX2_INLINE float load_w1(const int type, const uint8_t *row, int64_t i) {
    if (type == OD_TYPE_F32) return ((const float *)row)[i];
    if (type == OD_TYPE_F16) return half_to_f32(row + 2 * i);
    return od_bf16_to_fp32(od_read_u16(row + 2 * i));
}

OD_AVX2_INLINE void gemv_float_group(const int type, const int G, const od_mm_args *a, int64_t n0, int64_t n1,
                                     int64_t j0) {
    const int64_t k = a->k, k8 = k & ~(int64_t)7;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = a->w + (size_t)n * a->row_bytes;
        __m256 acc[4][2];
        OD_UNROLL
        for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= k8; i += 16) {
            _mm_prefetch((const char *)row + a->row_bytes + i * (type == OD_TYPE_F32 ? 4 : 2), _MM_HINT_T0);
            const __m256 w0 = load_w8(type, row, i), w1 = load_w8(type, row, i + 8);
            OD_UNROLL
            for (int g = 0; g < G; g++) {
                const float *xr = a->x + (j0 + g) * k + i;
                acc[g][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[g][1]);
            }
        }
        for (; i < k8; i += 8) {
            const __m256 w0 = load_w8(type, row, i);
            OD_UNROLL
            for (int g = 0; g < G; g++)
                acc[g][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a->x + (j0 + g) * k + i), acc[g][0]);
        }
        OD_UNROLL
        for (int g = 0; g < G; g++) {
            const float *xr = a->x + (j0 + g) * k;
            float v = hsum_ps(_mm256_add_ps(acc[g][0], acc[g][1]));
            for (int64_t t = k8; t < k; t++) v += load_w1(type, row, t) * xr[t];
            float *dst = a->out + (j0 + g) * a->ldo + n;
            *dst = a->accumulate ? *dst + v : v;
        }
    }
}

/* Float GEMM: 16 weight rows transposed into a [K][16] f32 panel, 6 x 16 register tile. */
#define FPANEL_ROWS 16
#define FTILE_M 6

OD_AVX2_INLINE void transpose8_ps(__m256 r[8]) {
    __m256i v[8];
    for (int i = 0; i < 8; i++) v[i] = _mm256_castps_si256(r[i]);
    transpose8_epi32(v);
    for (int i = 0; i < 8; i++) r[i] = _mm256_castsi256_ps(v[i]);
}

OD_AVX2_INLINE void pack_float_panel(const int type, const od_mm_args *a, int64_t n, int rows, float *panel) {
    const int64_t k = a->k, k8 = k & ~(int64_t)7;
    OD_UNROLL
    for (int half = 0; half < 2; half++) {
        for (int64_t i = 0; i < k8; i += 8) {
            __m256 v[8];
            for (int r = 0; r < 8; r++) {
                const int row = half * 8 + r;
                v[r] = row < rows ? load_w8(type, a->w + (size_t)(n + row) * a->row_bytes, i) : _mm256_setzero_ps();
            }
            transpose8_ps(v);
            for (int t = 0; t < 8; t++) _mm256_store_ps(panel + (i + t) * FPANEL_ROWS + half * 8, v[t]);
        }
        for (int64_t t = k8; t < k; t++)
            for (int r = 0; r < 8; r++) {
                const int row = half * 8 + r;
                panel[t * FPANEL_ROWS + row] = row < rows ? load_w1(type, a->w + (size_t)(n + row) * a->row_bytes, t) : 0.0f;
            }
    }
}

OD_AVX2_INLINE void gemm_float_tile(const int RM, const float *panel, const od_mm_args *a, int64_t j0, int64_t n,
                                    int nvalid) {
    const int64_t k = a->k;
    __m256 acc[FTILE_M][2];
    OD_UNROLL
    for (int j = 0; j < RM; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    const float *x0 = a->x + j0 * k;
    for (int64_t t = 0; t < k; t++) {
        const __m256 w0 = _mm256_load_ps(panel + t * FPANEL_ROWS), w1 = _mm256_load_ps(panel + t * FPANEL_ROWS + 8);
        OD_UNROLL
        for (int j = 0; j < RM; j++) {
            const __m256 xb = _mm256_broadcast_ss(x0 + j * k + t);
            acc[j][0] = _mm256_fmadd_ps(w0, xb, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, xb, acc[j][1]);
        }
    }
    OD_UNROLL
    for (int j = 0; j < RM; j++) {
        float *dst = a->out + (j0 + j) * a->ldo + n;
        store_tile_row(dst, acc[j][0], nvalid < 8 ? nvalid : 8, a->accumulate);
        if (nvalid > 8) store_tile_row(dst + 8, acc[j][1], nvalid - 8, a->accumulate);
    }
}

OD_AVX2_INLINE void matmul_float(const int type, const od_mm_args *a, int64_t n0, int64_t n1) {
    if (a->m < GEMM_MIN_M) {
        for (int64_t c0 = n0; c0 < n1; c0 += GEMV_W_CHUNK) {
            const int64_t c1 = c0 + GEMV_W_CHUNK < n1 ? c0 + GEMV_W_CHUNK : n1;
            int64_t j = 0;
            for (; j + 2 <= a->m; j += 2) gemv_float_group(type, 2, a, c0, c1, j);
            if (j < a->m) gemv_float_group(type, 1, a, c0, c1, j);
        }
        return;
    }
    float *panel = od_scratch(1, (size_t)a->k * FPANEL_ROWS * sizeof(float));
    if (!panel) return;
    for (int64_t n = n0; n < n1; n += FPANEL_ROWS) {
        const int rows = (int)(n1 - n < FPANEL_ROWS ? n1 - n : FPANEL_ROWS);
        pack_float_panel(type, a, n, rows, panel);
        int64_t j = 0;
        for (; j + FTILE_M <= a->m; j += FTILE_M) gemm_float_tile(FTILE_M, panel, a, j, n, rows);
        switch (a->m - j) {
        case 5: gemm_float_tile(5, panel, a, j, n, rows); break;
        case 4: gemm_float_tile(4, panel, a, j, n, rows); break;
        case 3: gemm_float_tile(3, panel, a, j, n, rows); break;
        case 2: gemm_float_tile(2, panel, a, j, n, rows); break;
        case 1: gemm_float_tile(1, panel, a, j, n, rows); break;
        default: break;
        }
    }
}

OD_AVX2 static void matmul_f32_avx2(const od_mm_args *a, int64_t n0, int64_t n1) { matmul_float(OD_TYPE_F32, a, n0, n1); }
OD_AVX2 static void matmul_f16_avx2(const od_mm_args *a, int64_t n0, int64_t n1) { matmul_float(OD_TYPE_F16, a, n0, n1); }
OD_AVX2 static void matmul_bf16_avx2(const od_mm_args *a, int64_t n0, int64_t n1) { matmul_float(OD_TYPE_BF16, a, n0, n1); }

/* ------------------------------------------------------------------ dequantization (get_rows) */

OD_AVX2 static void dequant_q8_0_avx2(const uint8_t *row, float *out, int64_t k) {
    for (int64_t b = 0; b < k / OD_QK; b++) {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        const __m256 d = _mm256_set1_ps(half_to_f32(&blk->d));
        for (int i = 0; i < 32; i += 8) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk->qs + i)));
            _mm256_storeu_ps(out + b * OD_QK + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
        }
    }
}

OD_AVX2 static void dequant_f16_avx2(const uint8_t *row, float *out, int64_t k) {
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(out + i, load_w8(OD_TYPE_F16, row, i));
    for (; i < k; i++) out[i] = half_to_f32(row + 2 * i);
}

const od_isa_ops od_ops_avx2 = {
    .name = "avx2",
    .quantize_act = quantize_act_avx2,
    .matmul =
        {
            [OD_TYPE_F32] = matmul_f32_avx2,
            [OD_TYPE_F16] = matmul_f16_avx2,
            [OD_TYPE_BF16] = matmul_bf16_avx2,
            [OD_TYPE_Q4_0] = matmul_q4_0_avx2,
            [OD_TYPE_Q4_0_X8] = matmul_q4_0_x8_avx2,
            [OD_TYPE_Q4_K_X8] = matmul_q4_k_x8_avx2,
            [OD_TYPE_Q4_1_X8] = matmul_q4_1_x8_avx2,
            [OD_TYPE_Q6_K_X8] = matmul_q6_k_x8_avx2,
            [OD_TYPE_Q4_1] = matmul_q4_1_avx2,
            [OD_TYPE_Q5_0] = matmul_q5_0_avx2,
            [OD_TYPE_Q5_1] = matmul_q5_1_avx2,
            [OD_TYPE_Q8_0] = matmul_q8_0_avx2,
            [OD_TYPE_Q4_K] = matmul_q4_k_avx2,
            [OD_TYPE_Q3_K] = matmul_q3_k_avx2,
            [OD_TYPE_Q5_K] = matmul_q5_k_avx2,
            [OD_TYPE_Q6_K] = matmul_q6_k_avx2,
            [OD_TYPE_IQ4_NL] = matmul_iq4_nl_avx2,
            [OD_TYPE_IQ4_XS] = matmul_iq4_xs_avx2,
        },
    /* get_rows runs once per step on a handful of rows: only the common table types are vectorized */
    .dequant_row =
        {
            [OD_TYPE_F32] = od_dequant_f32_scalar,
            [OD_TYPE_F16] = dequant_f16_avx2,
            [OD_TYPE_BF16] = od_dequant_bf16_scalar,
            [OD_TYPE_Q4_0] = od_dequant_q4_0_scalar,
            [OD_TYPE_Q4_1] = od_dequant_q4_1_scalar,
            [OD_TYPE_Q5_0] = od_dequant_q5_0_scalar,
            [OD_TYPE_Q5_1] = od_dequant_q5_1_scalar,
            [OD_TYPE_Q8_0] = dequant_q8_0_avx2,
            [OD_TYPE_Q4_K] = od_dequant_q4_k_scalar,
            [OD_TYPE_Q3_K] = od_dequant_q3_k_scalar,
            [OD_TYPE_Q5_K] = od_dequant_q5_k_scalar,
            [OD_TYPE_Q6_K] = od_dequant_q6_k_scalar,
            [OD_TYPE_IQ4_NL] = od_dequant_iq4_nl_scalar,
            [OD_TYPE_IQ4_XS] = od_dequant_iq4_xs_scalar,
        },
    .rmsnorm_row = od_rmsnorm_row_avx2,
    .rope_row = od_rope_row_avx2,
    .attention = od_attention_avx2,
    .attention_group = od_attention_group_avx2,
    .silu_mul = od_silu_mul_avx2,
    .gelu_mul = od_gelu_mul_avx2,
    .add = od_add_avx2,
    .k_min_search = od_k_min_search_avx2,
    .q6_k_search = od_q6_k_search_avx2,
};

#endif /* x86-64 */
