/*
 * Attention's driver, and the Q8_0 KV cache: quantization on write (od_kv_store_q8_0) and the scalar reference
 * kernel on it. The SIMD kernels are in ops_avx2.c / ops_neon.c (they share the vector exp). Each cached Q8_0 row
 * of D values is D/32 ggml Q8_0 blocks, so a position costs 34/32 bytes a value against 2 for f16, and a block is
 * what llama.cpp's `--cache-type-k q8_0` keeps.
 *
 * A task takes the query heads that read one KV head (the GQA group): every K/V row is loaded (dequantized) once
 * for the whole group. ISAs without a grouped f16/f32 kernel run their per-head one over the group.
 */
#if defined(__linux__)
#define _GNU_SOURCE
#endif

#include <math.h>
#include <string.h>

#include "od_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------ quantization on write */

/* ggml's quantize_row_q8_0_ref for one block: d = amax / 127, q = round-half-away(x / d) (as x * (1/d)). */
static void quantize_block_q8_0_scalar(const float *x, block_q8_0 *y) {
    float amax = 0.0f;
    for (int j = 0; j < OD_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = od_fp32_to_fp16(d);
    for (int j = 0; j < OD_QK; j++) y->qs[j] = (int8_t)roundf(x[j] * id);
}

#if defined(__x86_64__) || defined(_M_X64)
/* The same bytes with AVX2: roundf's half-away-from-zero is trunc(v) + sign where |v - trunc(v)| >= 0.5
 * (v - trunc(v) is exact), not the ties-to-even of _mm256_round_ps. */
__attribute__((target("avx2,fma,f16c"))) static void quantize_block_q8_0_avx2(const float *x, block_q8_0 *y) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4], amax8 = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v[k], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = od_fp32_to_fp16(d);
    const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 sign_mask = _mm256_set1_ps(-0.0f);
    __m256i q[4];
    for (int k = 0; k < 4; k++) {
        const __m256 s = _mm256_mul_ps(v[k], vid);
        const __m256 whole = _mm256_round_ps(s, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __m256 away = _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(s, whole), abs_mask), half,
                                                        _CMP_GE_OQ), one);
        q[k] = _mm256_cvttps_epi32(_mm256_add_ps(whole, _mm256_or_ps(away, _mm256_and_ps(s, sign_mask))));
    }
    /* int32 -> int8 with the lane order packs interleave per 128-bit half, undone by the permute */
    const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b = _mm256_packs_epi16(w01, w23);
    const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)y->qs, ordered);
}
#endif

int od_kv_store_q8_0(void *cache, const float *rows, int64_t m, int64_t hkv, int64_t c, int64_t d, int64_t pos0) {
    if (m < 0 || hkv <= 0 || c <= 0 || d <= 0 || d % OD_QK != 0 || pos0 < 0 || pos0 + m > c) return OD_EINVAL;
    void (*quantize_block)(const float *, block_q8_0 *) = quantize_block_q8_0_scalar;
#if defined(__x86_64__) || defined(_M_X64)
    if (strcmp(od_ops()->name, "scalar") != 0) quantize_block = quantize_block_q8_0_avx2; /* avx2 or avx512 */
#endif
    const int64_t nb = d / OD_QK;
    for (int64_t i = 0; i < m; i++)
        for (int64_t kh = 0; kh < hkv; kh++) {
            const float *x = rows + (i * hkv + kh) * d;
            block_q8_0 *y = (block_q8_0 *)cache + (kh * c + pos0 + i) * nb;
            for (int64_t b = 0; b < nb; b++) quantize_block(x + b * OD_QK, y + b);
        }
    return OD_OK;
}

/* ------------------------------------------------------------------ attention: scalar reference */

size_t od_attn_group_scratch_floats(const od_attn_args *a, int64_t pairs) {
    /* scores and an output accumulator per (head, row) pair, plus 8 dequantized keys; padded for SIMD */
    return (size_t)pairs * (size_t)(a->c + a->d + 16) + 8 * (size_t)a->d + 64;
}

