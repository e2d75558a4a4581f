/*
 * Quantized matmul tiles for NEON, included twice by quant_neon.c: once for plain ARMv8 NEON
 * (int8 products widened with vmull/vpadal) and once for the dot-product extension (vdotq_s32,
 * compiled with the "+dotprod" target so the file still builds for any ARMv8 core). Before each
 * inclusion quant_neon.c defines:
 *   NB(name)     - suffixes a function name for this variant
 *   NB_ATTR      - the variant's target attribute (empty for plain NEON)
 *   NB_DOT(acc, a, b) - acc (int32x4) += products of a and b (int8x16), 4 per lane
 */

/* 32 codes (lo: elements 0..15, hi: 16..31) dotted with 32 activations */
static inline __attribute__((always_inline)) NB_ATTR int32x4_t NB(dot32)(int8x16_t lo, int8x16_t hi, const int8_t *x) {
    int32x4_t acc = vdupq_n_s32(0);
    acc = NB_DOT(acc, lo, vld1q_s8(x));
    return NB_DOT(acc, hi, vld1q_s8(x + 16));
}

static inline __attribute__((always_inline)) NB_ATTR int32x4_t NB(dot16)(int8x16_t w, const int8_t *x) {
    return NB_DOT(vdupq_n_s32(0), w, vld1q_s8(x));
}

/* out[j0..j0+G)[n..n+R) for R weight rows x G activation rows (R*G independent accumulators) */
static inline __attribute__((always_inline)) NB_ATTR void NB(tile)(const int type, const int R, const int G,
                                                                   const od_mm_args *a, int64_t n, int64_t j0) {
    const od_q8_act *act = a->act;
    const int64_t k = a->k, nb = act->nb;
    const int8_t *xq[4];
    const float *xds[4];
    const uint8_t *rows[4];
    float32x4_t acc[4][4];
    float acc_offset[4][4];
    for (int g = 0; g < G; g++) {
        xq[g] = act->qs + (j0 + g) * k;
        xds[g] = act->ds + (j0 + g) * nb * 2;
    }
    for (int r = 0; r < R; r++) {
        rows[r] = a->w + (size_t)(n + r) * a->row_bytes;
        for (int g = 0; g < G; g++) {
            acc[r][g] = vdupq_n_f32(0.0f);
            acc_offset[r][g] = 0.0f;
        }
    }
    for (int64_t b = 0; b < nb; b++) {
        for (int r = 0; r < R; r++) {
            const neon_block blk = neon_load_block(type, rows[r], b);
            for (int g = 0; g < G; g++) {
                const int8_t *x = xq[g] + b * OD_QK;
                int32x4_t p;
                if (type == OD_TYPE_Q6_K || type == OD_TYPE_Q3_K)
                    p = vmlaq_n_s32(vmulq_n_s32(NB(dot16)(blk.lo, x), blk.sc0), NB(dot16)(blk.hi, x + 16), blk.sc1);
                else
                    p = NB(dot32)(blk.lo, blk.hi, x);
                acc[r][g] = vfmaq_n_f32(acc[r][g], vcvtq_f32_s32(p), blk.dw * xds[g][2 * b]);
                if (NEON_HAS_OFFSET(type)) acc_offset[r][g] += blk.mw * xds[g][2 * b + 1];
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int g = 0; g < G; g++) {
            float *dst = a->out + (j0 + g) * a->ldo + n + r;
            const float v = vaddvq_f32(acc[r][g]) + acc_offset[r][g];
            *dst = a->accumulate ? *dst + v : v;
        }
}

static inline __attribute__((always_inline)) NB_ATTR void NB(rows)(const int type, const int G, const od_mm_args *a,
                                                                   int64_t n0, int64_t n1, int64_t j0) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) NB(tile)(type, 4, G, a, n, j0);
    for (; n < n1; n++) NB(tile)(type, 1, G, a, n, j0);
}

static inline __attribute__((always_inline)) NB_ATTR void NB(matmul)(const int type, const od_mm_args *a, int64_t n0,
                                                                     int64_t n1) {
    /* weight rows outer (each 4-row group of W is read once per 4 activation rows) */
    int64_t j = 0;
    for (; j + 4 <= a->m; j += 4) NB(rows)(type, 4, a, n0, n1, j);
    switch (a->m - j) {
    case 3: NB(rows)(type, 3, a, n0, n1, j); break;
    case 2: NB(rows)(type, 2, a, n0, n1, j); break;
    case 1: NB(rows)(type, 1, a, n0, n1, j); break;
    default: break;
    }
}

#define NB_DEFINE(TYPE_NAME, TYPE)                                                                 \
    NB_ATTR static void NB(matmul_##TYPE_NAME)(const od_mm_args *a, int64_t n0, int64_t n1) {      \
        NB(matmul)(TYPE, a, n0, n1);                                                              \
    }
NB_DEFINE(q4_0, OD_TYPE_Q4_0)
NB_DEFINE(q4_1, OD_TYPE_Q4_1)
NB_DEFINE(q5_0, OD_TYPE_Q5_0)
NB_DEFINE(q5_1, OD_TYPE_Q5_1)
NB_DEFINE(q8_0, OD_TYPE_Q8_0)
NB_DEFINE(q4_k, OD_TYPE_Q4_K)
NB_DEFINE(q5_k, OD_TYPE_Q5_K)
NB_DEFINE(q6_k, OD_TYPE_Q6_K)
NB_DEFINE(q3_k, OD_TYPE_Q3_K)
NB_DEFINE(iq4_nl, OD_TYPE_IQ4_NL)
NB_DEFINE(iq4_xs, OD_TYPE_IQ4_XS)
#undef NB_DEFINE
