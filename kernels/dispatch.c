/*
 * Public entry points: argument checks, run-time ISA selection, work splitting over the thread
 * pool, and the per-thread scratch memory. The arithmetic lives in the per-ISA files.
 */
#if defined(__linux__)
#define _GNU_SOURCE
#endif

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "od_internal.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

/* ------------------------------------------------------------------ CPU features and ISA choice */

static int cpu_has_avx2_fma_f16c(void) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int cpu_has_avx512_vnni(void) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    return cpu_has_avx2_fma_f16c() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

int od_cpu_has_dotprod(void) {
#if defined(__aarch64__) && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__aarch64__) && defined(__APPLE__)
    return 1; /* every Apple arm64 core has the dot-product instructions */
#else
    return 0;
#endif
}

static const od_isa_ops *ops_by_name(const char *name) {
    if (!name) return NULL;
    if (strcmp(name, "scalar") == 0) return &od_ops_scalar;
#if defined(__x86_64__) || defined(_M_X64)
    if (strcmp(name, "avx2") == 0) return cpu_has_avx2_fma_f16c() ? &od_ops_avx2 : NULL;
    if (strcmp(name, "avx512") == 0) return cpu_has_avx512_vnni() ? od_ops_avx512() : NULL;
#endif
#if defined(__aarch64__)
    /* "neon" uses the dot-product instructions when the CPU has them; "neon-nodotprod" is a test
     * hook forcing the plain ARMv8 path */
    if (strcmp(name, "neon") == 0) return od_cpu_has_dotprod() ? &od_ops_neon_dotprod : &od_ops_neon;
    if (strcmp(name, "neon-nodotprod") == 0) return &od_ops_neon;
#endif
    return NULL;
}

static const od_isa_ops *best_ops(void) {
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx512_vnni()) return od_ops_avx512();
    if (cpu_has_avx2_fma_f16c()) return &od_ops_avx2;
#endif
#if defined(__aarch64__)
    return od_cpu_has_dotprod() ? &od_ops_neon_dotprod : &od_ops_neon;
#endif
    return &od_ops_scalar;
}

static _Atomic(const od_isa_ops *) g_ops = NULL;

const od_isa_ops *od_ops(void) {
    const od_isa_ops *ops = atomic_load_explicit(&g_ops, memory_order_acquire);
    if (ops) return ops;
    const od_isa_ops *chosen = NULL;
    const char *env = getenv("ONDEVICE_ISA");
    if (env && *env) chosen = ops_by_name(env); /* an unavailable request falls back to the best */
    if (!chosen) chosen = best_ops();
    atomic_store_explicit(&g_ops, chosen, memory_order_release);
    return chosen;
}

const char *od_isa(void) { return od_ops()->name; }

int od_set_isa(const char *name) {
    const od_isa_ops *ops = ops_by_name(name);
    if (!ops) return OD_EISA;
    atomic_store_explicit(&g_ops, ops, memory_order_release);
    return OD_OK;
}

static char g_features[160];
static pthread_once_t g_features_once = PTHREAD_ONCE_INIT;

static void append_feature(const char *name) {
    if (g_features[0]) strncat(g_features, " ", sizeof(g_features) - strlen(g_features) - 1);
    strncat(g_features, name, sizeof(g_features) - strlen(g_features) - 1);
}

static void detect_features(void) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) append_feature("sse4.2");
    if (__builtin_cpu_supports("avx")) append_feature("avx");
    if (__builtin_cpu_supports("avx2")) append_feature("avx2");
    if (__builtin_cpu_supports("fma")) append_feature("fma");
    if (__builtin_cpu_supports("f16c")) append_feature("f16c");
    if (__builtin_cpu_supports("avx512f")) append_feature("avx512f");
    if (__builtin_cpu_supports("avx512bw")) append_feature("avx512bw");
    if (__builtin_cpu_supports("avx512vl")) append_feature("avx512vl");
    if (__builtin_cpu_supports("avx512vnni")) append_feature("avx512vnni");
#endif
#if defined(__aarch64__)
    append_feature("neon");
    if (od_cpu_has_dotprod()) append_feature("dotprod");
#endif
}

const char *od_cpu_features(void) {
    pthread_once(&g_features_once, detect_features);
    return g_features;
}

/* ------------------------------------------------------------------ scratch memory */

typedef struct {
    void *ptr[2];
    size_t cap[2];
} scratch_slots;

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *arg) {
    scratch_slots *s = arg;
    free(s->ptr[0]);
    free(s->ptr[1]);
    free(s);
}

static void scratch_key_init(void) { pthread_key_create(&g_scratch_key, scratch_free); }

