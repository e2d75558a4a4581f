/*
 * NEON vs scalar check for the C kernels, meant to run on aarch64 (natively or under qemu-user).
 * Built and run by tests/test_kernels.py::test_neon_matches_scalar_under_qemu:
 *   aarch64-linux-gnu-gcc -O2 -static -pthread -Ikernels kernels/(all).c tests/kernels_neon_check.c -lm
 * Every kernel is run through the public API with the ISA forced to "scalar", "neon" (dot-product
 * instructions when present) and "neon-nodotprod", on random data including random quant bytes;
 * results must agree within 2e-5 of the sum of absolute products. Exit status 0 = all agree.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"
#include "ondevice_kernels.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 11);
}

static float next_normalish(void) { /* sum of uniforms, mean 0, unit-ish variance */
    float s = 0.0f;
    for (int i = 0; i < 4; i++) s += (float)next_u32() / 4294967296.0f - 0.5f;
    return s * 1.7f;
}

static void put_half(uint8_t *p, float v) {
    const od_half h = od_fp32_to_fp16(v);
    memcpy(p, &h, 2);
}

/* Random weights: random quant bytes, sane fp16 scales. Float types: random normal values. */
static uint8_t *make_weights(int type, int64_t n, int64_t k) {
    const size_t row_bytes = od_row_nbytes(type, k);
    uint8_t *w = malloc(row_bytes * (size_t)n);
    if (type == OD_TYPE_F32 || type == OD_TYPE_F16 || type == OD_TYPE_BF16) {
        for (int64_t i = 0; i < n * k; i++) {
            const float v = next_normalish() * 0.05f;
            if (type == OD_TYPE_F32) memcpy(w + 4 * i, &v, 4);
            else if (type == OD_TYPE_F16) put_half(w + 2 * i, v);
            else {
                const uint16_t b = (uint16_t)(od_f32_to_bits(v) >> 16);
                memcpy(w + 2 * i, &b, 2);
            }
        }
        return w;
    }
    for (size_t i = 0; i < row_bytes * (size_t)n; i++) w[i] = (uint8_t)next_u32();
    const int block_bytes = type == OD_TYPE_Q4_0 ? 18 : type == OD_TYPE_Q4_1 ? 20 : type == OD_TYPE_Q5_0 ? 22
                          : type == OD_TYPE_Q5_1 ? 24 : type == OD_TYPE_Q8_0 ? 34 : type == OD_TYPE_Q4_K ? 144
                          : type == OD_TYPE_Q5_K ? 176 : type == OD_TYPE_IQ4_NL ? 18 : type == OD_TYPE_IQ4_XS ? 136
                          : type == OD_TYPE_Q3_K ? 110 : 210;
    const size_t n_blocks = row_bytes * (size_t)n / (size_t)block_bytes;
    for (size_t b = 0; b < n_blocks; b++) {
        uint8_t *blk = w + b * (size_t)block_bytes;
        const float sign = (next_u32() & 1) ? 1.0f : -1.0f;
        const float mag = 1e-3f + 9e-3f * ((float)next_u32() / 4294967296.0f);
        if (type == OD_TYPE_Q6_K) {
            put_half(blk + 208, sign * mag * 0.1f);
        } else if (type == OD_TYPE_Q3_K) {
            put_half(blk + 108, sign * mag * 0.1f);
        } else if (type == OD_TYPE_Q4_K || type == OD_TYPE_Q5_K) {
            put_half(blk, sign * mag * 0.2f);
            put_half(blk + 2, mag * 0.2f);
        } else {
            put_half(blk, sign * mag);
            if (type == OD_TYPE_Q4_1 || type == OD_TYPE_Q5_1) put_half(blk + 2, -mag * 3.0f);
        }
    }
    return w;
}

static float *random_floats(int64_t n, float scale) {
    float *x = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) x[i] = next_normalish() * scale;
    return x;
}

static int failures = 0;

/* |got - want| <= tol * scale elementwise */
static void check(const char *what, const char *isa, const float *got, const float *want, const float *scale,
                  int64_t n, float tol) {
    double worst = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double s = scale ? scale[i] : fabs(want[i]) + 1e-6;
        const double err = fabs((double)got[i] - (double)want[i]) / (s + 1e-30);
        if (!(err <= worst)) worst = err; /* also catches NaN */
    }
    const int ok = worst <= tol;
    if (!ok) failures++;
    printf("%-4s %-40s %-15s max rel err %.3g\n", ok ? "ok" : "FAIL", what, isa, worst);
}

static const char *simd_isas[] = {"neon", "neon-nodotprod"};