/* k . q with k = d_b * q_b per block: the per-block sums are scaled, as the SIMD kernels do. */
void od_attention_q8_scalar(const od_attn_args *a, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                            float *scratch) {
    const int64_t d = a->d, nb = d / OD_QK;
    const block_q8_0 *kc = (const block_q8_0 *)a->k_cache + kvh * a->c * nb;
    const block_q8_0 *vc = (const block_q8_0 *)a->v_cache + kvh * a->c * nb;
    float *scores = scratch;
    for (int64_t v = 0; v < (g1 - g0) * (r1 - r0); v++) {
        const float *qr;
        float *o, *lse;
        int64_t n_keys;
        od_attn_group_pair(a, kvh, g0, g1, r0, v, &qr, &o, &n_keys, &lse);
        for (int64_t t = 0; t < n_keys; t++) {
            float dot = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const block_q8_0 *blk = kc + t * nb + b;
                float s = 0.0f;
                for (int i = 0; i < OD_QK; i++) s += qr[b * OD_QK + i] * (float)blk->qs[i];
                dot += od_fp16_to_fp32(blk->d) * s;
            }
            scores[t] = dot * a->scale;
        }
        float maxv;
        const float total = od_softmax_numerators_scalar(scores, n_keys, &maxv), inv = 1.0f / total;
        if (lse) lse[0] = maxv, lse[1] = total;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t t = 0; t < n_keys; t++)
            for (int64_t b = 0; b < nb; b++) {
                const block_q8_0 *blk = vc + t * nb + b;
                const float ps = scores[t] * od_fp16_to_fp32(blk->d);
                for (int i = 0; i < OD_QK; i++) o[b * OD_QK + i] += ps * (float)blk->qs[i];
            }
        for (int64_t i = 0; i < d; i++) o[i] *= inv;
    }
}

/* ------------------------------------------------------------------ attention: driver */

static od_attn_group_fn q8_kernel(void) {
    const char *isa = od_ops()->name;
    if (strcmp(isa, "scalar") == 0) return od_attention_q8_scalar;
#if defined(__x86_64__) || defined(_M_X64)
    return od_attention_q8_avx2; /* the AVX-512 table keeps the AVX2 attention too */
#elif defined(__aarch64__)
    return od_attention_q8_neon;
#else
    return od_attention_q8_scalar;
#endif
}

/* f16/f32 caches on an ISA without a grouped kernel: the table's per-head one, head by head (its scratch,
 * od_attn_scratch_floats(args, r1 - r0), is no larger than the grouped one's). */
static void heads_one_by_one(const od_attn_args *args, int64_t kvh, int64_t g0, int64_t g1, int64_t r0, int64_t r1,
                             float *scratch) {
    const int64_t group = args->h / args->hkv;
    for (int64_t g = g0; g < g1; g++) od_ops()->attention(args, kvh * group + g, r0, r1, scratch);
}

static od_attn_group_fn group_kernel(const od_attn_args *args, int kv_type) {
    if (kv_type == OD_KV_Q8_0) return q8_kernel();
    if (od_ops()->attention_group && args->d % 8 == 0) return od_ops()->attention_group;
    return heads_one_by_one;
}

/* A decode step (one query row) with many keys is split into key ranges, each a task per KV head, combined by
 * their score maxima and sums: with few KV heads (SmolLM2: 3 on 2 threads) whole heads would leave threads idle,
 * and splitting a head's query group instead would dequantize its K/V once per part. */
#define Q8_SPLIT_MIN_KEYS 256
#define Q8_MAX_SPLITS 16

typedef struct {
    od_attn_args split[Q8_MAX_SPLITS]; /* the arguments of each key range (all of them when not split) */
    od_attn_group_fn fn;
    int64_t n_splits, group, head_chunk, n_head_chunks, row_block, n_row_blocks;
} attn_job;

static void attn_task(void *ctx, int64_t t) {
    const attn_job *job = ctx;
    const od_attn_args *args = &job->split[t % job->n_splits];
    t /= job->n_splits;
    const int64_t kvh = t % args->hkv, rest = t / args->hkv;
    const int64_t g0 = (rest % job->n_head_chunks) * job->head_chunk;
    const int64_t g1 = g0 + job->head_chunk < job->group ? g0 + job->head_chunk : job->group;
    /* later rows attend to more keys: hand them out first for better balance */
    const int64_t r0 = (job->n_row_blocks - 1 - rest / job->n_head_chunks) * job->row_block;
    const int64_t r1 = r0 + job->row_block < args->m ? r0 + job->row_block : args->m;
    float *scratch = od_scratch(1, od_attn_group_scratch_floats(args, (g1 - g0) * (r1 - r0)) * sizeof(float));
    if (!scratch) return;
    job->fn(args, kvh, g0, g1, r0, r1, scratch);
}

#define ATTN_MIN_PARALLEL_MACS (1 << 16)
/* query rows of one head per task when the ISA runs attention head by head */
#define PER_HEAD_ROW_BLOCK 16