void *od_scratch(int slot, size_t bytes) {
    pthread_once(&g_scratch_once, scratch_key_init);
    scratch_slots *s = pthread_getspecific(g_scratch_key);
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s || pthread_setspecific(g_scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (bytes <= s->cap[slot]) return s->ptr[slot];
    size_t cap = s->cap[slot] ? s->cap[slot] : 4096;
    while (cap < bytes) cap *= 2;
    void *p = NULL;
    if (posix_memalign(&p, 64, cap + 64) != 0) return NULL; /* +64: SIMD tails may over-read */
    free(s->ptr[slot]);
    s->ptr[slot] = p;
    s->cap[slot] = cap;
    return p;
}

/* ------------------------------------------------------------------ types */

typedef struct {
    int block_elems;
    int block_bytes;
    const char *name;
} type_info;

static type_info get_type_info(int type) {
    switch (type) {
    case OD_TYPE_F32: return (type_info){1, 4, "F32"};
    case OD_TYPE_F16: return (type_info){1, 2, "F16"};
    case OD_TYPE_BF16: return (type_info){1, 2, "BF16"};
    case OD_TYPE_Q4_0: return (type_info){32, (int)sizeof(block_q4_0), "Q4_0"};
    case OD_TYPE_Q4_0_X8: return (type_info){32, (int)sizeof(block_q4_0), "Q4_0_X8"};
    case OD_TYPE_Q4_K_X8: return (type_info){256, OD_K_X8_SB_BYTES / OD_X8_ROWS, "Q4_K_X8"};
    case OD_TYPE_Q4_1_X8: return (type_info){32, (int)sizeof(block_q4_1), "Q4_1_X8"};
    case OD_TYPE_Q8_0_X8: return (type_info){32, (int)sizeof(block_q8_0), "Q8_0_X8"};
    case OD_TYPE_Q6_K_X8: return (type_info){256, (int)sizeof(block_q6_K), "Q6_K_X8"};
    case OD_TYPE_Q4_1: return (type_info){32, (int)sizeof(block_q4_1), "Q4_1"};
    case OD_TYPE_Q5_0: return (type_info){32, (int)sizeof(block_q5_0), "Q5_0"};
    case OD_TYPE_Q5_1: return (type_info){32, (int)sizeof(block_q5_1), "Q5_1"};
    case OD_TYPE_Q8_0: return (type_info){32, (int)sizeof(block_q8_0), "Q8_0"};
    case OD_TYPE_Q3_K: return (type_info){256, (int)sizeof(block_q3_K), "Q3_K"};
    case OD_TYPE_Q4_K: return (type_info){256, (int)sizeof(block_q4_K), "Q4_K"};
    case OD_TYPE_Q5_K: return (type_info){256, (int)sizeof(block_q5_K), "Q5_K"};
    case OD_TYPE_Q6_K: return (type_info){256, (int)sizeof(block_q6_K), "Q6_K"};
    case OD_TYPE_IQ4_NL: return (type_info){32, (int)sizeof(block_iq4_nl), "IQ4_NL"};
    case OD_TYPE_IQ4_XS: return (type_info){256, (int)sizeof(block_iq4_xs), "IQ4_XS"};
    default: return (type_info){0, 0, NULL};
    }
}

size_t od_row_nbytes(int type, int64_t k) {
    const type_info ti = get_type_info(type);
    if (!ti.block_elems || k < 0 || k % ti.block_elems != 0) return 0;
    return (size_t)(k / ti.block_elems) * (size_t)ti.block_bytes;
}

const char *od_type_name(int type) { return get_type_info(type).name; }

static int is_float_type(int type) {
    return type == OD_TYPE_F32 || type == OD_TYPE_F16 || type == OD_TYPE_BF16;
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ------------------------------------------------------------------ matmul */

typedef struct {
    od_mm_args args;
    od_mm_fn fn;
    int64_t chunk;
} mm_job;

static void mm_task(void *ctx, int64_t t) {
    const mm_job *job = ctx;
    const int64_t n0 = t * job->chunk;
    const int64_t n1 = n0 + job->chunk < job->args.n ? n0 + job->chunk : job->args.n;
    job->fn(&job->args, n0, n1);
}

typedef struct {
    const float *x;
    od_q8_act *act;
    od_quantize_act_fn fn;
    int64_t rows_per_task, m;
} quant_job;

static void quant_task(void *ctx, int64_t t) {
    const quant_job *job = ctx;
    const int64_t r0 = t * job->rows_per_task;
    const int64_t r1 = r0 + job->rows_per_task < job->m ? r0 + job->rows_per_task : job->m;
    job->fn(job->x, job->act, r0, r1);
}

/* The activation rounding llama.cpp's CPU backend pairs with each weight type (see od_q8_act). */
static int activation_scheme(int wtype) {
    switch (wtype) {
    case OD_TYPE_Q4_1:
    case OD_TYPE_Q4_1_X8:
    case OD_TYPE_Q5_1:
        return OD_ACT_Q8_1;
    case OD_TYPE_Q3_K:
    case OD_TYPE_Q4_K:
    case OD_TYPE_Q4_K_X8:
    case OD_TYPE_Q5_K:
    case OD_TYPE_Q6_K:
    case OD_TYPE_Q6_K_X8:
    case OD_TYPE_IQ4_XS:
        return OD_ACT_Q8_K;
    default:
        return OD_ACT_Q8_0;
    }
}

/* ------------------------------------------------------------------ load-time repacking */

/* Each repacked type and the GGML type it is made from. */
static const struct {
    int packed, base;
} X8_TYPES[] = {{OD_TYPE_Q4_0_X8, OD_TYPE_Q4_0}, {OD_TYPE_Q4_K_X8, OD_TYPE_Q4_K},
                {OD_TYPE_Q4_1_X8, OD_TYPE_Q4_1}, {OD_TYPE_Q8_0_X8, OD_TYPE_Q8_0},
                {OD_TYPE_Q6_K_X8, OD_TYPE_Q6_K}};
#define N_X8_TYPES ((int)(sizeof(X8_TYPES) / sizeof(X8_TYPES[0])))

int od_x8_base_type(int type) {
    for (int i = 0; i < N_X8_TYPES; i++)
        if (X8_TYPES[i].packed == type) return X8_TYPES[i].base;
    return 0;
}

int od_repack_layout(int base) {
    for (int i = 0; i < N_X8_TYPES; i++)
        if (X8_TYPES[i].base == base) return X8_TYPES[i].packed;
    return 0;
}

/* A repacked type on a code path without a kernel for it (the path was switched after the weights were
 * repacked): each group of 8 rows is unpacked and multiplied by that path's kernel for the GGML type. */
void od_matmul_x8_by_unpacking(const od_mm_args *a, int64_t n0, int64_t n1) {
    const int type = od_x8_base_type(a->wtype);
    const size_t row_bytes = od_row_nbytes(type, a->k);
    uint8_t *rows = malloc(OD_X8_ROWS * row_bytes);
    if (!rows) return;
    const od_mm_fn fn = od_ops()->matmul[type];
    for (int64_t n = n0; n < n1; n += OD_X8_ROWS) {
        od_repack(rows, a->w + (size_t)n * a->row_bytes, type, OD_X8_ROWS, a->k, 1);
        od_mm_args group = *a;
        group.w = rows;
        group.row_bytes = row_bytes;
        group.out = a->out + n;
        group.n = OD_X8_ROWS;
        group.wtype = type;
        fn(&group, 0, OD_X8_ROWS);
    }
    free(rows);
}

int od_repacked_type(int type) {
    const int packed = od_repack_layout(type);
    return packed && od_ops()->matmul[packed] ? packed : 0;
}

/* One Q4_1 block of row r <-> its place in an 8-row group's interleaved block. */
static void repack_q4_1_block(uint8_t *packed, uint8_t *blk, int r, int unpack) {
    for (int c = 0; c < 4; c++) {
        uint8_t *chunk = packed + 32 + 32 * c + 4 * r;
        if (unpack) memcpy(blk + 4 + 4 * c, chunk, 4);
        else memcpy(chunk, blk + 4 + 4 * c, 4);
    }
    if (unpack) {
        memcpy(blk, packed + 2 * r, 2);
        memcpy(blk + 2, packed + 16 + 2 * r, 2);
    } else {
        memcpy(packed + 2 * r, blk, 2);
        memcpy(packed + 16 + 2 * r, blk + 2, 2);
    }
}

/* One Q8_0 block of row r <-> its place in an 8-row group's interleaved block (codes offset by 128). */
static void repack_q8_0_block(uint8_t *packed, uint8_t *blk, int r, int unpack) {
    for (int c = 0; c < 8; c++) {
        uint8_t *chunk = packed + 16 + 32 * c + 4 * r, *codes = blk + 2 + 4 * c;
        for (int i = 0; i < 4; i++) {
            if (unpack) codes[i] = chunk[i] ^ 0x80;
            else chunk[i] = codes[i] ^ 0x80;
        }
    }
    if (unpack) memcpy(blk, packed + 2 * r, 2);
    else memcpy(packed + 2 * r, blk, 2);
}

/* One Q4_0 block of row r <-> its place in an 8-row group's interleaved block. */
static void repack_q4_0_block(uint8_t *packed, uint8_t *blk, int r, int unpack) {
    for (int c = 0; c < 4; c++) {
        uint8_t *chunk = packed + 16 + 32 * c + 4 * r;
        if (unpack) memcpy(blk + 2 + 4 * c, chunk, 4);
        else memcpy(chunk, blk + 2 + 4 * c, 4);
    }
    if (unpack) memcpy(blk, packed + 2 * r, 2);
    else memcpy(packed + 2 * r, blk, 2);
}

/* One Q4_K super-block of row r <-> its place in an 8-row group's interleaved super-block. */
static void repack_q4_k_block(uint8_t *packed, uint8_t *blk, int r, int unpack) {
    uint8_t *sc = packed + OD_K_X8_SC, *mn = packed + OD_K_X8_MN;
    block_q4_K *q = (block_q4_K *)blk;
    if (unpack) {
        memcpy(&q->d, packed + 2 * r, 2);
        memcpy(&q->dmin, packed + 16 + 2 * r, 2);
        /* the inverse of od_q4k_scale_min's bit layout (every bit of the 12 bytes is one of the 16 6-bit values) */
        for (int j = 0; j < 4; j++) {
            const int s_hi = sc[8 * (j + 4) + r], m_hi = mn[8 * (j + 4) + r];
            q->scales[j] = (uint8_t)(sc[8 * j + r] | ((s_hi >> 4) << 6));
            q->scales[j + 4] = (uint8_t)(mn[8 * j + r] | ((m_hi >> 4) << 6));
            q->scales[j + 8] = (uint8_t)((s_hi & 0x0F) | ((m_hi & 0x0F) << 4));
        }
    } else {
        memcpy(packed + 2 * r, &q->d, 2);
        memcpy(packed + 16 + 2 * r, &q->dmin, 2);
        for (int j = 0; j < 8; j++) od_q4k_scale_min(j, q->scales, &sc[8 * j + r], &mn[8 * j + r]);
    }
    for (int c = 0; c < 4; c++)
        for (int s = 0; s < 8; s++) {
            uint8_t *step = packed + OD_K_X8_CODES + (c * 8 + s) * 32 + 4 * r;
            if (unpack) memcpy(q->qs + 32 * c + 4 * s, step, 4);
            else memcpy(step, q->qs + 32 * c + 4 * s, 4);
        }
}

/* A Q6_K super-block's 256 codes (0..63) <-> its ql/qh bits (element order as od_dequant_q6_k_scalar). */
static void q6_k_codes(block_q6_K *q, uint8_t *codes, int unpack) {
    if (unpack) {
        memset(q->ql, 0, sizeof q->ql);
        memset(q->qh, 0, sizeof q->qh);
    }
    for (int e = 0; e < OD_QK_K; e++) {
        const int half = e / 128, part = (e % 128) / 32, j = e % 32;
        uint8_t *ql = &q->ql[64 * half + (part & 1) * 32 + j], *qh = &q->qh[32 * half + j];
        const int ql_shift = (part >> 1) * 4, qh_shift = 2 * part;
        if (unpack) {
            *ql |= (uint8_t)((codes[e] & 0x0F) << ql_shift);
            *qh |= (uint8_t)((codes[e] >> 4) << qh_shift);
        } else {
            codes[e] = (uint8_t)(((*ql >> ql_shift) & 0x0F) | (((*qh >> qh_shift) & 3) << 4));
        }
    }
}

/* One Q6_K super-block of row r <-> its place in an 8-row group's interleaved super-block (layout in blocks.h). */
static void repack_q6_k_block(uint8_t *packed, uint8_t *blk, int r, int unpack) {
    block_q6_K *q = (block_q6_K *)blk;
    uint8_t codes[OD_QK_K];
    if (unpack) memcpy(&q->d, packed + 2 * r, 2);
    else memcpy(packed + 2 * r, &q->d, 2);
    for (int sub = 0; sub < OD_QK_K / 16; sub++) {
        int8_t *sc = (int8_t *)packed + OD_K6_X8_SC + OD_X8_ROWS * sub + r;
        if (unpack) q->scales[sub] = *sc;
        else *sc = q->scales[sub];
    }
    if (!unpack) q6_k_codes(q, codes, 0);
    for (int c = 0; c < 4; c++) {
        uint8_t *chunk = packed + OD_K6_X8_CODES + c * OD_K6_X8_CHUNK_BYTES + 4 * r;
        uint8_t *lo = codes + 64 * c, *hi = lo + 32;  /* the chunk's elements 0-31 and 32-63 */
        for (int s = 0; s < 8; s++)
            for (int j = 0; j < 4; j++) {
                uint8_t *low = chunk + 32 * s + j, *top = chunk + 32 * (8 + s % 4) + j;
                const int i = 4 * s + j, top_shift = 4 * (s / 4);
                if (unpack) {
                    lo[i] = (uint8_t)((*low & 0x0F) | (((*top >> top_shift) & 3) << 4));
                    hi[i] = (uint8_t)((*low >> 4) | (((*top >> (top_shift + 2)) & 3) << 4));
                } else {
                    *low = (uint8_t)((lo[i] & 0x0F) | ((hi[i] & 0x0F) << 4));
                    if (s < 4) *top = 0;
                    *top |= (uint8_t)(((lo[i] >> 4) << top_shift) | ((hi[i] >> 4) << (top_shift + 2)));
                }
            }
    }
    if (unpack) q6_k_codes(q, codes, 1);
}

/* Block b of row r of an 8-row group <-> its place in the group's interleaved form. */
static void x8_block(int type, uint8_t *packed, uint8_t *blk, int r, int unpack) {
    if (type == OD_TYPE_Q4_0) repack_q4_0_block(packed, blk, r, unpack);
    else if (type == OD_TYPE_Q4_1) repack_q4_1_block(packed, blk, r, unpack);
    else if (type == OD_TYPE_Q8_0) repack_q8_0_block(packed, blk, r, unpack);
    else if (type == OD_TYPE_Q6_K) repack_q6_k_block(packed, blk, r, unpack);
    else repack_q4_k_block(packed, blk, r, unpack);
}

/* Blocks per row of k weights of a repackable GGML type. */
static int64_t x8_blocks_per_row(int type, int64_t k) {
    return type == OD_TYPE_Q4_K || type == OD_TYPE_Q6_K ? k / OD_QK_K : k / OD_QK;
}

/* Row `row` of a repacked table of the GGML type `type`, in that type's layout (row_bytes into dst). */
static void x8_extract_row(uint8_t *dst, const uint8_t *table, int type, int64_t row, int64_t k) {
    const int packed_type = od_repack_layout(type);
    const size_t row_bytes = od_row_nbytes(type, k), packed_row_bytes = od_row_nbytes(packed_type, k);
    const int64_t nblocks = x8_blocks_per_row(type, k);
    const size_t block_bytes = row_bytes / (size_t)nblocks, packed_block_bytes = packed_row_bytes / (size_t)nblocks;
    uint8_t *group = (uint8_t *)table + (size_t)(row / OD_X8_ROWS) * OD_X8_ROWS * packed_row_bytes;
    for (int64_t b = 0; b < nblocks; b++)
        x8_block(type, group + b * OD_X8_ROWS * packed_block_bytes, dst + b * block_bytes, (int)(row % OD_X8_ROWS), 1);
}

int od_repack(void *dst, const void *src, int type, int64_t n, int64_t k, int unpack) {
    const int packed_type = od_repack_layout(type);
    if (!packed_type) return OD_ETYPE;
    const size_t row_bytes = od_row_nbytes(type, k), packed_row_bytes = od_row_nbytes(packed_type, k);
    if (n <= 0 || n % OD_X8_ROWS != 0 || row_bytes == 0) return OD_EINVAL;
    const int64_t nblocks = x8_blocks_per_row(type, k);
    const size_t block_bytes = row_bytes / (size_t)nblocks, packed_block_bytes = packed_row_bytes / (size_t)nblocks;
    for (int64_t g = 0; g < n / OD_X8_ROWS; g++) {
        uint8_t *rows = (uint8_t *)(unpack ? dst : src) + (size_t)g * OD_X8_ROWS * row_bytes;
        uint8_t *group = (uint8_t *)(unpack ? src : dst) + (size_t)g * OD_X8_ROWS * packed_row_bytes;
        for (int64_t b = 0; b < nblocks; b++)
            for (int r = 0; r < OD_X8_ROWS; r++) {
                uint8_t *blk = rows + r * row_bytes + b * block_bytes, *packed = group + b * OD_X8_ROWS * packed_block_bytes;
                x8_block(type, packed, blk, r, unpack);
            }
    }
    return OD_OK;
}

/* Work below this many multiply-adds is not worth waking the pool for. */
#define OD_MIN_PARALLEL_MACS (1 << 16)
/* Rows of W per task are a multiple of this (the widest SIMD row tile). */
#define OD_ROW_ALIGN 16

int od_matmul(float *out, const void *w, int wtype, const float *x, int64_t m, int64_t n, int64_t k,
              int accumulate) {
    if (wtype < 0 || wtype >= OD_MAX_TYPE_ID) return OD_ETYPE;
    const od_isa_ops *ops = od_ops();
    const int x8_base = od_x8_base_type(wtype);
    const od_mm_fn fn = ops->matmul[wtype] ? ops->matmul[wtype] : x8_base ? od_matmul_x8_by_unpacking : NULL;
    if (!fn) return OD_ETYPE;
    if (m < 0 || n < 0 || k <= 0 || od_row_nbytes(wtype, k) == 0) return OD_EINVAL;
    if (x8_base && n % OD_X8_ROWS != 0) return OD_EINVAL;
    if (m == 0 || n == 0) return OD_OK;

    mm_job job = {.fn = fn};
    od_mm_args *a = &job.args;
    a->out = out;
    a->ldo = n;
    a->w = w;
    a->row_bytes = od_row_nbytes(wtype, k);
    a->wtype = wtype;
    a->m = m;
    a->n = n;
    a->k = k;
    a->accumulate = accumulate;

    const int threads = od_pool_threads();
    const int parallel = threads > 1 && m * n * k >= OD_MIN_PARALLEL_MACS;

    od_q8_act act;
    if (is_float_type(wtype)) {
        a->x = x;
    } else {
        const int64_t nb = k / OD_QK;
        act.m = m;
        act.k = k;
        act.nb = nb;
        act.scheme = activation_scheme(wtype);
        const size_t qs_bytes = ((size_t)(m * k) + 63) & ~(size_t)63;
        uint8_t *buf = od_scratch(0, qs_bytes + 2 * (size_t)(m * nb) * sizeof(float));
        if (!buf) return OD_ENOMEM;
        act.qs = (int8_t *)buf;
        act.ds = (float *)(buf + qs_bytes);
        quant_job qj = {.x = x, .act = &act, .fn = ops->quantize_act, .m = m};
        if (parallel && m * k >= 32768) {
            qj.rows_per_task = ceil_div(m, threads * 4);
            od_pool_run(quant_task, &qj, ceil_div(m, qj.rows_per_task));
        } else {
            ops->quantize_act(x, &act, 0, m);
        }
        a->act = &act;
    }

    if (!parallel) {
        fn(a, 0, n);
        return OD_OK;
    }
    int64_t chunk = ceil_div(n, (int64_t)threads * 4);
    chunk = ceil_div(chunk, OD_ROW_ALIGN) * OD_ROW_ALIGN;
    job.chunk = chunk;
    od_pool_run(mm_task, &job, ceil_div(n, chunk));
    return OD_OK;
}

int od_quantize_activations(int8_t *qs, float *ds, const float *x, int wtype, int64_t m, int64_t k) {
    if (wtype < 0 || wtype >= OD_MAX_TYPE_ID || is_float_type(wtype) || !od_ops()->matmul[wtype]) return OD_ETYPE;
    if (m < 0 || k <= 0 || k % OD_QK != 0) return OD_EINVAL;
    od_q8_act act = {.m = m, .k = k, .nb = k / OD_QK, .scheme = activation_scheme(wtype), .qs = qs, .ds = ds};
    od_ops()->quantize_act(x, &act, 0, m);
    return OD_OK;
}

/* ------------------------------------------------------------------ get_rows */

typedef struct {
    float *out;
    const uint8_t *table;
    size_t row_bytes;
    const int32_t *ids;
    int64_t k, rows_per_task, m;
    od_dequant_row_fn fn;
    int x8_base; /* a repacked table: rows are taken out of their group in this GGML type first */
} rows_job;

static void rows_task(void *ctx, int64_t t) {
    const rows_job *job = ctx;
    const int64_t r0 = t * job->rows_per_task;
    const int64_t r1 = r0 + job->rows_per_task < job->m ? r0 + job->rows_per_task : job->m;
    uint8_t *row = job->x8_base ? od_scratch(1, od_row_nbytes(job->x8_base, job->k)) : NULL;
    if (job->x8_base && !row) return;
    for (int64_t r = r0; r < r1; r++) {
        if (job->x8_base) x8_extract_row(row, job->table, job->x8_base, job->ids[r], job->k);
        job->fn(job->x8_base ? row : job->table + (size_t)job->ids[r] * job->row_bytes, job->out + r * job->k, job->k);
    }
}

int od_get_rows(float *out, const void *table, int ttype, int64_t n_rows, const int32_t *ids, int64_t m,
                int64_t k) {
    if (ttype < 0 || ttype >= OD_MAX_TYPE_ID) return OD_ETYPE;
    const od_isa_ops *ops = od_ops();
    const int x8_base = od_x8_base_type(ttype);
    const od_dequant_row_fn fn = ops->dequant_row[x8_base ? x8_base : ttype];
    if (!fn) return OD_ETYPE;
    if (m < 0 || k <= 0 || n_rows < 0 || od_row_nbytes(ttype, k) == 0) return OD_EINVAL;
    if (x8_base && n_rows % OD_X8_ROWS != 0) return OD_EINVAL;
    for (int64_t r = 0; r < m; r++)
        if (ids[r] < 0 || ids[r] >= n_rows) return OD_ERANGE;
    rows_job job = {.out = out, .table = table, .row_bytes = od_row_nbytes(ttype, k), .ids = ids, .k = k,
                    .m = m, .fn = fn, .x8_base = x8_base};
    const int threads = od_pool_threads();
    if (threads > 1 && m * k >= (1 << 17)) {
        job.rows_per_task = ceil_div(m, threads * 4);
        od_pool_run(rows_task, &job, ceil_div(m, job.rows_per_task));
    } else {
        job.rows_per_task = m;
        if (m > 0) rows_task(&job, 0);
    }
    return OD_OK;
}

/* ------------------------------------------------------------------ rmsnorm */

typedef struct {
    float *out;
    const float *x, *weight;
    int64_t k, rows_per_task, m;
    float eps;
    void (*fn)(float *, const float *, const float *, int64_t, float);
} norm_job;

static void norm_task(void *ctx, int64_t t) {
    const norm_job *job = ctx;
    const int64_t r0 = t * job->rows_per_task;
    const int64_t r1 = r0 + job->rows_per_task < job->m ? r0 + job->rows_per_task : job->m;
    for (int64_t r = r0; r < r1; r++) job->fn(job->out + r * job->k, job->x + r * job->k, job->weight, job->k, job->eps);
}

int od_rmsnorm(float *out, const float *x, const float *weight, int64_t m, int64_t k, float eps) {
    if (m < 0 || k <= 0 || !(eps >= 0.0f)) return OD_EINVAL;
    norm_job job = {.out = out, .x = x, .weight = weight, .k = k, .m = m, .eps = eps, .fn = od_ops()->rmsnorm_row};
    const int threads = od_pool_threads();
    if (threads > 1 && m * k >= (1 << 17)) {
        job.rows_per_task = ceil_div(m, threads * 4);
        od_pool_run(norm_task, &job, ceil_div(m, job.rows_per_task));
    } else if (m > 0) {
        job.rows_per_task = m;
        norm_task(&job, 0);
    }
    return OD_OK;
}

/* ------------------------------------------------------------------ rope */

/*
 * cos/sin tables per (theta, head dim), grown to the largest position seen, so the 2 x n_layers
 * rope calls of a step share one computation. Angles are computed in double: pos * theta^(-2j/D)
 * loses nothing at long positions. The lock is held for the whole call so a concurrent call can
 * never see a table being replaced.
 */
#define ROPE_SLOTS 4
#define ROPE_CACHE_MAX_BYTES (16u << 20)

typedef struct {
    float theta;
    int64_t d;
    int64_t n_pos;
    float *table; /* [n_pos][d]: d/2 cosines then d/2 sines */
} rope_slot;

static rope_slot g_rope_slots[ROPE_SLOTS];
static int g_rope_next_victim;
static pthread_mutex_t g_rope_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_rope_once = PTHREAD_ONCE_INIT;

/* a fork while another thread held the lock would leave it locked forever in the child */
static void rope_after_fork_child(void) { pthread_mutex_init(&g_rope_lock, NULL); }
static void rope_register_fork_handler(void) { pthread_atfork(NULL, NULL, rope_after_fork_child); }

static void rope_fill(float *cs, int64_t pos, int64_t d, float theta, const float *freq_factors) {
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; j++) {
        double inv_freq = pow((double)theta, -2.0 * (double)j / (double)d);
        if (freq_factors) inv_freq /= (double)freq_factors[j];
        const double angle = (double)pos * inv_freq;
        cs[j] = (float)cos(angle);
        cs[half + j] = (float)sin(angle);
    }
}

/* Returns a table covering positions [0, max_pos], or NULL if it would be too big. */
static const float *rope_table(float theta, int64_t d, int64_t max_pos) {
    if ((size_t)(max_pos + 1) * (size_t)d * sizeof(float) > ROPE_CACHE_MAX_BYTES) return NULL;
    rope_slot *slot = NULL;
    for (int i = 0; i < ROPE_SLOTS; i++)
        if (g_rope_slots[i].table && g_rope_slots[i].theta == theta && g_rope_slots[i].d == d) slot = &g_rope_slots[i];
    if (slot && slot->n_pos > max_pos) return slot->table;
    if (!slot) {
        slot = &g_rope_slots[g_rope_next_victim];
        g_rope_next_victim = (g_rope_next_victim + 1) % ROPE_SLOTS;
        free(slot->table);
        *slot = (rope_slot){.theta = theta, .d = d};
    }
    int64_t n_pos = slot->n_pos ? slot->n_pos * 2 : 1024;
    while (n_pos <= max_pos) n_pos *= 2;
    const int64_t cap = (int64_t)(ROPE_CACHE_MAX_BYTES / ((size_t)d * sizeof(float)));
    if (n_pos > cap) n_pos = cap;
    float *table = realloc(slot->table, (size_t)n_pos * (size_t)d * sizeof(float));
    if (!table) return NULL;
    for (int64_t p = slot->n_pos; p < n_pos; p++) rope_fill(table + p * d, p, d, theta, NULL);
    slot->table = table;
    slot->n_pos = n_pos;
    return table;
}

typedef struct {
    float *x;
    int64_t h, d, rows_per_task, m;
    const int32_t *positions;
    const float *table; /* NULL: compute per row */
    float theta;
    const float *freq_factors;
    int neox;
    void (*fn)(float *, int64_t, int64_t, const float *, int);
} rope_job;

static void rope_task(void *ctx, int64_t t) {
    const rope_job *job = ctx;
    const int64_t r0 = t * job->rows_per_task;
    const int64_t r1 = r0 + job->rows_per_task < job->m ? r0 + job->rows_per_task : job->m;
    float *own = NULL;
    if (!job->table) {
        own = od_scratch(1, (size_t)job->d * sizeof(float));
        if (!own) return;
    }
    for (int64_t r = r0; r < r1; r++) {
        const float *cs;
        if (job->table) {
            cs = job->table + (int64_t)job->positions[r] * job->d;
        } else {
            rope_fill(own, job->positions[r], job->d, job->theta, job->freq_factors);
            cs = own;
        }
        job->fn(job->x + r * job->h * job->d, job->h, job->d, cs, job->neox);
    }
}

int od_rope(float *x, int64_t m, int64_t h, int64_t d, const int32_t *positions, float theta, int neox,
            const float *freq_factors) {
    if (m < 0 || h <= 0 || d <= 0 || d % 2 != 0 || !(theta > 0.0f) || !isfinite(theta)) return OD_EINVAL;
    int64_t max_pos = 0;
    for (int64_t r = 0; r < m; r++) {
        if (positions[r] < 0) return OD_EINVAL;
        if (positions[r] > max_pos) max_pos = positions[r];
    }
    if (m == 0) return OD_OK;
    rope_job job = {.x = x, .h = h, .d = d, .m = m, .positions = positions, .theta = theta,
                    .freq_factors = freq_factors, .neox = neox, .fn = od_ops()->rope_row};
    pthread_once(&g_rope_once, rope_register_fork_handler);
    pthread_mutex_lock(&g_rope_lock);
    if (!freq_factors) job.table = rope_table(theta, d, max_pos);
    const int threads = od_pool_threads();
    if (threads > 1 && m * h * d >= (1 << 16)) {
        job.rows_per_task = ceil_div(m, threads * 4);
        od_pool_run(rope_task, &job, ceil_div(m, job.rows_per_task));
    } else {
        job.rows_per_task = m;
        rope_task(&job, 0);
    }
    pthread_mutex_unlock(&g_rope_lock);
    return OD_OK;
}

/* ------------------------------------------------------------------ attention */

size_t od_attn_scratch_floats(const od_attn_args *args, int64_t rows) {
    /* scores for each row plus one output accumulator per row, padded for SIMD */
    return (size_t)rows * (size_t)(args->c + args->d + 16) + 64;
}

int od_attention(float *out, const float *q, const void *k_cache, const void *v_cache, int kv_type, int64_t m,
                 int64_t h, int64_t hkv, int64_t c, int64_t d, int64_t pos0, float scale, int64_t window) {
    if (m < 0 || h <= 0 || hkv <= 0 || h % hkv != 0 || d <= 0 || c <= 0 || pos0 < 0 || pos0 + m > c ||
        !isfinite(scale) || window < 0 || kv_type < OD_KV_F32 || kv_type > OD_KV_Q8_0 ||
        (kv_type == OD_KV_Q8_0 && d % OD_QK != 0))
        return OD_EINVAL;
    const int kv_f16 = kv_type == OD_KV_F16;
    if (m == 0) return OD_OK;
    if (window > 0 && pos0 + m > window) {
        /* Rows that see all their predecessors go as one block; a row at position p >= window sees keys
         * p-window+1..p only: the same kernel on the cache advanced by p-window+1 rows (the head stride c*d is
         * unchanged), as a row at position window-1. */
        const int64_t whole = window > pos0 ? window - pos0 : 0;
        if (whole > 0) {
            const int rc = od_attention(out, q, k_cache, v_cache, kv_type, whole, h, hkv, c, d, pos0, scale, 0);
            if (rc != OD_OK) return rc;
        }
        const size_t row_bytes = kv_type == OD_KV_Q8_0 ? (size_t)(d / OD_QK) * sizeof(block_q8_0)
                                                       : (size_t)d * (kv_f16 ? 2 : 4);
        for (int64_t r = whole; r < m; r++) {
            const size_t skip = (size_t)(pos0 + r - window + 1) * row_bytes;
            const int rc = od_attention(out + r * h * d, q + r * h * d, (const char *)k_cache + skip,
                                        (const char *)v_cache + skip, kv_type, 1, h, hkv, c, d, window - 1, scale, 0);
            if (rc != OD_OK) return rc;
        }
        return OD_OK;
    }
    /* A Q8_0 cache keeps the query f32 (llama.cpp rounds it to Q8_0 for its integer dot; dequantizing K keeps q
     * exact). */
    if (kv_f16) {
        /* llama.cpp multiplies an fp16 copy of the query with the fp16 keys (see od_attn_probabilities) */
        const size_t n = (size_t)(m * h * d);
        float *q16 = od_scratch(0, n * sizeof(float));
        if (!q16) return OD_ENOMEM;
        for (size_t i = 0; i < n; i++) q16[i] = od_fp16_to_fp32(od_fp32_to_fp16(q[i]));
        q = q16;
    }
    const od_attn_args args = {.out = out, .q = q, .k_cache = k_cache, .v_cache = v_cache, .kv_f16 = kv_f16, .m = m,
                               .h = h, .hkv = hkv, .c = c, .d = d, .pos0 = pos0, .scale = scale};
    return od_attention_grouped(&args, kv_type);
}

/* ------------------------------------------------------------------ element-wise */

typedef struct {
    float *out;
    const float *a, *b;
    int64_t n, per_task;
    int op; /* 0 silu_mul, 1 add, 2 gelu_mul */
} ew_job;

static void ew_task(void *ctx, int64_t t) {
    const ew_job *job = ctx;
    const int64_t i0 = t * job->per_task;
    const int64_t len = i0 + job->per_task < job->n ? job->per_task : job->n - i0;
    if (job->op == 0) od_ops()->silu_mul(job->out + i0, job->a + i0, job->b + i0, len);
    else if (job->op == 2) od_ops()->gelu_mul(job->out + i0, job->a + i0, job->b + i0, len);
    else od_ops()->add(job->out + i0, job->b + i0, len);
}

static void run_elementwise(ew_job *job) {
    const int threads = od_pool_threads();
    if (threads > 1 && job->n >= (1 << 16)) {
        job->per_task = ceil_div(ceil_div(job->n, threads * 4), 64) * 64;
        od_pool_run(ew_task, job, ceil_div(job->n, job->per_task));
    } else if (job->n > 0) {
        job->per_task = job->n;
        ew_task(job, 0);
    }
}

void od_silu_mul(float *out, const float *gate, const float *up, int64_t n) {
    ew_job job = {.out = out, .a = gate, .b = up, .n = n, .op = 0};
    run_elementwise(&job);
}

void od_gelu_mul(float *out, const float *gate, const float *up, int64_t n) {
    ew_job job = {.out = out, .a = gate, .b = up, .n = n, .op = 2};
    run_elementwise(&job);
}

void od_add_inplace(float *x, const float *y, int64_t n) {
    ew_job job = {.out = x, .a = x, .b = y, .n = n, .op = 1};
    run_elementwise(&job);
}

/* ------------------------------------------------------------------ argmax / top-k */

int64_t od_argmax(const float *x, int64_t n) {
    int64_t best = -1;
    float best_value = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        if (v != v) continue; /* NaN */
        if (best < 0 || v > best_value) {
            best = i;
            best_value = v;
        }
    }
    return best;
}