static void test_matmul(int type, int64_t m, int64_t n, int64_t k) {
    uint8_t *w = make_weights(type, n, k);
    float *x = random_floats(m * k, 1.0f);
    x[3] *= 40.0f; /* an outlier */
    float *want = malloc(sizeof(float) * (size_t)(m * n)), *got = malloc(sizeof(float) * (size_t)(m * n));
    float *dense = malloc(sizeof(float) * (size_t)(n * k)), *mag = calloc((size_t)(m * n), sizeof(float));
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)i;
    od_set_isa("scalar");
    od_get_rows(dense, w, type, n, ids, n, k);
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < n; c++) {
            double s = 0.0;
            for (int64_t i = 0; i < k; i++) s += fabs((double)x[r * k + i] * dense[c * k + i]);
            mag[r * n + c] = (float)s;
        }
    if (od_matmul(want, w, type, x, m, n, k, 0) != OD_OK) failures++;
    char what[96];
    snprintf(what, sizeof(what), "matmul %s M=%lld N=%lld K=%lld", od_type_name(type), (long long)m, (long long)n,
             (long long)k);
    for (int v = 0; v < 2; v++) {
        if (od_set_isa(simd_isas[v]) != OD_OK) continue;
        memset(got, 0, sizeof(float) * (size_t)(m * n));
        if (od_matmul(got, w, type, x, m, n, k, 0) != OD_OK) failures++;
        check(what, simd_isas[v], got, want, mag, m * n, 2e-5f);
    }
    free(w), free(x), free(want), free(got), free(dense), free(mag), free(ids);
}

static void test_get_rows(int type) {
    const int64_t n = 11, k = 512;
    uint8_t *w = make_weights(type, n, k);
    const int32_t ids[4] = {10, 0, 3, 3};
    float *want = malloc(sizeof(float) * 4 * k), *got = malloc(sizeof(float) * 4 * k);
    od_set_isa("scalar");
    od_get_rows(want, w, type, n, ids, 4, k);
    char what[64];
    snprintf(what, sizeof(what), "get_rows %s", od_type_name(type));
    for (int v = 0; v < 2; v++) {
        if (od_set_isa(simd_isas[v]) != OD_OK) continue;
        od_get_rows(got, w, type, n, ids, 4, k);
        check(what, simd_isas[v], got, want, NULL, 4 * k, 1e-6f);
    }
    free(w), free(want), free(got);
}

static void test_elementwise(void) {
    const int64_t m = 5, k = 579;
    float *x = random_floats(m * k, 3.0f), *weight = random_floats(k, 1.0f);
    float *want = malloc(sizeof(float) * (size_t)(m * k)), *got = malloc(sizeof(float) * (size_t)(m * k));
    float *up = random_floats(m * k, 1.0f);
    x[0] = -100.0f;
    for (int v = 0; v < 2; v++) {
        od_set_isa("scalar");
        od_rmsnorm(want, x, weight, m, k, 1e-5f);
        if (od_set_isa(simd_isas[v]) != OD_OK) continue;
        od_rmsnorm(got, x, weight, m, k, 1e-5f);
        check("rmsnorm", simd_isas[v], got, want, NULL, m * k, 2e-5f);

        od_set_isa("scalar");
        od_silu_mul(want, x, up, m * k);
        od_set_isa(simd_isas[v]);
        od_silu_mul(got, x, up, m * k);
        float *scale = malloc(sizeof(float) * (size_t)(m * k));
        for (int64_t i = 0; i < m * k; i++) scale[i] = fabsf(want[i]) + 1e-6f;
        check("silu_mul", simd_isas[v], got, want, scale, m * k, 2e-5f);

        od_set_isa("scalar");
        od_gelu_mul(want, x, up, m * k);
        od_set_isa(simd_isas[v]);
        od_gelu_mul(got, x, up, m * k);
        for (int64_t i = 0; i < m * k; i++) scale[i] = fabsf(want[i]) + 1e-6f;
        check("gelu_mul", simd_isas[v], got, want, scale, m * k, 2e-5f);
        free(scale);

        memcpy(want, x, sizeof(float) * (size_t)(m * k));
        memcpy(got, x, sizeof(float) * (size_t)(m * k));
        od_set_isa("scalar");
        od_add_inplace(want, up, m * k);
        od_set_isa(simd_isas[v]);
        od_add_inplace(got, up, m * k);
        check("add_inplace", simd_isas[v], got, want, NULL, m * k, 0.0f);

        for (int neox = 0; neox < 2; neox++) {
            const int64_t rm = 3, h = 4, d = 64;
            const int32_t pos[3] = {0, 17, 4000};
            float *base = random_floats(rm * h * d, 1.0f);
            memcpy(want, base, sizeof(float) * (size_t)(rm * h * d));
            memcpy(got, base, sizeof(float) * (size_t)(rm * h * d));
            od_set_isa("scalar");
            od_rope(want, rm, h, d, pos, 10000.0f, neox, NULL);
            od_set_isa(simd_isas[v]);
            od_rope(got, rm, h, d, pos, 10000.0f, neox, NULL);
            float *scale = malloc(sizeof(float) * (size_t)(rm * h * d));
            for (int64_t i = 0; i < rm * h * d; i++) scale[i] = 1.0f;
            check(neox ? "rope neox" : "rope normal", simd_isas[v], got, want, scale, rm * h * d, 1e-5f);
            free(scale), free(base);
        }
    }
    free(x), free(weight), free(want), free(got), free(up);
}

