/*
 * ondevice kernels: the compute primitives of a llama/qwen2-style decoder, over GGUF weights.
 *
 * Conventions
 *  - All float arrays are float32, C-contiguous (row-major), and must not overlap unless a
 *    function says it works in place.
 *  - Weight matrices W are [N rows][K columns] in a GGML type (see enum od_type in blocks.h):
 *    each row is od_row_nbytes(type, K) bytes, rows back to back, exactly as a 2-D GGUF tensor
 *    with dims (K, N). Quantized rows need K to be a multiple of the type's block size
 *    (32, or 256 for Q3_K / Q4_K / Q5_K / Q6_K / IQ4_XS).
 *  - Functions returning int return OD_OK (0) or a negative OD_E* code and never touch memory
 *    when they fail. They do not know the size of the caller's buffers beyond the dimensions
 *    passed; callers (like the Python binding) check those.
 *  - Multi-threaded functions use one process-wide pool (od_set_threads). Calls from several
 *    threads at once are safe: a call that finds the pool busy runs on its own thread.
 *  - SIMD code is chosen at run time from the CPU (AVX2+FMA+F16C on x86-64, with AVX-512 VNNI kernels for the
 *    repacked layouts where the CPU has AVX512F/BW/VL/VNNI; NEON on aarch64 with
 *    the dot-product instructions when present, plain C elsewhere).
 *
 * Environment variables (read once, at first use):
 *    ONDEVICE_ISA=scalar|avx2|avx512|neon   force a code path (an unavailable one falls back to the best)
 *    ONDEVICE_THREADS=n              initial pool size (default: physical cores)
 *    ONDEVICE_SPIN_US=us             how long idle workers spin before sleeping (default 1000)
 *    ONDEVICE_POOL_ADAPTIVE=0        disable the oversubscription guard (see od_set_threads)
 */
#ifndef ONDEVICE_KERNELS_H
#define ONDEVICE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define OD_OK 0
#define OD_EINVAL (-1)  /* bad dimension or parameter */
#define OD_ETYPE (-2)   /* GGML type not supported by this function */
#define OD_ERANGE (-3)  /* an index (token id) outside the table */
#define OD_ENOMEM (-4)  /* scratch allocation failed */
#define OD_EISA (-5)    /* requested ISA not available on this CPU/build */

/* Bytes of one row of K weights of GGML type `type`; 0 if the type is unsupported or K is not a
 * multiple of its block size. */
size_t od_row_nbytes(int type, int64_t k);

/* Human-readable name of a supported GGML type ("Q4_1"), or NULL. */
const char *od_type_name(int type);

/*
 * out[M][N] = x[M][K] @ W^T (or out += ... when accumulate != 0).
 * For quantized W, each row of x is quantized to 8-bit blocks of 32 (float scale per block) and
 * the dot products run on integers, like llama.cpp's q8_0/q8_1 path; the result differs from an
 * exact f32 product by that activation rounding (relative error ~0.3% of the row norm product).
 * F32/F16/BF16 weights use f32 arithmetic. Threads split the N rows.
 * Up to OD_MATMUL_EXACT_ROWS rows of x, every row's result has the bits it has with M = 1 (whatever M, the thread
 * count or the row's place): a batch of decode steps, or a speculative verification, equals one-token steps.
 */
#define OD_MATMUL_EXACT_ROWS 16
int od_matmul(float *out, const void *w, int wtype, const float *x, int64_t m, int64_t n, int64_t k,
              int accumulate);

/* Load-time repacking into interleaved layouts (blocks.h: Q4_0 -> Q4_0_X8, Q4_K -> Q4_K_X8, Q4_1 -> Q4_1_X8,
 * Q8_0 -> Q8_0_X8, Q6_K -> Q6_K_X8) the current code path multiplies faster. od_repack_layout: the repacked type id of `type`, or 0
 * if it has none; od_repacked_type: the same when the current code path has a kernel for it, else 0. od_repack:
 * src [n][k] of `type` -> dst in its repacked form (of od_row_nbytes(repacked type, k) bytes a row), or back to
 * `type` when unpack != 0; dst and src must not overlap; n must divide by 8. */
#define OD_REPACK_ROWS 8
#define OD_REPACK_Q4_0_X8 32
#define OD_REPACK_Q4_K_X8 33
#define OD_REPACK_Q4_1_X8 34
#define OD_REPACK_Q8_0_X8 35
#define OD_REPACK_Q6_K_X8 36
int od_repack_layout(int type);
int od_repacked_type(int type);
int od_repack(void *dst, const void *src, int type, int64_t n, int64_t k, int unpack);

/* The 8-bit activations od_matmul computes for weights of type wtype (test hook and for native callers
 * that want to inspect them): qs[M][K] codes, ds[M][K/32][2] = (d, s) per block of 32, x[M][K] f32. */
int od_quantize_activations(int8_t *qs, float *ds, const float *x, int wtype, int64_t m, int64_t k);

/* Weight quantization: src[nrows][n] f32 (finite) -> dst rows of od_row_nbytes(type, n) bytes of type Q8_0, Q4_0,
 * Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL or IQ4_XS, the bytes llama.cpp's reference quantizers write without an importance matrix.
 * OD_ETYPE for other types, OD_ERANGE if a block scale overflows fp16 (dst is then partly written). Threads
 * split the rows. */
