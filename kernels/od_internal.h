/*
 * Internal interface between the drivers (dispatch.c), the thread pool and the per-ISA kernels
 * (*_scalar.c, *_avx2.c, *_neon.c). Not installed, not part of the public API.
 */
#ifndef ONDEVICE_INTERNAL_H
#define ONDEVICE_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "blocks.h"
#include "ondevice_kernels.h"

#define OD_MAX_TYPE_ID 37
_Static_assert(OD_X8_ROWS == OD_REPACK_ROWS && OD_TYPE_Q4_0_X8 == OD_REPACK_Q4_0_X8 && OD_TYPE_Q4_K_X8 == OD_REPACK_Q4_K_X8 &&
                   OD_TYPE_Q4_1_X8 == OD_REPACK_Q4_1_X8 && OD_TYPE_Q8_0_X8 == OD_REPACK_Q8_0_X8 &&
                   OD_TYPE_Q6_K_X8 == OD_REPACK_Q6_K_X8,
               "repack ids agree");

#if defined(__GNUC__)
#define OD_INLINE static inline __attribute__((always_inline))
#define OD_RESTRICT __restrict__
#else
#define OD_INLINE static inline
#define OD_RESTRICT
#endif

/* ---------------------------------------------------------------- matmul */

typedef struct {
    float *out;            /* [m][ldo] */
    int64_t ldo;
    const uint8_t *w;      /* [n][row_bytes] */
    size_t row_bytes;
    int wtype;
    int64_t m, n, k;
    const od_q8_act *act;  /* quantized activations (quantized weight types) */
    const float *x;        /* f32 activations [m][k] (F32/F16/BF16 weights) */
    int accumulate;        /* out += instead of out = */
} od_mm_args;

/* Computes out[0..m)[n0..n1). Called concurrently from several threads on disjoint n ranges. */
typedef void (*od_mm_fn)(const od_mm_args *args, int64_t n0, int64_t n1);

/* Blocks of 32 that share one activation step under act->scheme (8 for q8_K rows of 256). */
static inline int64_t od_act_group_blocks(const od_q8_act *act) {
    return act->scheme == OD_ACT_Q8_K && act->k % 256 == 0 ? 8 : 1;
}

static inline float od_act_inverse_step(float amax) { return amax != 0.0f ? 127.0f / amax : 0.0f; }

/* d and s of one block of 32 with integer sum `sum`, in a group of absolute maximum amax. */
static inline void od_act_block_scales(int scheme, float amax, float id, int sum, float *ds) {
    if (scheme == OD_ACT_Q8_K) {
        ds[0] = id != 0.0f ? 1.0f / id : 0.0f;
        ds[1] = ds[0] * (float)sum;
        return;
    }
    const float d = amax / 127.0f;
    ds[0] = od_fp16_to_fp32(od_fp32_to_fp16(d));
    ds[1] = scheme == OD_ACT_Q8_1 ? od_fp16_to_fp32(od_fp32_to_fp16(d * (float)sum)) : ds[0] * (float)sum;
}

/*
 * With an fp16 KV cache, attention follows llama.cpp's CPU graph (f16 K/V, no flash attention): the
 * query is rounded to fp16 before q.k (done once in od_attention) and the normalized probabilities are
 * rounded to fp16 before P.V. Called after the exps: scores[0..n) hold exp(s - max), total their sum;
 * returns the factor the P.V sums still need (1/total for f32 caches, where normalizing last is exact-er).
 */
static inline float od_attn_probabilities(float *scores, int64_t n, float total, int kv_f16) {
    const float inv = 1.0f / total;
    if (!kv_f16) return inv;
    for (int64_t t = 0; t < n; t++) scores[t] = od_fp16_to_fp32(od_fp32_to_fp16(scores[t] * inv));
    return 1.0f;
}

/* scores[0..n) = exp(scores - max) in place; returns their sum (the scalar softmax numerators), and the max in
 * *max_out when not NULL */
static inline float od_softmax_numerators_scalar(float *scores, int64_t n, float *max_out) {
    float maxv = -INFINITY, total = 0.0f;
    for (int64_t t = 0; t < n; t++) maxv = scores[t] > maxv ? scores[t] : maxv;
    for (int64_t t = 0; t < n; t++) {
        scores[t] = expf(scores[t] - maxv);
        total += scores[t];
    }
    if (max_out) *max_out = maxv;
    return total;
}

/* The row loop shared by every ISA's activation quantizer; block_amax and quantize_block are the ISA's
 * vector code (inlined: they are constants at every call site). quantize_block returns the codes' sum. */
OD_INLINE void od_quantize_act_rows(const float *x, od_q8_act *act, int64_t m0, int64_t m1,
                                    float (*block_amax)(const float *xb),
                                    int (*quantize_block)(const float *xb, float id, int8_t *qb)) {
    const int64_t k = act->k, nb = act->nb, group = od_act_group_blocks(act);
    for (int64_t r = m0; r < m1; r++) {
        for (int64_t g0 = 0; g0 < nb; g0 += group) {
            float amax = 0.0f;
            for (int64_t b = g0; b < g0 + group; b++) {
                const float a = block_amax(x + r * k + b * OD_QK);
                amax = a > amax ? a : amax;
            }
            const float id = od_act_inverse_step(amax);
            for (int64_t b = g0; b < g0 + group; b++) {
                const int sum = quantize_block(x + r * k + b * OD_QK, id, act->qs + r * k + b * OD_QK);
                od_act_block_scales(act->scheme, amax, id, sum, act->ds + (r * nb + b) * 2);
            }
        }
    }
}

