/*
 * ondevice._kernels: CPython extension exposing the C kernels (kernels/ondevice_kernels.h).
 *
 * Why the raw CPython C API: it needs nothing but the compiler and Python headers, so the package
 * builds offline everywhere; cffi and nanobind would be extra build/run-time dependencies that are
 * not available in the offline build environment, and METH_FASTCALL keeps the per-call cost low
 * (decode makes ~400 calls per token). Numpy's C API is not used either (no numpy headers at build
 * time): arrays come in through the buffer protocol, and the two functions that return arrays
 * (topk) allocate them through numpy's Python API.
 *
 * Every argument is validated before any memory is touched: float arrays must be C-contiguous
 * buffers of itemsize 4 with a float format, index arrays int32, outputs writable, sizes must match
 * exactly, and outputs may not overlap inputs (except where a kernel is documented in-place).
 * Violations raise ValueError (TypeError for objects without the buffer protocol).
 *
 * The GIL is released around compute, except for calls so small (~1 us) that releasing it would
 * cost more than the work and hand the interpreter to other Python threads mid-step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "ondevice_kernels.h"

/* Work (in float elements touched or multiply-adds) below which the GIL stays held. */
#define GIL_RELEASE_THRESHOLD 16384

enum buf_kind { KIND_F32, KIND_I32, KIND_BYTES, KIND_F32_OR_F16 };

typedef struct {
    Py_buffer view;
    int held;
} arg_buf;

static int format_is(const char *format, char code) {
    if (!format) return code == 'B';
    if (format[0] == '<' || format[0] == '=' || format[0] == '@') format++;
    return format[0] == code && format[1] == '\0';
}

/* Acquires a C-contiguous buffer and checks its element type. Returns 0 and sets an exception on
 * failure. */
static int get_buffer(PyObject *obj, arg_buf *b, const char *name, enum buf_kind kind, int writable) {
    b->held = 0;
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must support the buffer protocol (numpy array, memoryview...), got %s",
                     name, Py_TYPE(obj)->tp_name);
        return 0;
    }
    int flags = PyBUF_FORMAT | PyBUF_STRIDES;
    if (writable) flags |= PyBUF_WRITABLE;
    if (PyObject_GetBuffer(obj, &b->view, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: cannot get a %sbuffer from this object", name,
                     writable ? "writable " : "");
        return 0;
    }
    b->held = 1;
    if (!PyBuffer_IsContiguous(&b->view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (use numpy.ascontiguousarray)", name);
        return 0;
    }
    switch (kind) {
    case KIND_F32:
        if (b->view.itemsize != 4 || !format_is(b->view.format, 'f')) {
            PyErr_Format(PyExc_ValueError, "%s must be float32 (got format '%s', itemsize %zd)", name,
                         b->view.format ? b->view.format : "B", b->view.itemsize);
            return 0;
        }
        break;
    case KIND_F32_OR_F16:
        if (!((b->view.itemsize == 4 && format_is(b->view.format, 'f')) ||
              (b->view.itemsize == 2 && format_is(b->view.format, 'e')))) {
            PyErr_Format(PyExc_ValueError, "%s must be float32 or float16 (got format '%s', itemsize %zd)", name,
                         b->view.format ? b->view.format : "B", b->view.itemsize);
            return 0;
        }
        break;
    case KIND_I32:
        if (b->view.itemsize != 4 ||
            !(format_is(b->view.format, 'i') || (sizeof(long) == 4 && format_is(b->view.format, 'l')))) {
            PyErr_Format(PyExc_ValueError, "%s must be int32 (got format '%s', itemsize %zd)", name,
                         b->view.format ? b->view.format : "B", b->view.itemsize);
            return 0;
        }
        break;
    case KIND_BYTES:
        break;
    }
    return 1;
}

static void release_buffers(arg_buf *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].held) {
            PyBuffer_Release(&bufs[i].view);
            bufs[i].held = 0;
        }
}

static Py_ssize_t n_items(const arg_buf *b) { return b->view.len / (b->view.itemsize ? b->view.itemsize : 1); }

static int overlaps(const arg_buf *a, const arg_buf *b) {
    const char *a0 = a->view.buf, *b0 = b->view.buf;
    return a0 < b0 + b->view.len && b0 < a0 + a->view.len && a->view.len > 0 && b->view.len > 0;
}

static int same_memory(const arg_buf *a, const arg_buf *b) {
    return a->view.buf == b->view.buf && a->view.len == b->view.len;
}

static int check_disjoint(const arg_buf *out, const arg_buf *in, const char *out_name, const char *in_name) {
    if (overlaps(out, in)) {
        PyErr_Format(PyExc_ValueError, "%s must not overlap %s", out_name, in_name);
        return 0;
    }
    return 1;
}

static int check_nargs(Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi, const char *fname) {
    if (nargs < lo || nargs > hi) {
        if (lo == hi) PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", fname, lo, nargs);
        else PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", fname, lo, hi, nargs);
        return 0;
    }
    return 1;
}

static int get_i64(PyObject *obj, long long *value, const char *name) {
    if (!PyLong_Check(obj) && !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", name);
        return 0;
    }
    *value = PyLong_AsLongLong(obj);
    if (*value == -1 && PyErr_Occurred()) return 0;
    return 1;
}

static int get_f32(PyObject *obj, float *value, const char *name) {
    const double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "%s must be a float", name);
        return 0;
    }
    *value = (float)v;
    return 1;
}