/* kv_type OD_KV_F32 / F16 / Q8_0; the Q8_0 cache is written by od_kv_store_q8_0 (scalar on aarch64). */
static void test_attention(int kv_type) {
    static const char *const kv_names[] = {"f32", "f16", "q8_0"};
    const int64_t h = 6, hkv = 2, c = 600, d = 64, q8_row = d / 32 * 34;
    float *kf = random_floats(hkv * c * d, 1.0f), *vf = random_floats(hkv * c * d, 1.0f);
    void *k_cache = kf, *v_cache = vf;
    uint16_t *kh = NULL, *vh = NULL;
    uint8_t *kq = NULL, *vq = NULL;
    if (kv_type == OD_KV_F16) {
        kh = malloc(2 * (size_t)(hkv * c * d));
        vh = malloc(2 * (size_t)(hkv * c * d));
        for (int64_t i = 0; i < hkv * c * d; i++) {
            kh[i] = od_fp32_to_fp16(kf[i]);
            vh[i] = od_fp32_to_fp16(vf[i]);
        }
        k_cache = kh;
        v_cache = vh;
    } else if (kv_type == OD_KV_Q8_0) {
        kq = calloc((size_t)(hkv * c * q8_row), 1);
        vq = calloc((size_t)(hkv * c * q8_row), 1);
        if (od_kv_store_q8_0(kq, kf, c, hkv, c, d, 0) != OD_OK || od_kv_store_q8_0(vq, vf, c, hkv, c, d, 0) != OD_OK) {
            printf("FAIL kv_store_q8_0\n");
            failures++;
        }
        k_cache = kq;
        v_cache = vq;
    }
    /* M = 1 at position 550: a Q8_0 decode step split over key ranges (2 threads) */
    const int64_t cases[4][2] = {{1, 0}, {1, 40}, {9, 50}, {1, 550}};
    for (int cs = 0; cs < 4; cs++) {
        const int64_t m = cases[cs][0], pos0 = cases[cs][1];
        float *q = random_floats(m * h * d, 2.0f);
        float *want = malloc(sizeof(float) * (size_t)(m * h * d)), *got = malloc(sizeof(float) * (size_t)(m * h * d));
        float *scale = malloc(sizeof(float) * (size_t)(m * h * d));
        for (int64_t i = 0; i < m * h * d; i++) scale[i] = 1.0f;
        od_set_isa("scalar");
        od_attention(want, q, k_cache, v_cache, kv_type, m, h, hkv, c, d, pos0, 0.125f, 0);
        char what[64];
        snprintf(what, sizeof(what), "attention %s M=%lld pos0=%lld", kv_names[kv_type], (long long)m,
                 (long long)pos0);
        for (int v = 0; v < 2; v++) {
            if (od_set_isa(simd_isas[v]) != OD_OK) continue;
            od_attention(got, q, k_cache, v_cache, kv_type, m, h, hkv, c, d, pos0, 0.125f, 0);
            check(what, simd_isas[v], got, want, scale, m * h * d, 2e-5f);
        }
        free(q), free(want), free(got), free(scale);
    }
    free(kf), free(vf), free(kh), free(vh), free(kq), free(vq);
}

int main(void) {
    printf("isa=%s features='%s' threads=%d\n", od_isa(), od_cpu_features(), od_get_threads());
    if (od_set_isa("neon") != OD_OK) {
        printf("FAIL neon path not available\n");
        return 1;
    }
    od_set_threads(2);
    const int types[] = {OD_TYPE_F32, OD_TYPE_F16, OD_TYPE_BF16, OD_TYPE_Q4_0, OD_TYPE_Q4_1,
                         OD_TYPE_Q5_0, OD_TYPE_Q5_1, OD_TYPE_Q8_0, OD_TYPE_Q4_K, OD_TYPE_Q5_K, OD_TYPE_Q6_K,
                         OD_TYPE_IQ4_NL, OD_TYPE_IQ4_XS};
    const int64_t shapes[4][3] = {{1, 37, 512}, {3, 37, 512}, {7, 21, 256}, {13, 9, 512}};
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        for (int s = 0; s < 4; s++) test_matmul(types[t], shapes[s][0], shapes[s][1], shapes[s][2]);
        if (types[t] == OD_TYPE_F32 || types[t] == OD_TYPE_F16) test_matmul(types[t], 2, 5, 515); /* K tails */
        test_get_rows(types[t]);
    }
    test_elementwise();
    test_attention(OD_KV_F32);
    test_attention(OD_KV_F16);
    test_attention(OD_KV_Q8_0);
    /* types added later run last, so the random data of the tests above stays what it was (attention f16's
     * tolerance was set on that data) */
    for (int s = 0; s < 4; s++) test_matmul(OD_TYPE_Q3_K, shapes[s][0], shapes[s][1], shapes[s][2]);
    test_get_rows(OD_TYPE_Q3_K);
    printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