/* Quantizes rows [m0, m1) of x[m][k] into act (arrays already sized for all rows). */
typedef void (*od_quantize_act_fn)(const float *x, od_q8_act *act, int64_t m0, int64_t m1);

/* Dequantizes one row of k weights to f32. */
typedef void (*od_dequant_row_fn)(const uint8_t *row, float *out, int64_t k);

/* GELU with the tanh approximation, as x * sigmoid(2u): 0.5 x (1 + tanh u) = x / (1 + exp(-2u)),
 * u = sqrt(2/pi) (x + 0.044715 x^3). These are the constants of -2u = x * (A + B x^2). */
#define OD_GELU_A (-1.5957691216057308f) /* -2 sqrt(2/pi) */
#define OD_GELU_B (-0.0713548162726009f) /* -2 sqrt(2/pi) 0.044715 */

/* ---------------------------------------------------------------- attention */

typedef struct {
    float *out;            /* [m][h*d] */
    const float *q;        /* [m][h][d] */
    const void *k_cache;   /* [hkv][c][d] f32, f16 or rows of d/32 block_q8_0 */
    const void *v_cache;
    int kv_f16;
    int64_t m, h, hkv, c, d, pos0;
    float scale;
    /* Q8_0 kernels, when not NULL: lse[(row * h + head) * 2] = the row's score maximum, [.. + 1] = its sum of
     * exp(score - maximum), so outputs over disjoint key ranges can be combined (od_attention_grouped's split). */
    float *lse;
} od_attn_args;

/* Computes the output of query head `head` for query rows [r0, r1). scratch holds at least
 * od_attn_scratch_floats(args, r1 - r0) floats, 64-byte aligned. */
typedef void (*od_attn_fn)(const od_attn_args *args, int64_t head, int64_t r0, int64_t r1, float *scratch);

/* Attention by KV head (attention.c drives it; every Q8_0 cache, and f16/f32 where the ISA table has
 * attention_group). A task computes query heads kvh*group + g, g in [g0, g1), for query rows [r0, r1): at most
 * OD_ATTN_GROUP_ROWS (head, row) pairs, which share every K/V row they load (dequantize).
 * scratch holds od_attn_group_scratch_floats(args, (g1 - g0) * (r1 - r0)) floats, 64-byte aligned. */
#define OD_ATTN_GROUP_ROWS 8
typedef void (*od_attn_group_fn)(const od_attn_args *args, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                              float *scratch);
size_t od_attn_group_scratch_floats(const od_attn_args *args, int64_t pairs);
/* Pair v of such a task: its query row, output row, number of keys and lse entry (pairs run head-fastest). */
static inline void od_attn_group_pair(const od_attn_args *a, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t v,
                                   const float **q, float **out, int64_t *n_keys, float **lse) {
    const int64_t ng = g1 - g0, row = r0 + v / ng, head = kvh * (a->h / a->hkv) + g0 + v % ng;
    *q = a->q + (row * a->h + head) * a->d;
    *out = a->out + row * a->h * a->d + head * a->d;
    *n_keys = a->pos0 + row + 1;
    *lse = a->lse ? a->lse + (row * a->h + head) * 2 : NULL;
}
/* kv_type: OD_KV_*; f16/f32 caches without a grouped kernel in the ISA table run `attention` head by head. */
int od_attention_grouped(const od_attn_args *args, int kv_type);
void od_attention_q8_scalar(const od_attn_args *args, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                            float *scratch);

/* ---------------------------------------------------------------- the per-ISA table */

/* An asymmetric scale search of llama.cpp's make_qkx2/qkx3_quants (no MAD): codes 0..nmax, the candidate
 * iscale (rmin + rdelta * step + nmax) / (max - min) for step 0..nstep. */
typedef struct {
    int nmax;
    float rmin, rdelta;
    int nstep;
} od_k_search;

typedef struct {
    const char *name;
    od_quantize_act_fn quantize_act;
    od_mm_fn matmul[OD_MAX_TYPE_ID];            /* NULL: type unsupported */
    od_dequant_row_fn dequant_row[OD_MAX_TYPE_ID];
    void (*rmsnorm_row)(float *out, const float *x, const float *weight, int64_t k, float eps);
    /* Rotates one row of h heads of d dims; cs holds d/2 cosines then d/2 sines. */
    void (*rope_row)(float *x, int64_t h, int64_t d, const float *cs, int neox);
    od_attn_fn attention;
    od_attn_group_fn attention_group; /* f16/f32 caches by KV head; NULL: `attention` per head */
    void (*silu_mul)(float *out, const float *gate, const float *up, int64_t n);
    void (*gelu_mul)(float *out, const float *gate, const float *up, int64_t n);
    void (*add)(float *x, const float *y, int64_t n);
    /* Scale searches of the weight quantizers (quantize.c), NULL: the scalar ones. Q4_K/Q5_K: the 8 sub-blocks of
     * a super-block under search p, x and w [256], codes L [256], scales and negated mins [8]; Q6_K: x [256], error
     * weights qw [256] or NULL (x^2), L [256], scales [16]. */
    void (*k_min_search)(const float *x, const float *w, const od_k_search *p, uint8_t *L, float *scales,
                         float *neg_mins);
    void (*q6_k_search)(const float *x, const float *qw, uint8_t *L, float *scales);
} od_isa_ops;