static PyObject *raise_code(int code, const char *what) {
    switch (code) {
    case OD_ETYPE: PyErr_Format(PyExc_ValueError, "%s: unsupported GGML type", what); break;
    case OD_ERANGE: PyErr_Format(PyExc_ValueError, "%s: index out of range", what); break;
    case OD_ENOMEM: PyErr_NoMemory(); break;
    case OD_EISA: PyErr_Format(PyExc_ValueError, "%s: ISA not available on this CPU/build", what); break;
    default: PyErr_Format(PyExc_ValueError, "%s: invalid arguments", what); break;
    }
    return NULL;
}

/* Runs `stmt` with the GIL released when `work` is large enough. */
#define RUN_MAYBE_NOGIL(work, stmt)              \
    do {                                         \
        if ((work) >= GIL_RELEASE_THRESHOLD) {   \
            Py_BEGIN_ALLOW_THREADS stmt;         \
            Py_END_ALLOW_THREADS                 \
        } else {                                 \
            stmt;                                \
        }                                        \
    } while (0)

/* ------------------------------------------------------------------ matmul */

PyDoc_STRVAR(matmul_doc,
             "matmul(out, w, wtype, x, K, accumulate=False)\n--\n\n"
             "out[M,N] = x[M,K] @ W^T (out += ... if accumulate). W: N rows of K weights of GGML type `wtype`\n"
             "as raw GGUF bytes (any buffer of exactly N*row_nbytes(wtype, K) bytes). M = x.size // K,\n"
             "N = out.size // M. Quantized W quantizes x to 8-bit blocks of 32 on the fly.");

static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 5, 6, "matmul")) return NULL;
    long long wtype, k;
    if (!get_i64(args[2], &wtype, "wtype") || !get_i64(args[4], &k, "K")) return NULL;
    const int accumulate = nargs > 5 ? PyObject_IsTrue(args[5]) : 0;
    if (accumulate < 0) return NULL;
    const size_t row_bytes = (wtype >= 0 && wtype < 64) ? od_row_nbytes((int)wtype, k) : 0;
    if (row_bytes == 0) {
        if (wtype < 0 || wtype >= 64 || !od_type_name((int)wtype))
            return PyErr_Format(PyExc_ValueError, "matmul: unsupported GGML type id %lld", wtype);
        return PyErr_Format(PyExc_ValueError, "matmul: K=%lld is not a positive multiple of the %s block size", k,
                            od_type_name((int)wtype));
    }
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "out", KIND_F32, 1) || !get_buffer(args[1], &b[1], "w", KIND_BYTES, 0) ||
        !get_buffer(args[3], &b[2], "x", KIND_F32, 0))
        goto done;
    const Py_ssize_t x_items = n_items(&b[2]), out_items = n_items(&b[0]);
    if (x_items == 0 || x_items % k != 0) {
        PyErr_Format(PyExc_ValueError, "matmul: x has %zd elements, not a positive multiple of K=%lld", x_items, k);
        goto done;
    }
    const long long m = x_items / k;
    if (out_items % m != 0) {
        PyErr_Format(PyExc_ValueError, "matmul: out has %zd elements, not a multiple of M=%lld", out_items, m);
        goto done;
    }
    const long long n = out_items / m;
    if ((size_t)b[1].view.len != (size_t)n * row_bytes) {
        PyErr_Format(PyExc_ValueError,
                     "matmul: w has %zd bytes but N=%lld rows of K=%lld %s weights need %zu bytes", b[1].view.len,
                     n, k, od_type_name((int)wtype), (size_t)n * row_bytes);
        goto done;
    }
    if (!check_disjoint(&b[0], &b[1], "out", "w") || !check_disjoint(&b[0], &b[2], "out", "x")) goto done;
    int rc;
    RUN_MAYBE_NOGIL(m * n * k, rc = od_matmul(b[0].view.buf, b[1].view.buf, (int)wtype, b[2].view.buf, m, n, k,
                                              accumulate));
    if (rc != OD_OK) {
        raise_code(rc, "matmul");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

PyDoc_STRVAR(quantize_activations_doc,
             "_quantize_activations(qs, ds, x, wtype, K)\n--\n\n"
             "Test hook: the 8-bit activations matmul uses for weights of type wtype. qs: int8[M*K] (out),\n"
             "ds: float32[M*K/32*2] (out, d and s per block of 32), x: float32[M*K].");

static PyObject *py_quantize_activations(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 5, 5, "_quantize_activations")) return NULL;
    long long wtype, k;
    if (!get_i64(args[3], &wtype, "wtype") || !get_i64(args[4], &k, "K")) return NULL;
    if (k <= 0 || k % 32 != 0) return PyErr_Format(PyExc_ValueError, "_quantize_activations: K=%lld", k);
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "qs", KIND_BYTES, 1) || !get_buffer(args[1], &b[1], "ds", KIND_F32, 1) ||
        !get_buffer(args[2], &b[2], "x", KIND_F32, 0))
        goto done;
    const Py_ssize_t x_items = n_items(&b[2]);
    const long long m = x_items / k;
    if (x_items % k != 0 || b[0].view.len != x_items || n_items(&b[1]) != x_items / 32 * 2) {
        PyErr_SetString(PyExc_ValueError, "_quantize_activations: qs, ds and x sizes do not agree with K");
        goto done;
    }
    const int rc = od_quantize_activations(b[0].view.buf, b[1].view.buf, b[2].view.buf, (int)wtype, m, k);
    if (rc != OD_OK) {
        raise_code(rc, "_quantize_activations");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

/* ------------------------------------------------------------------ quantize_rows */

PyDoc_STRVAR(quantize_rows_doc,
             "quantize_rows(dst, src, wtype, K, importance=None)\n--\n\n"
             "Quantize float32 rows src[M*K] (finite) to GGML type wtype into dst (uint8, M * row_nbytes(wtype, K)):\n"
             "the bytes llama.cpp's reference quantizers write without an importance matrix, or with importance\n"
             "(float32 K, finite, >= 0) what ggml_quantize_chunk writes with it. Returns False if a block scale\n"
             "overflows fp16 (dst is then incomplete), True otherwise; TypeError for types it lacks (with importance:\n"
             "all but IQ4_NL and IQ4_XS).");

static PyObject *py_quantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 4, 5, "quantize_rows")) return NULL;
    long long wtype, k;
    if (!get_i64(args[2], &wtype, "wtype") || !get_i64(args[3], &k, "K")) return NULL;
    if (k <= 0) return PyErr_Format(PyExc_ValueError, "quantize_rows: K=%lld", k);
    const size_t row_bytes = od_row_nbytes((int)wtype, k);
    if (row_bytes == 0) return PyErr_Format(PyExc_TypeError, "quantize_rows: type %lld with K=%lld", wtype, k);
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    const int weighted = nargs == 5 && args[4] != Py_None;
    if (!get_buffer(args[0], &b[0], "dst", KIND_BYTES, 1) || !get_buffer(args[1], &b[1], "src", KIND_F32, 0) ||
        (weighted && !get_buffer(args[4], &b[2], "importance", KIND_F32, 0)))
        goto done;
    if (weighted && n_items(&b[2]) != k) {
        PyErr_SetString(PyExc_ValueError, "quantize_rows: importance must hold K floats");
        goto done;
    }
    const Py_ssize_t items = n_items(&b[1]);
    const long long m = items / k;
    if (items % k != 0 || (size_t)b[0].view.len != (size_t)m * row_bytes) {
        PyErr_SetString(PyExc_ValueError, "quantize_rows: dst and src sizes do not agree with K");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = od_quantize_rows_imatrix(b[0].view.buf, b[1].view.buf, (int)wtype, m, k, weighted ? b[2].view.buf : NULL);
    Py_END_ALLOW_THREADS
    if (rc == OD_ERANGE) {
        result = Py_NewRef(Py_False);
    } else if (rc == OD_ETYPE) {
        PyErr_Format(PyExc_TypeError, "quantize_rows: no quantizer for type %lld", wtype);
    } else if (rc != OD_OK) {
        raise_code(rc, "quantize_rows");
    } else {
        result = Py_NewRef(Py_True);
    }
done:
    release_buffers(b, 3);
    return result;
}

