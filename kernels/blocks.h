/*
 * GGML/GGUF block layouts (as written by llama.cpp and gguf-py) and the fp16/bf16 helpers.
 *
 * Layouts follow ggml-common.h byte for byte: the structs are read straight out of mmapped GGUF
 * tensor data, so every size is pinned by a static assertion. All structs contain only 1- and
 * 2-byte members, so they have 2-byte alignment and can be read from any even offset; GGUF
 * aligns tensor data to 32 bytes anyway. Readers must still use memcpy-free, byte-wise or
 * unaligned loads for the fp16 fields when a tensor starts at an odd address (the binding
 * rejects nothing there: unaligned 16-bit loads are fine on x86 and aarch64).
 */
#ifndef ONDEVICE_BLOCKS_H
#define ONDEVICE_BLOCKS_H

#include <stdint.h>
#include <string.h>

typedef uint16_t od_half; /* IEEE binary16 bits */
typedef uint16_t od_bf16; /* bfloat16 bits */

/* GGML type ids (enum ggml_type). Only the ones the kernels understand are listed. */
enum od_type {
    OD_TYPE_F32 = 0,
    OD_TYPE_F16 = 1,
    OD_TYPE_Q4_0 = 2,
    OD_TYPE_Q4_1 = 3,
    OD_TYPE_Q5_0 = 6,
    OD_TYPE_Q5_1 = 7,
    OD_TYPE_Q8_0 = 8,
    OD_TYPE_Q3_K = 11,
    OD_TYPE_Q4_K = 12,
    OD_TYPE_Q5_K = 13,
    OD_TYPE_Q6_K = 14,
    OD_TYPE_IQ4_NL = 20,
    OD_TYPE_IQ4_XS = 23,
    OD_TYPE_BF16 = 30,
    /* Not a GGML type: Q4_0 rows repacked at load by od_repack (see below). */
    OD_TYPE_Q4_0_X8 = 32,
    /* Not a GGML type: Q4_K rows repacked at load (see below). */
    OD_TYPE_Q4_K_X8 = 33,
    /* Not GGML types: Q4_1 and Q8_0 rows repacked at load (see below). */
    OD_TYPE_Q4_1_X8 = 34,
    OD_TYPE_Q8_0_X8 = 35,
    /* Not a GGML type: Q6_K rows repacked at load (see below). */
    OD_TYPE_Q6_K_X8 = 36,
};

/*
 * OD_TYPE_Q4_0_X8: the blocks of 8 consecutive Q4_0 rows interleaved, so that one activation load serves 8
 * rows and the 8 results land in one vector. Same bytes as Q4_0 (18 per 32 weights per row), so a tensor
 * keeps its size. For each group of 8 rows and each block b: 8 fp16 scales (row order), then 4 chunks of 32
 * bytes; chunk c holds, for row r at bytes 4r..4r+3, the Q4_0 bytes qs[4c..4c+3] of that row's block b:
 * low nibbles are elements 4c..4c+3, high nibbles elements 16+4c..16+4c+3. Row counts must divide by 8.
 */
#define OD_X8_ROWS 8
#define OD_X8_BLOCK_BYTES (OD_X8_ROWS * 18)

/*
 * OD_TYPE_Q4_K_X8: 8 consecutive Q4_K rows interleaved per super-block, 1184 bytes per 8 rows (148 per row and
 * super-block, 4 more than Q4_K: the 6-bit scales are stored unpacked). For each group of 8 rows and super-block:
 * d[8] and dmin[8] (fp16, row order), sc[8 sub-blocks][8 rows] and mn[8][8] (u8), then 4 chunks x 8 steps of 32
 * bytes: chunk c step s holds for row r at bytes 4r..4r+3 the Q4_K bytes qs[32c+4s..32c+4s+3] (low nibbles:
 * sub-block 2c, elements 4s..4s+3; high nibbles: the same elements of sub-block 2c+1).
 */
#define OD_K_X8_SB_BYTES (OD_X8_ROWS * 148)