int od_attention_grouped(const od_attn_args *args, int kv_type) {
    attn_job job = {.fn = group_kernel(args, kv_type), .group = args->h / args->hkv, .n_splits = 1};
    const int threads = od_pool_threads();
    const int64_t h = args->h, d = args->d, n_keys = args->pos0 + 1;
    float *parts = NULL;
    /* (f16/f32 caches are not split: their outputs keep the bits of llama.cpp's order of operations) */
    if (kv_type == OD_KV_Q8_0 && args->m == 1 && threads > 1 && n_keys >= 2 * Q8_SPLIT_MIN_KEYS &&
        args->hkv < 2 * threads) {
        job.n_splits = (2 * threads + args->hkv - 1) / args->hkv;
        if (job.n_splits > n_keys / Q8_SPLIT_MIN_KEYS) job.n_splits = n_keys / Q8_SPLIT_MIN_KEYS;
        if (job.n_splits > Q8_MAX_SPLITS) job.n_splits = Q8_MAX_SPLITS;
    }
    if (job.n_splits > 1) {
        /* per split: h*d outputs, then h (max, sum) pairs */
        parts = od_scratch(0, (size_t)job.n_splits * (size_t)(h * d + 2 * h) * sizeof(float));
        if (!parts) return OD_ENOMEM;
        const size_t row_bytes = (size_t)(d / OD_QK) * sizeof(block_q8_0);
        for (int64_t s = 0; s < job.n_splits; s++) {
            const int64_t t0 = n_keys * s / job.n_splits, t1 = n_keys * (s + 1) / job.n_splits;
            od_attn_args *part = &job.split[s];
            *part = *args;
            /* keys t0..t1-1 are the whole causal range of a row at position t1-t0-1 of the cache advanced by t0
             * rows (the head stride c*d is unchanged) */
            part->k_cache = (const char *)args->k_cache + (size_t)t0 * row_bytes;
            part->v_cache = (const char *)args->v_cache + (size_t)t0 * row_bytes;
            part->pos0 = t1 - t0 - 1;
            part->out = parts + s * (h * d + 2 * h);
            part->lse = part->out + h * d;
        }
    } else {
        job.split[0] = *args;
    }
    /* heads of a group per task: all of them (up to 8); with one row, fewer if that leaves threads idle */
    int64_t chunks = (job.group + OD_ATTN_GROUP_ROWS - 1) / OD_ATTN_GROUP_ROWS;
    while (args->m == 1 && threads > 1 && args->hkv * job.n_splits * chunks < 2 * threads && chunks < job.group)
        chunks++;
    if (job.fn == heads_one_by_one) {
        /* the per-head kernels share K/V across the rows of a head instead */
        job.head_chunk = 1;
        job.row_block = PER_HEAD_ROW_BLOCK;
    } else {
        job.head_chunk = (job.group + chunks - 1) / chunks;
        job.row_block = OD_ATTN_GROUP_ROWS / job.head_chunk;
    }
    job.n_head_chunks = (job.group + job.head_chunk - 1) / job.head_chunk;
    if (job.row_block > args->m) job.row_block = args->m;
    job.n_row_blocks = (args->m + job.row_block - 1) / job.row_block;
    const int64_t n_tasks = job.n_splits * args->hkv * job.n_head_chunks * job.n_row_blocks;
    const int64_t work = h * d * (args->pos0 + args->m) * args->m;
    if (threads > 1 && work >= ATTN_MIN_PARALLEL_MACS) {
        od_pool_run(attn_task, &job, n_tasks);
    } else {
        for (int64_t t = 0; t < n_tasks; t++) attn_task(&job, t);
    }
    if (job.n_splits > 1) {
        /* out = sum_s w_s o_s, w_s = exp(max_s - max) sum_s / sum over s of the same */
        for (int64_t head = 0; head < h; head++) {
            float maxv = -INFINITY, weights[Q8_MAX_SPLITS], total = 0.0f;
            for (int64_t s = 0; s < job.n_splits; s++) {
                const float m_s = job.split[s].lse[head * 2];
                maxv = m_s > maxv ? m_s : maxv;
            }
            for (int64_t s = 0; s < job.n_splits; s++) {
                weights[s] = expf(job.split[s].lse[head * 2] - maxv) * job.split[s].lse[head * 2 + 1];
                total += weights[s];
            }
            float *o = args->out + head * d;
            for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
            for (int64_t s = 0; s < job.n_splits; s++) {
                const float w = weights[s] / total, *o_s = job.split[s].out + head * d;
                for (int64_t i = 0; i < d; i++) o[i] += w * o_s[i];
            }
        }
    }
    return OD_OK;
}