/* ------------------------------------------------------------------ get_rows */

PyDoc_STRVAR(get_rows_doc,
             "get_rows(out, table, ttype, ids, K)\n--\n\n"
             "out[M,K] = rows ids[M] (int32) of `table` (raw GGUF bytes of rows of K weights of type ttype),\n"
             "dequantized to float32. Raises ValueError for an id outside the table.");

static PyObject *py_get_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 5, 5, "get_rows")) return NULL;
    long long ttype, k;
    if (!get_i64(args[2], &ttype, "ttype") || !get_i64(args[4], &k, "K")) return NULL;
    const size_t row_bytes = (ttype >= 0 && ttype < 64) ? od_row_nbytes((int)ttype, k) : 0;
    if (row_bytes == 0) {
        if (ttype < 0 || ttype >= 64 || !od_type_name((int)ttype))
            return PyErr_Format(PyExc_ValueError, "get_rows: unsupported GGML type id %lld", ttype);
        return PyErr_Format(PyExc_ValueError, "get_rows: K=%lld is not a positive multiple of the %s block size",
                            k, od_type_name((int)ttype));
    }
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "out", KIND_F32, 1) || !get_buffer(args[1], &b[1], "table", KIND_BYTES, 0) ||
        !get_buffer(args[3], &b[2], "ids", KIND_I32, 0))
        goto done;
    if ((size_t)b[1].view.len % row_bytes != 0) {
        PyErr_Format(PyExc_ValueError, "get_rows: table has %zd bytes, not a multiple of the %zu-byte row",
                     b[1].view.len, row_bytes);
        goto done;
    }
    const long long n_rows = (long long)((size_t)b[1].view.len / row_bytes);
    const long long m = n_items(&b[2]);
    if (n_items(&b[0]) != m * k) {
        PyErr_Format(PyExc_ValueError, "get_rows: out has %zd elements, expected M*K = %lld", n_items(&b[0]), m * k);
        goto done;
    }
    const int32_t *ids = b[2].view.buf;
    for (long long i = 0; i < m; i++)
        if (ids[i] < 0 || ids[i] >= n_rows) {
            PyErr_Format(PyExc_ValueError, "get_rows: ids[%lld] = %d is outside the table (%lld rows)", i, ids[i],
                         n_rows);
            goto done;
        }
    if (!check_disjoint(&b[0], &b[1], "out", "table") || !check_disjoint(&b[0], &b[2], "out", "ids")) goto done;
    int rc;
    RUN_MAYBE_NOGIL(m * k, rc = od_get_rows(b[0].view.buf, b[1].view.buf, (int)ttype, n_rows, ids, m, k));
    if (rc != OD_OK) {
        raise_code(rc, "get_rows");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

/* ------------------------------------------------------------------ rmsnorm */

PyDoc_STRVAR(rmsnorm_doc, "rmsnorm(out, x, weight, eps)\n--\n\n"
                          "out[M,K] = x / sqrt(mean(x^2, axis=-1) + eps) * weight[K]. out may be x.");

static PyObject *py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 4, 4, "rmsnorm")) return NULL;
    float eps;
    if (!get_f32(args[3], &eps, "eps")) return NULL;
    if (!(eps >= 0.0f)) return PyErr_Format(PyExc_ValueError, "rmsnorm: eps must be >= 0");
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "out", KIND_F32, 1) || !get_buffer(args[1], &b[1], "x", KIND_F32, 0) ||
        !get_buffer(args[2], &b[2], "weight", KIND_F32, 0))
        goto done;
    const long long k = n_items(&b[2]), total = n_items(&b[1]);
    if (k == 0 || total % k != 0 || n_items(&b[0]) != total) {
        PyErr_Format(PyExc_ValueError,
                     "rmsnorm: x has %lld elements and out %zd; both must be the same multiple of weight's %lld",
                     total, n_items(&b[0]), k);
        goto done;
    }
    if (!same_memory(&b[0], &b[1]) && !check_disjoint(&b[0], &b[1], "out", "x")) goto done;
    if (!check_disjoint(&b[0], &b[2], "out", "weight")) goto done;
    int rc;
    RUN_MAYBE_NOGIL(total, rc = od_rmsnorm(b[0].view.buf, b[1].view.buf, b[2].view.buf, total / k, k, eps));
    if (rc != OD_OK) {
        raise_code(rc, "rmsnorm");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

/* ------------------------------------------------------------------ rope */

PyDoc_STRVAR(rope_doc,
             "rope(x, positions, theta, neox, freq_factors=None)\n--\n\n"
             "Rotary embedding in place on x[M,H,D] (3-D float32), row i at positions[i] (int32, >= 0).\n"
             "neox=False: interleaved pairs (llama.cpp normal mode); neox=True: rotate-half (NEOX, qwen2).\n"
             "freq_factors: optional float32[D/2] dividing each pair's frequency (llama 3 rope_freqs).");

static PyObject *py_rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 4, 5, "rope")) return NULL;
    float theta;
    if (!get_f32(args[2], &theta, "theta")) return NULL;
    const int neox = PyObject_IsTrue(args[3]);
    if (neox < 0) return NULL;
    if (!(theta > 0.0f)) return PyErr_Format(PyExc_ValueError, "rope: theta must be > 0");
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "x", KIND_F32, 1) || !get_buffer(args[1], &b[1], "positions", KIND_I32, 0))
        goto done;
    if (b[0].view.ndim != 3) {
        PyErr_Format(PyExc_ValueError, "rope: x must be 3-D [M, H, D], got %d dimensions", b[0].view.ndim);
        goto done;
    }
    const long long m = b[0].view.shape[0], h = b[0].view.shape[1], d = b[0].view.shape[2];
    if (d % 2 != 0 || d == 0 || h == 0) {
        PyErr_Format(PyExc_ValueError, "rope: head dim D=%lld must be even and positive", d);
        goto done;
    }
    if (n_items(&b[1]) != m) {
        PyErr_Format(PyExc_ValueError, "rope: positions has %zd entries, x has M=%lld rows", n_items(&b[1]), m);
        goto done;
    }
    const int32_t *pos = b[1].view.buf;
    for (long long i = 0; i < m; i++)
        if (pos[i] < 0) {
            PyErr_Format(PyExc_ValueError, "rope: positions[%lld] = %d is negative", i, pos[i]);
            goto done;
        }
    const float *ff = NULL;
    if (nargs > 4 && args[4] != Py_None) {
        if (!get_buffer(args[4], &b[2], "freq_factors", KIND_F32, 0)) goto done;
        if (n_items(&b[2]) != d / 2) {
            PyErr_Format(PyExc_ValueError, "rope: freq_factors has %zd entries, expected D/2 = %lld", n_items(&b[2]),
                         d / 2);
            goto done;
        }
        ff = b[2].view.buf;
    }
    if (!check_disjoint(&b[0], &b[1], "x", "positions")) goto done;
    int rc;
    RUN_MAYBE_NOGIL(m * h * d, rc = od_rope(b[0].view.buf, m, h, d, pos, theta, neox, ff));
    if (rc != OD_OK) {
        raise_code(rc, "rope");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

/* ------------------------------------------------------------------ attention */

PyDoc_STRVAR(attention_doc,
             "attention(out, q, k_cache, v_cache, pos0, scale, window=0)\n--\n\n"
             "Causal GQA attention. q[M,H,D] float32; k_cache, v_cache [Hkv,C,D] float32 or float16, or uint8\n"
             "[Hkv,C,D/32*34] Q8_0 rows as kv_store_q8_0 writes them (D % 32 == 0), the same for both;\n"
             "query row i is at position p = pos0+i and sees cache entries 0..p (already written),\n"
             "or p-window+1..p with window > 0 (sliding-window attention).\n"
             "out[M, H*D] float32 (any shape with M*H*D elements). Needs H % Hkv == 0, pos0 + M <= C.");

static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 6, 7, "attention")) return NULL;
    long long pos0, window = 0;
    float scale;
    if (!get_i64(args[4], &pos0, "pos0") || !get_f32(args[5], &scale, "scale")) return NULL;
    if (nargs == 7 && !get_i64(args[6], &window, "window")) return NULL;
    if (window < 0) return PyErr_Format(PyExc_ValueError, "attention: window must be >= 0, got %lld", window);
    arg_buf b[4];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "out", KIND_F32, 1) || !get_buffer(args[1], &b[1], "q", KIND_F32, 0) ||
        !get_buffer(args[2], &b[2], "k_cache", KIND_BYTES, 0) || !get_buffer(args[3], &b[3], "v_cache", KIND_BYTES, 0))
        goto done;
    if (b[1].view.ndim != 3 || b[2].view.ndim != 3 || b[3].view.ndim != 3) {
        PyErr_SetString(PyExc_ValueError, "attention: q must be [M,H,D] and k_cache/v_cache [Hkv,C,D] (3-D)");
        goto done;
    }
    const long long m = b[1].view.shape[0], h = b[1].view.shape[1], d = b[1].view.shape[2];
    const long long hkv = b[2].view.shape[0], c = b[2].view.shape[1];
    /* the cache's element type: float32, float16, or uint8 bytes of Q8_0 rows */
    int kv_type = -1;
    static const struct { char code; Py_ssize_t itemsize; int type; } kv_types[] = {
        {'f', 4, OD_KV_F32}, {'e', 2, OD_KV_F16}, {'B', 1, OD_KV_Q8_0}};
    for (int i = 0; i < 3; i++)
        if (b[2].view.itemsize == kv_types[i].itemsize && format_is(b[2].view.format, kv_types[i].code) &&
            b[3].view.itemsize == kv_types[i].itemsize && format_is(b[3].view.format, kv_types[i].code))
            kv_type = kv_types[i].type;
    if (kv_type < 0) {
        PyErr_SetString(PyExc_ValueError, "attention: k_cache and v_cache must both be float32, float16 or uint8 (Q8_0)");
        goto done;
    }
    const long long row = kv_type == OD_KV_Q8_0 ? d / 32 * 34 : d;
    if (kv_type == OD_KV_Q8_0 && d % 32 != 0) {
        PyErr_Format(PyExc_ValueError, "attention: a Q8_0 cache needs a head dim that is a multiple of 32, got %lld", d);
        goto done;
    }
    if (b[2].view.shape[2] != row || b[3].view.shape[0] != hkv || b[3].view.shape[1] != c ||
        b[3].view.shape[2] != row) {
        PyErr_SetString(PyExc_ValueError, "attention: k_cache and v_cache must have the shape [Hkv, C, D] (Q8_0: "
                                          "[Hkv, C, D/32*34]) with q's D");
        goto done;
    }
    if (hkv == 0 || h == 0 || d == 0 || h % hkv != 0) {
        PyErr_Format(PyExc_ValueError, "attention: H=%lld must be a positive multiple of Hkv=%lld", h, hkv);
        goto done;
    }
    if (pos0 < 0 || pos0 + m > c) {
        PyErr_Format(PyExc_ValueError, "attention: rows at positions %lld..%lld do not fit the cache of %lld", pos0,
                     pos0 + m - 1, c);
        goto done;
    }
    if (n_items(&b[0]) != m * h * d) {
        PyErr_Format(PyExc_ValueError, "attention: out has %zd elements, expected M*H*D = %lld", n_items(&b[0]),
                     m * h * d);
        goto done;
    }
    if (!check_disjoint(&b[0], &b[1], "out", "q") || !check_disjoint(&b[0], &b[2], "out", "k_cache") ||
        !check_disjoint(&b[0], &b[3], "out", "v_cache"))
        goto done;
    int rc;
    RUN_MAYBE_NOGIL(m * h * d * (pos0 + m), rc = od_attention(b[0].view.buf, b[1].view.buf, b[2].view.buf,
                                                              b[3].view.buf, kv_type, m, h, hkv, c, d, pos0, scale,
                                                              window));
    if (rc != OD_OK) {
        raise_code(rc, "attention");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 4);
    return result;
}