int od_quantize_rows(void *dst, const float *src, int type, int64_t nrows, int64_t n);
/* The same with importance weights (n floats, an imatrix's per-column mean squares), as ggml_quantize_chunk(type, ...,
 * imatrix) writes them; OD_ETYPE for the types whose weighted quantizer is only in numpy (all but IQ4_NL, IQ4_XS, Q3_K). */
int od_quantize_rows_imatrix(void *dst, const float *src, int type, int64_t nrows, int64_t n, const float *importance);

/* out[M][K] = rows ids[0..M) of table (n_rows rows of K elements of GGML type ttype), in f32. */
int od_get_rows(float *out, const void *table, int ttype, int64_t n_rows, const int32_t *ids, int64_t m,
                int64_t k);

/* out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * weight, per row of K. out may equal x. */
int od_rmsnorm(float *out, const float *x, const float *weight, int64_t m, int64_t k, float eps);

/*
 * Rotary position embedding, in place, on x[M][H][D] with row i at position positions[i].
 * neox == 0: llama.cpp "normal" mode, rotates pairs (x[2j], x[2j+1]);
 * neox != 0: NEOX / rotate-half mode, rotates pairs (x[j], x[j + D/2]).
 * Angle of pair j is pos * theta^(-2j/D), divided by freq_factors[j] when freq_factors != NULL
 * (llama 3 style rope_freqs). D must be even; positions must be >= 0.
 */
int od_rope(float *x, int64_t m, int64_t h, int64_t d, const int32_t *positions, float theta, int neox,
            const float *freq_factors);

/* KV cache element types of od_attention (kv_type). OD_KV_Q8_0: each cached row of D values is D/32 ggml Q8_0
 * blocks (fp16 scale + 32 int8, 34 bytes), as od_kv_store_q8_0 writes them; needs D % 32 == 0. */
#define OD_KV_F32 0
#define OD_KV_F16 1
#define OD_KV_Q8_0 2

/*
 * Causal multi-head attention with grouped KV heads.
 * q[M][H][D]; k_cache, v_cache: [Hkv][C][D] of kv_type (OD_KV_F32, OD_KV_F16 IEEE fp16, OD_KV_Q8_0 rows of blocks);
 * query row i sits at position p = pos0 + i and attends to cache entries 0..p, which the
 * caller has already written; with window > 0 (sliding-window attention) to p-window+1..p only.
 * Query head h uses KV head h / (H / Hkv). out[M][H*D].
 * Requires H % Hkv == 0 and pos0 + M <= C. Threads split heads x query rows.
 */
int od_attention(float *out, const float *q, const void *k_cache, const void *v_cache, int kv_type, int64_t m,
                 int64_t h, int64_t hkv, int64_t c, int64_t d, int64_t pos0, float scale, int64_t window);

/* Writes rows[M][Hkv][D] (f32, finite) into a Q8_0 cache [Hkv][C][D/32 blocks] at positions pos0..pos0+M-1, each
 * block the bytes ggml's reference quantize_row_q8_0 writes. Needs D % 32 == 0 and pos0 + M <= C. */
int od_kv_store_q8_0(void *cache, const float *rows, int64_t m, int64_t hkv, int64_t c, int64_t d, int64_t pos0);

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up. out may equal gate or up. */
void od_silu_mul(float *out, const float *gate, const float *up, int64_t n);

/* out[i] = gelu_tanh(gate[i]) * up[i] (GELU's tanh approximation, Gemma's MLP). out may equal gate or up. */
void od_gelu_mul(float *out, const float *gate, const float *up, int64_t n);

/* x[i] += y[i]. */
void od_add_inplace(float *x, const float *y, int64_t n);

/* Index of the largest element (the first one on ties; NaNs are skipped); -1 if n == 0. */
int64_t od_argmax(const float *x, int64_t n);

/* The k largest elements, sorted descending (ties: lower index first), NaNs skipped.
 * Writes min(k, count of non-NaN) entries and returns that count, or a negative error code. */
int64_t od_topk(const float *x, int64_t n, int64_t k, float *values, int32_t *indices);

/* Thread pool: n <= 0 selects the default (physical cores). Not to be called while another
 * thread is inside a kernel. The caller's thread always takes part. When the cores are
 * oversubscribed by other processes (a second thread measurably stops paying off), jobs run on the
 * calling thread alone for a while and parallelism is retried later. Safe across fork(): the child
 * respawns its workers on first use. */
void od_set_threads(int n);
int od_get_threads(void);
/* Physical cores available to this process (SMT siblings counted once). */
int od_physical_cores(void);

/* Name of the code path in use: "scalar", "avx2" or "neon". */
const char *od_isa(void);
/* Force a code path ("scalar", "avx2", "neon"); OD_EISA if the CPU or build lacks it. */
int od_set_isa(const char *name);
/* Space-separated list of the relevant CPU features detected ("avx2 fma f16c", "neon dotprod"...). */
const char *od_cpu_features(void);

#ifdef __cplusplus
}
#endif

#endif /* ONDEVICE_KERNELS_H */