/* heap entry a ranks below b (is a worse candidate) */
static int ranks_below(float va, int32_t ia, float vb, int32_t ib) { return va < vb || (va == vb && ia > ib); }

/* min-heap on rank: the root is the worst kept candidate */
static void heap_sift_down(float *v, int32_t *idx, int64_t size, int64_t i) {
    for (;;) {
        const int64_t l = 2 * i + 1, r = l + 1;
        int64_t worst = i;
        if (l < size && ranks_below(v[l], idx[l], v[worst], idx[worst])) worst = l;
        if (r < size && ranks_below(v[r], idx[r], v[worst], idx[worst])) worst = r;
        if (worst == i) return;
        const float tv = v[i];
        v[i] = v[worst];
        v[worst] = tv;
        const int32_t ti = idx[i];
        idx[i] = idx[worst];
        idx[worst] = ti;
        i = worst;
    }
}

int64_t od_topk(const float *x, int64_t n, int64_t k, float *values, int32_t *indices) {
    if (k < 0 || n < 0 || n > INT32_MAX) return OD_EINVAL;
    if (k > n) k = n;
    int64_t size = 0;
    for (int64_t i = 0; i < n && k > 0; i++) {
        const float v = x[i];
        if (v != v) continue;
        if (size < k) {
            /* sift up */
            int64_t j = size++;
            values[j] = v;
            indices[j] = (int32_t)i;
            while (j > 0) {
                const int64_t parent = (j - 1) / 2;
                if (!ranks_below(values[j], indices[j], values[parent], indices[parent])) break;
                const float tv = values[j];
                values[j] = values[parent];
                values[parent] = tv;
                const int32_t ti = indices[j];
                indices[j] = indices[parent];
                indices[parent] = ti;
                j = parent;
            }
        } else if (ranks_below(values[0], indices[0], v, (int32_t)i)) {
            values[0] = v;
            indices[0] = (int32_t)i;
            heap_sift_down(values, indices, size, 0);
        }
    }
    /* heap sort: repeatedly move the worst to the end -> best first */
    for (int64_t end = size - 1; end > 0; end--) {
        const float tv = values[0];
        values[0] = values[end];
        values[end] = tv;
        const int32_t ti = indices[0];
        indices[0] = indices[end];
        indices[end] = ti;
        heap_sift_down(values, indices, end, 0);
    }
    return size;
}

/* ------------------------------------------------------------------ threads */

void od_set_threads(int n) { od_pool_set_threads(n); }
int od_get_threads(void) { return od_pool_threads(); }
int od_physical_cores(void) { return od_detect_physical_cores(); }