/* ------------------------------------------------------------------ element-wise */

PyDoc_STRVAR(silu_mul_doc, "silu_mul(out, gate, up)\n--\n\n"
                           "out = silu(gate) * up, element-wise float32; out may be gate or up.");

static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 3, 3, "silu_mul")) return NULL;
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "out", KIND_F32, 1) || !get_buffer(args[1], &b[1], "gate", KIND_F32, 0) ||
        !get_buffer(args[2], &b[2], "up", KIND_F32, 0))
        goto done;
    const Py_ssize_t n = n_items(&b[0]);
    if (n_items(&b[1]) != n || n_items(&b[2]) != n) {
        PyErr_Format(PyExc_ValueError, "silu_mul: out, gate, up sizes differ (%zd, %zd, %zd)", n, n_items(&b[1]),
                     n_items(&b[2]));
        goto done;
    }
    if ((!same_memory(&b[0], &b[1]) && !check_disjoint(&b[0], &b[1], "out", "gate")) ||
        (!same_memory(&b[0], &b[2]) && !check_disjoint(&b[0], &b[2], "out", "up")))
        goto done;
    RUN_MAYBE_NOGIL(n, od_silu_mul(b[0].view.buf, b[1].view.buf, b[2].view.buf, n));
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

PyDoc_STRVAR(gelu_mul_doc, "gelu_mul(out, gate, up)\n--\n\n"
                           "out = gelu_tanh(gate) * up (GELU, tanh approximation), element-wise float32; out may be gate or up.");