extern const od_isa_ops od_ops_scalar;
#if defined(__x86_64__) || defined(_M_X64)
extern const od_isa_ops od_ops_avx2;
/* element-wise AVX2 kernels (ops_avx2.c), collected into od_ops_avx2 by quant_avx2.c */
void od_rmsnorm_row_avx2(float *out, const float *x, const float *weight, int64_t k, float eps);
void od_rope_row_avx2(float *x, int64_t h, int64_t d, const float *cs, int neox);
void od_attention_avx2(const od_attn_args *args, int64_t head, int64_t r0, int64_t r1, float *scratch);
void od_attention_q8_avx2(const od_attn_args *args, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                          float *scratch);
void od_attention_group_avx2(const od_attn_args *args, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                             float *scratch);
void od_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n);
void od_gelu_mul_avx2(float *out, const float *gate, const float *up, int64_t n);
void od_add_avx2(float *x, const float *y, int64_t n);
void od_k_min_search_avx2(const float *x, const float *w, const od_k_search *p, uint8_t *L, float *scales,
                          float *neg_mins);
void od_q6_k_search_avx2(const float *x, const float *qw, uint8_t *L, float *scales);
#endif
#if defined(__aarch64__)
extern const od_isa_ops od_ops_neon;         /* plain ARMv8 NEON */
extern const od_isa_ops od_ops_neon_dotprod; /* with the dot-product extension */
void od_rmsnorm_row_neon(float *out, const float *x, const float *weight, int64_t k, float eps);
void od_rope_row_neon(float *x, int64_t h, int64_t d, const float *cs, int neox);
void od_attention_neon(const od_attn_args *args, int64_t head, int64_t r0, int64_t r1, float *scratch);
void od_attention_q8_neon(const od_attn_args *args, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                          float *scratch);
void od_silu_mul_neon(float *out, const float *gate, const float *up, int64_t n);
void od_gelu_mul_neon(float *out, const float *gate, const float *up, int64_t n);
void od_add_neon(float *x, const float *y, int64_t n);
#endif

#if defined(__x86_64__) || defined(_M_X64)
/* The AVX-512 VNNI table (quant_avx512.c): od_ops_avx2 with the repacked types' kernels on the dot-product
 * instructions. */
const od_isa_ops *od_ops_avx512(void);
#endif
/* A repacked type multiplied by unpacking each group of 8 rows and running the current table's kernel for its
 * GGML type (a code path without a kernel for the repacked type, or one that has only the matrix-vector one). */
void od_matmul_x8_by_unpacking(const od_mm_args *a, int64_t n0, int64_t n1);
/* The GGML type a repacked type was made from, or 0 if `type` is not a repacked one. */
int od_x8_base_type(int type);

/* Currently selected table (set by dispatch.c). */
const od_isa_ops *od_ops(void);

/* ---------------------------------------------------------------- helpers shared by the kernels */

/* Thread-local scratch buffer, 64-byte aligned, grown on demand; slot 0 is used by drivers for
 * the whole call, slot 1 by tasks (kernels). Returns NULL on allocation failure. */
void *od_scratch(int slot, size_t bytes);

/* Scratch floats an attention task needs for `rows` query rows. */
size_t od_attn_scratch_floats(const od_attn_args *args, int64_t rows);

/* Scalar reference pieces reused by the SIMD tables for the less common types. */
void od_quantize_act_scalar(const float *x, od_q8_act *act, int64_t m0, int64_t m1);
void od_dequant_f32_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_f16_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_bf16_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q4_0_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q4_1_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q5_0_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q5_1_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q8_0_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q4_k_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q5_k_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q3_k_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_iq4_nl_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_iq4_xs_scalar(const uint8_t *row, float *out, int64_t k);
void od_dequant_q6_k_scalar(const uint8_t *row, float *out, int64_t k);
int od_cpu_has_dotprod(void);

/* ---------------------------------------------------------------- thread pool */

/* Runs task(ctx, i) for i in [0, n_tasks) on the pool (the caller participates) and returns when
 * all are done. Falls back to the calling thread alone when the pool is busy or has 1 thread. */
typedef void (*od_task_fn)(void *ctx, int64_t task);
void od_pool_run(od_task_fn task, void *ctx, int64_t n_tasks);
int od_pool_threads(void);
void od_pool_set_threads(int n);
int od_detect_physical_cores(void);

#endif /* ONDEVICE_INTERNAL_H */