/*
 * OD_TYPE_Q4_1_X8: Q4_0_X8's arrangement for Q4_1 (20 bytes per row and block, as Q4_1): per group of 8 rows and
 * block, d[8] then m[8] (fp16, row order), then the 4 chunks of 32 code bytes as in Q4_0_X8.
 * OD_TYPE_Q8_0_X8: per group of 8 rows and block, d[8] (fp16), then 8 chunks of 32 bytes; chunk c holds for row r
 * at bytes 4r..4r+3 the codes qs[4c..4c+3] of that row's block, stored as unsigned code + 128 (the dot-product
 * instructions take one unsigned operand). 34 bytes per row and block, as Q8_0.
 */
#define OD_X8_Q4_1_BLOCK_BYTES (OD_X8_ROWS * 20)
#define OD_X8_Q8_0_BLOCK_BYTES (OD_X8_ROWS * 34)
#define OD_K_X8_SC 32
#define OD_K_X8_MN 96
#define OD_K_X8_CODES 160

/*
 * OD_TYPE_Q6_K_X8: 8 consecutive Q6_K rows interleaved per super-block, the same 1680 bytes as Q6_K (210 per row).
 * For each group of 8 rows and super-block: d[8] (fp16, row order), sc[16 sub-blocks of 16][8 rows] (int8), then
 * 4 chunks of 64 elements, each 8 low steps then 4 high steps of 32 bytes, row r at bytes 4r..4r+3 of a step. The
 * codes q (0..63, value d * sc * (q - 32)) are split: low step s of chunk c holds the low 4 bits of elements
 * 64c+4s+j (low nibble) and 64c+32+4s+j (high nibble); high step h holds their top 2 bits, 2 bits per element:
 * bits 0-1 element 64c+4h+j, 2-3 element 64c+32+4h+j, 4-5 element 64c+16+4h+j, 6-7 element 64c+48+4h+j
 * (the elements of low steps h and h+4). So a step decodes to unsigned bytes of one sub-block with 2 shifts and
 * masks, and sub-block 4c+i is covered by low nibbles of steps 0-3 (i=0), 4-7 (i=1), high nibbles 0-3 (i=2), 4-7.
 */
#define OD_K6_X8_SB_BYTES (OD_X8_ROWS * 210)
#define OD_K6_X8_SC 16
#define OD_K6_X8_CODES 144
#define OD_K6_X8_CHUNK_BYTES (12 * 32)
_Static_assert(OD_K6_X8_CODES + 4 * OD_K6_X8_CHUNK_BYTES == OD_K6_X8_SB_BYTES, "Q6_K_X8 super-block size");
_Static_assert(OD_K6_X8_SC + 16 * OD_X8_ROWS == OD_K6_X8_CODES, "Q6_K_X8 scales end where the codes start");

#define OD_QK 32   /* weights per block in the 32-element formats */
#define OD_QK_K 256 /* weights per super-block in the K formats */
#define OD_K_SCALE_SIZE 12

/* x = (q - 8) * d, q in [0, 15]; element j in the low nibble of qs[j], j+16 in the high nibble. */
typedef struct {
    od_half d;
    uint8_t qs[OD_QK / 2];
} block_q4_0;
_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must be 18 bytes");

/* x = q * d + m, q in [0, 15]; nibble order as q4_0. */
typedef struct {
    od_half d;
    od_half m;
    uint8_t qs[OD_QK / 2];
} block_q4_1;
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must be 20 bytes");

/* x = (q - 16) * d, q in [0, 31]: low 4 bits as q4_0, bit 4 of element j is bit j of qh. */
typedef struct {
    od_half d;
    uint8_t qh[4];
    uint8_t qs[OD_QK / 2];
} block_q5_0;
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must be 22 bytes");

/* x = q * d + m, q in [0, 31]; bits as q5_0. */
typedef struct {
    od_half d;
    od_half m;
    uint8_t qh[4];
    uint8_t qs[OD_QK / 2];
} block_q5_1;
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 must be 24 bytes");

/* x = q * d, q in [-127, 127] (-128 is tolerated). */
typedef struct {
    od_half d;
    int8_t qs[OD_QK];
} block_q8_0;
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must be 34 bytes");

/*
 * 256 weights in 8 sub-blocks of 32. Sub-block s has a 6-bit scale sc[s] and 6-bit min m[s]
 * packed in `scales`; x = d * sc[s] * q - dmin * m[s], q in [0, 15]. qs holds 4 chunks of 32
 * bytes: chunk c's low nibbles are sub-block 2c, its high nibbles sub-block 2c+1.
 */