static PyObject *py_gelu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 3, 3, "gelu_mul")) return NULL;
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "out", KIND_F32, 1) || !get_buffer(args[1], &b[1], "gate", KIND_F32, 0) ||
        !get_buffer(args[2], &b[2], "up", KIND_F32, 0))
        goto done;
    const Py_ssize_t n = n_items(&b[0]);
    if (n_items(&b[1]) != n || n_items(&b[2]) != n) {
        PyErr_Format(PyExc_ValueError, "gelu_mul: out, gate, up sizes differ (%zd, %zd, %zd)", n, n_items(&b[1]),
                     n_items(&b[2]));
        goto done;
    }
    if ((!same_memory(&b[0], &b[1]) && !check_disjoint(&b[0], &b[1], "out", "gate")) ||
        (!same_memory(&b[0], &b[2]) && !check_disjoint(&b[0], &b[2], "out", "up")))
        goto done;
    RUN_MAYBE_NOGIL(n, od_gelu_mul(b[0].view.buf, b[1].view.buf, b[2].view.buf, n));
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 3);
    return result;
}

PyDoc_STRVAR(add_inplace_doc, "add_inplace(x, y)\n--\n\nx += y, element-wise float32.");

static PyObject *py_add_inplace(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 2, 2, "add_inplace")) return NULL;
    arg_buf b[2];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "x", KIND_F32, 1) || !get_buffer(args[1], &b[1], "y", KIND_F32, 0)) goto done;
    const Py_ssize_t n = n_items(&b[0]);
    if (n_items(&b[1]) != n) {
        PyErr_Format(PyExc_ValueError, "add_inplace: x has %zd elements, y has %zd", n, n_items(&b[1]));
        goto done;
    }
    if (!same_memory(&b[0], &b[1]) && !check_disjoint(&b[0], &b[1], "x", "y")) goto done;
    RUN_MAYBE_NOGIL(n, od_add_inplace(b[0].view.buf, b[1].view.buf, n));
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 2);
    return result;
}

/* ------------------------------------------------------------------ argmax / topk */

PyDoc_STRVAR(argmax_doc, "argmax(x)\n--\n\nIndex of the largest float32 element (first on ties, NaNs skipped).");

static PyObject *py_argmax(PyObject *self, PyObject *arg) {
    (void)self;
    arg_buf b;
    if (!get_buffer(arg, &b, "x", KIND_F32, 0)) {
        release_buffers(&b, 1);
        return NULL;
    }
    const Py_ssize_t n = n_items(&b);
    long long best;
    RUN_MAYBE_NOGIL(n, best = od_argmax(b.view.buf, n));
    release_buffers(&b, 1);
    if (best < 0) return PyErr_Format(PyExc_ValueError, "argmax: x is empty or all NaN");
    return PyLong_FromLongLong(best);
}

static PyObject *g_numpy_empty; /* numpy.empty, imported on first use */
static PyObject *g_numpy_float32, *g_numpy_int32;

static int ensure_numpy(void) {
    if (g_numpy_empty) return 1;
    PyObject *np = PyImport_ImportModule("numpy");
    if (!np) return 0;
    g_numpy_empty = PyObject_GetAttrString(np, "empty");
    g_numpy_float32 = PyObject_GetAttrString(np, "float32");
    g_numpy_int32 = PyObject_GetAttrString(np, "int32");
    Py_DECREF(np);
    if (!g_numpy_empty || !g_numpy_float32 || !g_numpy_int32) {
        Py_CLEAR(g_numpy_empty);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(topk_doc, "topk(x, k)\n--\n\n"
                       "(values float32[k'], indices int32[k']): the k largest elements of x, best first (ties:\n"
                       "lower index first, NaNs skipped), k' = min(k, number of non-NaN elements).");

static PyObject *py_topk(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 2, 2, "topk")) return NULL;
    long long k;
    if (!get_i64(args[1], &k, "k")) return NULL;
    if (k <= 0) return PyErr_Format(PyExc_ValueError, "topk: k must be positive, got %lld", k);
    arg_buf b[3];
    memset(b, 0, sizeof(b));
    PyObject *values = NULL, *indices = NULL, *result = NULL;
    if (!get_buffer(args[0], &b[0], "x", KIND_F32, 0)) goto done;
    const Py_ssize_t n = n_items(&b[0]);
    if (n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "topk: x is too large for int32 indices");
        goto done;
    }
    if (k > n) k = n;
    if (!ensure_numpy()) goto done;
    values = PyObject_CallFunction(g_numpy_empty, "nO", (Py_ssize_t)k, g_numpy_float32);
    indices = values ? PyObject_CallFunction(g_numpy_empty, "nO", (Py_ssize_t)k, g_numpy_int32) : NULL;
    if (!values || !indices) goto done;
    if (!get_buffer(values, &b[1], "values", KIND_F32, 1) || !get_buffer(indices, &b[2], "indices", KIND_I32, 1))
        goto done;
    long long count;
    RUN_MAYBE_NOGIL(n, count = od_topk(b[0].view.buf, n, k, b[1].view.buf, b[2].view.buf));
    if (count < 0) {
        raise_code((int)count, "topk");
        goto done;
    }
    release_buffers(b, 3);
    if (count < k) {
        /* NaNs were skipped: trim */
        PyObject *v = PySequence_GetSlice(values, 0, (Py_ssize_t)count);
        PyObject *i = v ? PySequence_GetSlice(indices, 0, (Py_ssize_t)count) : NULL;
        Py_SETREF(values, v);
        Py_SETREF(indices, i);
        if (!values || !indices) goto done;
    }
    result = PyTuple_Pack(2, values, indices);
done:
    release_buffers(b, 3);
    Py_XDECREF(values);
    Py_XDECREF(indices);
    return result;
}

/* ------------------------------------------------------------------ configuration */

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long long n;
    if (!get_i64(arg, &n, "n")) return NULL;
    if (n < 0 || n > 256) return PyErr_Format(PyExc_ValueError, "set_threads: n must be in 0..256 (0 = default)");
    Py_BEGIN_ALLOW_THREADS od_set_threads((int)n);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(od_get_threads());
}

static PyObject *py_physical_cores(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(od_physical_cores());
}