typedef struct {
    od_half d;
    od_half dmin;
    uint8_t scales[OD_K_SCALE_SIZE];
    uint8_t qs[OD_QK_K / 2];
} block_q4_K;
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K must be 144 bytes");

/*
 * 256 weights, 16 six-bit scales (one per 16 weights, stored + 32); x = d * (sc[e/16] - 32) * (q - 4), q in [0, 7].
 * Weight e has its low 2 bits at bit 2*((e % 128) / 32) of qs[32*(e / 128) + e % 32] and its high bit (set: q >= 4)
 * at bit e / 32 of hmask[e % 32]. Scale j: low nibble of scales[j % 8] (j < 8: bits 0-3, else bits 4-7), top 2 bits
 * at bits 2*(j / 4) of scales[8 + j % 4].
 */
typedef struct {
    uint8_t hmask[OD_QK_K / 8];
    uint8_t qs[OD_QK_K / 4];
    uint8_t scales[12];
    od_half d;
} block_q3_K;
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K must be 110 bytes");

/*
 * As Q4_K with 5-bit codes, q in [0, 31]: the low 4 bits are laid out as Q4_K's qs, bit 4 of element l of
 * sub-block s is bit s of qh[l].
 */
typedef struct {
    od_half d;
    od_half dmin;
    uint8_t scales[OD_K_SCALE_SIZE];
    uint8_t qh[OD_QK_K / 8];
    uint8_t qs[OD_QK_K / 2];
} block_q5_K;
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K must be 176 bytes");

/*
 * 256 weights, 16 int8 scales (one per 16 weights); x = d * scales[i/16] * (q - 32), q in [0, 63].
 * Two halves of 128: in half h, for l < 32 the four weights l, l+32, l+64, l+96 take their low
 * 4 bits from ql[64h+l] & 15, ql[64h+l+32] & 15, ql[64h+l] >> 4, ql[64h+l+32] >> 4 and their
 * top 2 bits from qh[32h+l] bits 0-1, 2-3, 4-5, 6-7.
 */
typedef struct {
    uint8_t ql[OD_QK_K / 2];
    uint8_t qh[OD_QK_K / 4];
    int8_t scales[OD_QK_K / 16];
    od_half d;
} block_q6_K;
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K must be 210 bytes");

/* The 16 levels of the non-linear 4-bit types (ggml's kvalues_iq4nl), indexed by the codes. */
static const int8_t od_iq4_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* x = d * od_iq4_levels[q]; nibble order as q4_0. */
typedef struct {
    od_half d;
    uint8_t qs[OD_QK / 2];
} block_iq4_nl;
_Static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl must be 18 bytes");

/*
 * 256 weights in 8 blocks of 32; block b has the 6-bit scale ls = (scales_l[b/2] >> 4*(b%2) & 15) |
 * ((scales_h >> 2b & 3) << 4) and x = d * (ls - 32) * od_iq4_levels[q]; block b's codes are qs[16b..16b+15]
 * in q4_0's nibble order.
 */
typedef struct {
    od_half d;
    uint16_t scales_h;
    uint8_t scales_l[OD_QK_K / 64];
    uint8_t qs[OD_QK_K / 2];
} block_iq4_xs;
_Static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs must be 136 bytes");

/*
 * Activations quantized on the fly (our own layout, never stored in files), with the same values
 * llama.cpp's CPU backend computes for the weight type, so that both runtimes make the same
 * rounding decisions (token-identical greedy output, not just close logits):
 *   q = round-half-even(x * id), id = 127 / absmax over the scale group, q in [-127, 127];
 *   OD_ACT_Q8_0 (Q4_0, Q5_0, Q8_0, IQ4_NL weights): group of 32, d = fp16(absmax / 127), s = d * sum(q);
 *   OD_ACT_Q8_1 (Q4_1, Q5_1): as q8_0, but s = fp16(absmax / 127 * sum(q)) is rounded on its own;
 *   OD_ACT_Q8_K (Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS): group of 256 (one step for 8 blocks), d = 1 / id in f32, s = d * sum(q).
 * d and s are stored per block of 32 as f32 (the rounding is done when they are computed), s being
 * what the min/offset term of q4_1-like weights needs: one multiply per block.
 * Kept as separate arrays (structure of arrays) so SIMD code loads 32 quants with one load.
 */