static PyObject *py_isa(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(od_isa());
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (od_set_isa(name) != OD_OK)
        return PyErr_Format(PyExc_ValueError, "_set_isa: '%s' is not available (CPU features: %s)", name,
                            od_cpu_features());
    Py_RETURN_NONE;
}

static PyObject *py_cpu_features(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(od_cpu_features());
}

static PyObject *py_row_nbytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 2, 2, "row_nbytes")) return NULL;
    long long type, k;
    if (!get_i64(args[0], &type, "wtype") || !get_i64(args[1], &k, "K")) return NULL;
    const size_t bytes = (type >= 0 && type < 64) ? od_row_nbytes((int)type, k) : 0;
    if (bytes == 0) return PyErr_Format(PyExc_ValueError, "row_nbytes: unsupported type %lld or bad K=%lld", type, k);
    return PyLong_FromSize_t(bytes);
}


PyDoc_STRVAR(repack_doc,
             "repack(dst, src, wtype, K, unpack=False)\n--\n\n"
             "Load-time repacking of a weight matrix of GGML type wtype (Q4_0, Q4_K, Q4_1, Q8_0 or Q6_K) into the interleaved form\n"
             "repacked_type(wtype) (8 rows' blocks interleaved). src: uint8 buffer of N rows of wtype; dst: writable,\n"
             "not overlapping src, of N rows of the repacked type (row_nbytes(repacked_type(wtype), K) bytes each;\n"
             "Q4_K_X8 has 4 bytes more per super-block than Q4_K, the others their type's size); N must divide by 8. unpack=True does\n"
             "the inverse (src repacked, dst of wtype). Returns the type id of dst, to pass to matmul.");

static PyObject *py_repack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 4, 5, "repack")) return NULL;
    long long wtype, k;
    if (!get_i64(args[2], &wtype, "wtype") || !get_i64(args[3], &k, "K")) return NULL;
    const int unpack = nargs > 4 ? PyObject_IsTrue(args[4]) : 0;
    if (unpack < 0) return NULL;
    const int packed_type = wtype >= 0 && wtype < 64 ? od_repack_layout((int)wtype) : 0;
    if (!packed_type) return PyErr_Format(PyExc_ValueError, "repack: no repacked form of GGML type %lld", wtype);
    const size_t row_bytes = od_row_nbytes((int)wtype, k), packed_row_bytes = od_row_nbytes(packed_type, k);
    if (row_bytes == 0)
        return PyErr_Format(PyExc_ValueError, "repack: K=%lld is not a positive multiple of the %s block size", k,
                            od_type_name((int)wtype));
    const size_t src_row = unpack ? packed_row_bytes : row_bytes, dst_row = unpack ? row_bytes : packed_row_bytes;
    arg_buf b[2];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "dst", KIND_BYTES, 1) || !get_buffer(args[1], &b[1], "src", KIND_BYTES, 0)) goto done;
    const size_t bytes = (size_t)b[1].view.len, n = bytes / src_row;
    if (bytes == 0 || bytes % (src_row * OD_REPACK_ROWS) != 0 || (size_t)b[0].view.len != n * dst_row) {
        PyErr_Format(PyExc_ValueError, "repack: src has %zu bytes and dst %zd: they must hold N rows of %zu and %zu "
                     "bytes, N a positive multiple of 8", bytes, b[0].view.len, src_row, dst_row);
        goto done;
    }
    if (!check_disjoint(&b[0], &b[1], "dst", "src")) goto done;
    const int rc = od_repack(b[0].view.buf, b[1].view.buf, (int)wtype, (int64_t)n, k, unpack);
    if (rc != OD_OK) {
        raise_code(rc, "repack");
        goto done;
    }
    result = PyLong_FromLong(unpack ? (long)wtype : packed_type);
done:
    release_buffers(b, 2);
    return result;
}

static PyObject *py_repacked_type(PyObject *self, PyObject *arg) {
    (void)self;
    const long type = PyLong_AsLong(arg);
    if (type == -1 && PyErr_Occurred()) return NULL;
    const int packed = type >= 0 && type < 64 ? od_repacked_type((int)type) : 0;
    if (!packed) Py_RETURN_NONE;
    return PyLong_FromLong(packed);
}

PyDoc_STRVAR(kv_store_q8_0_doc,
             "kv_store_q8_0(cache, rows, pos0)\n--\n\n"
             "Quantize rows[M,Hkv,D] float32 (D % 32 == 0) into the Q8_0 cache uint8 [Hkv,C,D/32*34] at positions\n"
             "pos0..pos0+M-1: per 32 values the bytes of ggml's quantize_row_q8_0_ref. Needs pos0 + M <= C.");

static PyObject *py_kv_store_q8_0(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (!check_nargs(nargs, 3, 3, "kv_store_q8_0")) return NULL;
    long long pos0;
    if (!get_i64(args[2], &pos0, "pos0")) return NULL;
    arg_buf b[2];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    if (!get_buffer(args[0], &b[0], "cache", KIND_BYTES, 1) || !get_buffer(args[1], &b[1], "rows", KIND_F32, 0))
        goto done;
    if (b[0].view.ndim != 3 || b[1].view.ndim != 3 || b[0].view.itemsize != 1) {
        PyErr_SetString(PyExc_ValueError, "kv_store_q8_0: cache must be uint8 [Hkv,C,D/32*34] and rows [M,Hkv,D]");
        goto done;
    }
    const long long m = b[1].view.shape[0], hkv = b[1].view.shape[1], d = b[1].view.shape[2];
    const long long c = b[0].view.shape[1];
    if (d % 32 != 0 || b[0].view.shape[0] != hkv || b[0].view.shape[2] != d / 32 * 34) {
        PyErr_Format(PyExc_ValueError,
                     "kv_store_q8_0: rows [M,Hkv,D] need D %% 32 == 0 and a cache [Hkv,C,D/32*34], got D=%lld", d);
        goto done;
    }
    if (pos0 < 0 || pos0 + m > c) {
        PyErr_Format(PyExc_ValueError, "kv_store_q8_0: positions %lld..%lld do not fit the cache of %lld", pos0,
                     pos0 + m - 1, c);
        goto done;
    }
    if (!check_disjoint(&b[0], &b[1], "cache", "rows")) goto done;
    const int rc = od_kv_store_q8_0(b[0].view.buf, b[1].view.buf, m, hkv, c, d, pos0);
    if (rc != OD_OK) {
        raise_code(rc, "kv_store_q8_0");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    release_buffers(b, 2);
    return result;
}

static PyMethodDef methods[] = {
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, matmul_doc},
    {"_quantize_activations", (PyCFunction)(void (*)(void))py_quantize_activations, METH_FASTCALL,
     quantize_activations_doc},
    {"get_rows", (PyCFunction)(void (*)(void))py_get_rows, METH_FASTCALL, get_rows_doc},
    {"quantize_rows", (PyCFunction)(void (*)(void))py_quantize_rows, METH_FASTCALL, quantize_rows_doc},
    {"rmsnorm", (PyCFunction)(void (*)(void))py_rmsnorm, METH_FASTCALL, rmsnorm_doc},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, rope_doc},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL, attention_doc},
    {"kv_store_q8_0", (PyCFunction)(void (*)(void))py_kv_store_q8_0, METH_FASTCALL, kv_store_q8_0_doc},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, silu_mul_doc},
    {"gelu_mul", (PyCFunction)(void (*)(void))py_gelu_mul, METH_FASTCALL, gelu_mul_doc},
    {"add_inplace", (PyCFunction)(void (*)(void))py_add_inplace, METH_FASTCALL, add_inplace_doc},
    {"argmax", py_argmax, METH_O, argmax_doc},
    {"topk", (PyCFunction)(void (*)(void))py_topk, METH_FASTCALL, topk_doc},
    {"set_threads", py_set_threads, METH_O, "set_threads(n)\n--\n\nResize the thread pool (0 = physical cores)."},
    {"get_threads", py_get_threads, METH_NOARGS, "get_threads()\n--\n\nThreads used by the kernels."},
    {"physical_cores", py_physical_cores, METH_NOARGS,
     "physical_cores()\n--\n\nPhysical cores available to this process."},
    {"isa", py_isa, METH_NOARGS, "isa()\n--\n\nCode path in use: 'scalar', 'avx2' or 'neon'."},
    {"_set_isa", py_set_isa, METH_O, "_set_isa(name)\n--\n\nTest hook: force a code path (ValueError if unavailable)."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "cpu_features()\n--\n\nRelevant CPU features detected."},
    {"row_nbytes", (PyCFunction)(void (*)(void))py_row_nbytes, METH_FASTCALL,
     "row_nbytes(wtype, K)\n--\n\nBytes of one row of K weights of GGML type wtype."},
    {"repack", (PyCFunction)(void (*)(void))py_repack, METH_FASTCALL, repack_doc},
    {"repacked_type", py_repacked_type, METH_O,
     "repacked_type(wtype)\n--\n\nType id of the faster repacked form of wtype on the current code path (see repack), "
     "or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ondevice._kernels",
    .m_doc = "C kernels of the ondevice runtime (matmul over GGUF weight types, norms, rope, attention).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *mod = PyModule_Create(&module_def);
    if (!mod) return NULL;
    static const struct {
        const char *name;
        int value;
    } type_ids[] = {{"F32", 0}, {"F16", 1},  {"Q4_0", 2},  {"Q4_1", 3},  {"Q5_0", 6},
                    {"Q5_1", 7}, {"Q8_0", 8}, {"Q3_K", 11}, {"Q4_K", 12}, {"Q5_K", 13}, {"Q6_K", 14}, {"IQ4_NL", 20}, {"IQ4_XS", 23}, {"BF16", 30}};
    PyObject *types = PyDict_New();
    if (!types) goto fail;
    for (size_t i = 0; i < sizeof(type_ids) / sizeof(type_ids[0]); i++) {
        PyObject *v = PyLong_FromLong(type_ids[i].value);
        if (!v || PyDict_SetItemString(types, type_ids[i].name, v) != 0) {
            Py_XDECREF(v);
            Py_DECREF(types);
            goto fail;
        }
        Py_DECREF(v);
    }
    if (PyModule_AddIntConstant(mod, "Q4_0_X8", OD_REPACK_Q4_0_X8) != 0 ||
        PyModule_AddIntConstant(mod, "Q4_K_X8", OD_REPACK_Q4_K_X8) != 0 ||
        PyModule_AddIntConstant(mod, "Q4_1_X8", OD_REPACK_Q4_1_X8) != 0 ||
        PyModule_AddIntConstant(mod, "Q8_0_X8", OD_REPACK_Q8_0_X8) != 0 ||
        PyModule_AddIntConstant(mod, "Q6_K_X8", OD_REPACK_Q6_K_X8) != 0 ||
        PyModule_AddIntConstant(mod, "MATMUL_EXACT_ROWS", OD_MATMUL_EXACT_ROWS) != 0) {
        Py_DECREF(types);
        goto fail;
    }
    if (PyModule_AddObject(mod, "SUPPORTED_TYPES", types) != 0) {
        Py_DECREF(types);
        goto fail;
    }
    return mod;
fail:
    Py_DECREF(mod);
    return NULL;
}