enum { OD_ACT_Q8_0 = 0, OD_ACT_Q8_1 = 1, OD_ACT_Q8_K = 2 };

typedef struct {
    int64_t m;        /* rows */
    int64_t k;        /* elements per row (multiple of 32) */
    int64_t nb;       /* blocks per row = k / 32 */
    int scheme;       /* OD_ACT_* */
    int8_t *qs;       /* [m][k] */
    float *ds;        /* [m][nb][2]: d, then s; adjacent so one load gets both */
} od_q8_act;

/* ---- scalar fp16 / bf16 conversion (bit exact, round to nearest even) ---- */

static inline float od_bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t od_f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float od_fp16_to_fp32(od_half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1Fu;
    const uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in float */
        const float magnitude = (float)mantissa * (1.0f / 16777216.0f);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return od_bits_to_f32(sign | 0x7F800000u | (mantissa << 13));
    return od_bits_to_f32(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline od_half od_fp32_to_fp16(float f) {
    const uint32_t bits = od_f32_to_bits(f);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t abs_bits = bits & 0x7FFFFFFFu;
    if (abs_bits > 0x7F800000u) return (od_half)(sign | 0x7E00u); /* NaN */
    if (abs_bits >= 0x47800000u) return (od_half)(sign | 0x7C00u); /* overflow to inf */
    if (abs_bits < 0x38800000u) {
        /* result is subnormal or zero: scale so that the fp16 ulp (2^-24) becomes 1 and round */
        const float scaled = od_bits_to_f32(abs_bits) * 16777216.0f;
        /* adding 2^23 makes the float's rounding do round-half-even to an integer */
        const float rounded = (scaled + 8388608.0f) - 8388608.0f;
        return (od_half)(sign | (uint32_t)rounded);
    }
    /* normal: drop 13 mantissa bits with round to nearest even, rebias exponent */
    const uint32_t round_bit = (abs_bits >> 13) & 1u;
    const uint32_t biased = abs_bits + 0xFFFu + round_bit;
    return (od_half)(sign | ((biased - 0x38000000u) >> 13));
}

static inline float od_bf16_to_fp32(od_bf16 h) {
    return od_bits_to_f32((uint32_t)h << 16);
}

static inline uint16_t od_read_u16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t od_read_u32(const void *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K scale/min unpacking for sub-block j (0..7), ggml's get_scale_min_k4. */
static inline void od_q4k_scale_min(int j, const uint8_t *packed, uint8_t *scale, uint8_t *min) {
    if (j < 4) {
        *scale = packed[j] & 63;
        *min = packed[j + 4] & 63;
    } else {
        *scale = (uint8_t)((packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4));
        *min = (uint8_t)((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4));
    }
}

/* Q3_K: the 16 signed sub-block scales (sc - 32, -32..31), four at a time in 32-bit words as ggml does. */
static inline void od_q3k_scales(const uint8_t *packed, int8_t *out) {
    const uint32_t low4 = 0x0F0F0F0Fu, top2 = 0x03030303u;
    const uint32_t a0 = od_read_u32(packed), a1 = od_read_u32(packed + 4), tops = od_read_u32(packed + 8);
    const uint32_t words[4] = {(a0 & low4) | ((tops & top2) << 4), (a1 & low4) | (((tops >> 2) & top2) << 4),
                               ((a0 >> 4) & low4) | (((tops >> 4) & top2) << 4),
                               ((a1 >> 4) & low4) | (((tops >> 6) & top2) << 4)};
    uint8_t raw[16];
    memcpy(raw, words, 16);
    for (int j = 0; j < 16; j++) out[j] = (int8_t)(raw[j] - 32);
}

/* IQ4_XS block b's signed scale ls - 32 (-32..31). */
static inline int od_iq4_xs_scale(const block_iq4_xs *blk, int b) {
    const uint16_t high = od_read_u16(&blk->scales_h);
    return (((blk->scales_l[b / 2] >> (4 * (b % 2))) & 0x0F) | (((high >> (2 * b)) & 3) << 4)) - 32;
}

#endif /* ONDEVICE_BLOCKS_H */
