"""Tests of the C kernels (ondevice._kernels) against numpy references, on every ISA path.

Tolerances (all relative to |x| @ |W|^T, the sum of absolute products, so they hold for any data):
- quantized weights: the kernel must equal x_q @ W^T, where x_q is the exactly emulated 8-bit
  activation rounding (kernel_ref.quantize_activations) and W the gguf-py dequantization, to
  1e-5 (float summation order only); and it must stay within activation_error_bound (half a
  quantization step per activation, summed) of the unquantized x @ W^T.
- float weights (F32/F16/BF16): 1e-5 of the exact product.
- SIMD paths vs the scalar path: 1e-5.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import kernel_ref as ref
import numpy as np
import pytest
from conftest import unavailable
from gguf import GGMLQuantizationType as QT

K = pytest.importorskip("ondevice._kernels")

DEFAULT_ISA = K.isa()


ISAS = ref.available_isas(K)
SIMD_ISAS = [name for name in ISAS if name != "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    K._set_isa(request.param)
    yield request.param
    K._set_isa(DEFAULT_ISA)


def _run_matmul(w: np.ndarray, wtype: int, x: np.ndarray, n: int, accumulate_into: np.ndarray | None = None) -> np.ndarray:
    m, k = x.shape
    out = np.zeros((m, n), np.float32) if accumulate_into is None else accumulate_into.copy()
    K.matmul(out, w, int(wtype), x, k, accumulate_into is not None)
    return out


def _activations(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 5] *= 30.0  # an outlier channel, like real residual streams
    if m > 2:
        x[1, :64] = 0.0  # an all-zero block (scale 0)
    return x


MATMUL_SHAPES = [(1, 19, 576), (7, 70, 576), (1, 33, 1536), (7, 45, 256), (33, 40, 1536), (5, 130, 256), (6, 3, 256)]


def _check_matmul(out: np.ndarray, x: np.ndarray, w: np.ndarray, wtype: int) -> None:
    k = x.shape[1]
    quantized = wtype not in ref.FLOAT_TYPES
    w_dense = ref.dequantize(w, wtype, k)
    mag = ref.magnitude(x, w_dense) + 1e-30
    expected = ref.matmul(x, w, wtype, k, quantized)
    err = np.abs(out - expected) / mag
    assert err.max() < 1e-5, f"max relative error {err.max():.3g} vs emulated reference"
    if quantized:
        exact = ref.matmul(x, w, wtype, k, False)
        bound = ref.activation_error_bound(x, w, wtype, k) + 1e-5 * mag
        assert np.all(np.abs(out - exact) <= bound)


@pytest.mark.parametrize("wtype", ref.ALL_TYPES, ids=lambda t: QT(t).name)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_matches_reference(isa, wtype, shape):
    m, n, k = shape
    if k % ref.TYPE_LAYOUT[wtype][0]:
        pytest.skip("K-quants need K % 256 == 0")
    rng = np.random.default_rng(hash((int(wtype), shape)) % 2**32)
    w = ref.make_weights(wtype, n, k, rng)
    x = _activations(rng, m, k)
    out = _run_matmul(w, wtype, x, n)
    _check_matmul(out, x, w, wtype)


@pytest.mark.parametrize("wtype", ref.QUANT_TYPES, ids=lambda t: QT(t).name)
def test_matmul_random_bytes(isa, wtype):
    """Every bit pattern of the quant bytes (q8 = -128, all nibbles 15, all high bits set...)."""
    rng = np.random.default_rng(7 + int(wtype))
    for m, n, k in [(1, 37, 512), (9, 37, 512)]:
        w = ref.make_weights(wtype, n, k, rng, random_bytes=True)
        x = _activations(rng, m, k)
        _check_matmul(_run_matmul(w, wtype, x, n), x, w, wtype)


@pytest.mark.parametrize("wtype", ref.FLOAT_TYPES, ids=lambda t: QT(t).name)
def test_matmul_float_odd_k(isa, wtype):
    """Float weights allow any K: vector tails must be handled."""
    rng = np.random.default_rng(21)
    for m, n, k in [(1, 9, 100), (6, 17, 37), (2, 5, 7)]:
        w = ref.make_weights(wtype, n, k, rng)
        x = _activations(rng, m, k) if k >= 6 else rng.standard_normal((m, k)).astype(np.float32)
        _check_matmul(_run_matmul(w, wtype, x, n), x, w, wtype)


@pytest.mark.parametrize("wtype", [QT.Q4_1, QT.F16], ids=lambda t: QT(t).name)
def test_matmul_accumulate(isa, wtype):
    rng = np.random.default_rng(3)
    m, n, k = 3, 50, 256
    w = ref.make_weights(wtype, n, k, rng)
    x = _activations(rng, m, k)
    base = rng.standard_normal((m, n)).astype(np.float32)
    plain = _run_matmul(w, wtype, x, n)
    summed = _run_matmul(w, wtype, x, n, accumulate_into=base)
    np.testing.assert_allclose(summed, base + plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("simd", SIMD_ISAS)
@pytest.mark.parametrize("wtype", ref.ALL_TYPES, ids=lambda t: QT(t).name)
def test_matmul_simd_matches_scalar(simd, wtype):
    rng = np.random.default_rng(11 + int(wtype))
    for m, n, k in [(1, 67, 1536), (4, 16, 256), (13, 83, 512), (64, 48, 256)]:
        w = ref.make_weights(wtype, n, k, rng)
        x = _activations(rng, m, k)
        try:
            K._set_isa("scalar")
            expected = _run_matmul(w, wtype, x, n)
            K._set_isa(simd)
            got = _run_matmul(w, wtype, x, n)
        finally:
            K._set_isa(DEFAULT_ISA)
        mag = ref.magnitude(x, ref.dequantize(w, wtype, k)) + 1e-30
        assert (np.abs(got - expected) / mag).max() < 1e-5, (m, n, k)



# ------------------------------------------------------------------ load-time repacking (Q4_0 -> Q4_0_X8 etc.)

REPACK_TYPES = {QT.Q4_0: K.Q4_0_X8, QT.Q4_K: K.Q4_K_X8, QT.Q4_1: K.Q4_1_X8, QT.Q8_0: K.Q8_0_X8, QT.Q6_K: K.Q6_K_X8}
X8_NAMES = {packed: f"{QT(base).name}_X8" for base, packed in REPACK_TYPES.items()}
# the repacked layouts each code path has kernels for (elsewhere od_repacked_type says None)
ISA_REPACKS = {"avx2": {QT.Q4_0, QT.Q4_K, QT.Q4_1, QT.Q6_K}, "avx512": set(REPACK_TYPES)}
REPACK_SHAPES = [(1, 64, 256), (2, 24, 512), (3, 40, 1536), (4, 16, 256), (9, 48, 512), (16, 24, 512), (17, 16, 256),
                 (64, 32, 256)]


def _repack(w: np.ndarray, wtype: int, k: int) -> np.ndarray:
    packed_type = REPACK_TYPES[wtype]
    packed = np.empty((w.shape[0], K.row_nbytes(packed_type, k)), np.uint8)
    assert K.repack(packed, w, int(wtype), k) == packed_type
    return packed


@pytest.mark.parametrize("random_bytes", [False, True], ids=["quantized", "random-bytes"])
@pytest.mark.parametrize("wtype", list(REPACK_TYPES), ids=lambda t: QT(t).name)
def test_repack_round_trip(wtype, random_bytes):
    rng = np.random.default_rng(41)
    n, k = 40, 512
    w = ref.make_weights(wtype, n, k, rng, random_bytes=random_bytes)
    packed = _repack(w, wtype, k)
    assert packed.shape != w.shape or not np.array_equal(packed, w)  # the layout really changed...
    back = np.empty_like(w)
    assert K.repack(back, packed, int(wtype), k, True) == int(wtype)
    np.testing.assert_array_equal(back, w)  # ...and nothing was lost


@pytest.mark.parametrize("random_bytes", [False, True], ids=["quantized", "random-bytes"])
@pytest.mark.parametrize("shape", REPACK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wtype", list(REPACK_TYPES), ids=lambda t: QT(t).name)
def test_repacked_matmul_matches_reference_and_scalar(isa, wtype, shape, random_bytes):
    """The repacked types on every path (the SIMD kernel where there is one, unpacking otherwise) against the
    emulated reference and the scalar path on the original rows, GEMV (M < 4) and GEMM (M >= 4) schedules."""
    m, n, k = shape
    rng = np.random.default_rng(hash((int(wtype), shape)) % 2**32 + random_bytes)
    w = ref.make_weights(wtype, n, k, rng, random_bytes=random_bytes)
    x = _activations(rng, m, k)
    packed_type = REPACK_TYPES[wtype]
    got = _run_matmul(_repack(w, wtype, k), packed_type, x, n)
    _check_matmul(got, x, w, wtype)
    try:
        K._set_isa("scalar")
        expected = _run_matmul(w, wtype, x, n)
    finally:
        K._set_isa(isa)
    mag = ref.magnitude(x, ref.dequantize(w, wtype, k)) + 1e-30
    assert (np.abs(got - expected) / mag).max() < 1e-5
    base = rng.standard_normal((m, n)).astype(np.float32)
    summed = _run_matmul(_repack(w, wtype, k), packed_type, x, n, accumulate_into=base)
    np.testing.assert_allclose(summed, base + got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wtype", list(REPACK_TYPES), ids=lambda t: QT(t).name)
def test_get_rows_of_a_repacked_table(isa, wtype):
    """A tied embedding is repacked once for the output layer; get_rows reads its rows out of their groups."""
    rng = np.random.default_rng(int(wtype) + 3)
    n, k = 48, 512
    w = ref.make_weights(wtype, n, k, rng)
    ids = np.array([0, 7, 8, 47, 13, 13], np.int32)
    expected = np.empty((len(ids), k), np.float32)
    K.get_rows(expected, w, int(wtype), ids, k)
    got = np.full_like(expected, np.nan)
    K.get_rows(got, _repack(w, wtype, k), REPACK_TYPES[wtype], ids, k)
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError):  # a repacked table holds whole groups of 8 rows
        K.get_rows(got, _repack(w, wtype, k)[:40].copy()[:, :].reshape(-1)[: 44 * K.row_nbytes(REPACK_TYPES[wtype], k)],
                   REPACK_TYPES[wtype], ids[:1], k)


def test_repacked_matmul_threads_agree():
    rng = np.random.default_rng(43)
    n, k = 256, 512
    x = _activations(rng, 1, k)
    threads = K.get_threads()
    for wtype, packed_type in REPACK_TYPES.items():
        packed = _repack(ref.make_weights(wtype, n, k, rng), wtype, k)
        try:
            K.set_threads(1)
            one = _run_matmul(packed, packed_type, x, n)
            K.set_threads(2)
            two = _run_matmul(packed, packed_type, x, n)
        finally:
            K.set_threads(threads)
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("wtype", [*ref.ALL_TYPES, *X8_NAMES], ids=lambda t: X8_NAMES.get(t) or QT(t).name)
def test_matmul_rows_up_to_exact_rows_equal_single_rows(isa, wtype):
    """The contract batched decoding and speculative verification rely on: with up to MATMUL_EXACT_ROWS
    activation rows, each row's result has exactly the bits of a one-row call (one more row may differ)."""
    base = {v: k for k, v in REPACK_TYPES.items()}.get(wtype, wtype)
    n, k = 72, 512
    rng = np.random.default_rng(int(wtype) + 77)
    w = ref.make_weights(base, n, k, rng)
    if base != wtype:
        if K.repacked_type(int(base)) is None:
            pytest.skip("no repacked kernel on this ISA (the unpacking path is the base type's)")
        w = _repack(w, base, k)
    rows = K.MATMUL_EXACT_ROWS
    x = _activations(rng, rows, k)
    singles = np.concatenate([_run_matmul(w, wtype, x[i:i + 1], n) for i in range(rows)])
    for m in (2, 3, 4, 5, 8, rows):
        np.testing.assert_array_equal(_run_matmul(w, wtype, x[:m], n), singles[:m], err_msg=f"M={m}")
    threads = K.get_threads()
    try:
        K.set_threads(1)
        np.testing.assert_array_equal(_run_matmul(w, wtype, x, n), singles)
    finally:
        K.set_threads(threads)


# the repacked layouts whose rows keep their one-row bits for every M on a path (prefill included), so that a
# prompt evaluated in pieces (the prompt cache, chunked prefill in a batch) gets the K/V of one whole pass
ISA_ALL_M_EXACT = {"avx2": {QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K}, "avx512": set(REPACK_TYPES)}


@pytest.mark.parametrize("wtype", list(REPACK_TYPES), ids=lambda t: QT(t).name)
def test_repacked_rows_keep_one_row_bits_for_every_m(isa, wtype):
    if wtype not in ISA_ALL_M_EXACT.get(isa, ()):
        pytest.skip(f"{isa}: the {QT(wtype).name} GEMM rounds differently from its one-row schedule")
    n, k = 40, 512
    rng = np.random.default_rng(int(wtype) + 91)
    w = _repack(ref.make_weights(wtype, n, k, rng), wtype, k)
    x = _activations(rng, 67, k)
    singles = np.concatenate([_run_matmul(w, REPACK_TYPES[wtype], x[i:i + 1], n) for i in range(len(x))])
    for m in (K.MATMUL_EXACT_ROWS + 1, 33, 67):
        np.testing.assert_array_equal(_run_matmul(w, REPACK_TYPES[wtype], x[:m], n), singles[:m], err_msg=f"M={m}")


def test_repack_bad_arguments():
    rng = np.random.default_rng(44)
    w = ref.make_weights(QT.Q4_0, 12, 256, rng)
    with pytest.raises(ValueError, match="multiple of 8"):
        K.repack(np.empty_like(w), w, int(QT.Q4_0), 256)  # 12 rows
    w8 = w[:8].copy()
    with pytest.raises(ValueError, match="no repacked form"):
        K.repack(np.empty_like(w8), w8, int(QT.Q5_0), 256)
    with pytest.raises(ValueError):
        K.repack(np.empty(w8.size - 18, np.uint8), w8, int(QT.Q4_0), 256)
    with pytest.raises(ValueError):
        K.repack(w8, w8, int(QT.Q4_0), 256)  # in place would overwrite what it reads
    assert K.repacked_type(int(QT.Q5_0)) is None
    for base, packed in REPACK_TYPES.items():
        assert K.repacked_type(int(base)) == (packed if base in ISA_REPACKS.get(K.isa(), ()) else None)

def test_matmul_thread_counts_agree():
    rng = np.random.default_rng(5)
    w = ref.make_weights(QT.Q4_1, 301, 576, rng)
    x = _activations(rng, 5, 576)
    before = K.get_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            K.set_threads(threads)
            assert K.get_threads() == threads
            results.append(_run_matmul(w, QT.Q4_1, x, 301))
    finally:
        K.set_threads(before)
    # same per-row arithmetic whatever the split: bit-identical
    assert all(np.array_equal(results[0], r) for r in results[1:])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kernels_work_after_fork():
    """multiprocessing's fork start method: the child has no pool threads; they must be respawned."""
    import signal

    rng = np.random.default_rng(14)
    w = ref.make_weights(QT.Q4_1, 300, 576, rng)
    x = _activations(rng, 3, 576)
    K.set_threads(2)
    expected = _run_matmul(w, QT.Q4_1, x, 300)
    pos = np.arange(3, dtype=np.int32)
    q = rng.standard_normal((3, 2, 8)).astype(np.float32)
    pid = os.fork()
    if pid == 0:  # child: any failure, exception or hang -> non-zero exit
        code = 1
        try:
            signal.alarm(60)
            got = _run_matmul(w, QT.Q4_1, x, 300)
            K.rope(q, pos, 10000.0, False)
            code = 0 if np.array_equal(got, expected) and K.get_threads() == 2 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# ------------------------------------------------------------------ other kernels


@pytest.mark.parametrize("ttype", ref.ALL_TYPES, ids=lambda t: QT(t).name)
def test_get_rows(isa, ttype):
    rng = np.random.default_rng(int(ttype))
    k = 512
    table = ref.make_weights(ttype, 23, k, rng)
    dense = ref.dequantize(table, ttype, k)
    ids = np.array([0, 22, 5, 5, 17], np.int32)
    out = np.empty((len(ids), k), np.float32)
    K.get_rows(out, table, int(ttype), ids, k)
    np.testing.assert_allclose(out, dense[ids], rtol=1e-6, atol=1e-9)


def test_rmsnorm(isa):
    rng = np.random.default_rng(1)
    for m, k in [(1, 576), (7, 1536), (3, 100)]:
        x = rng.standard_normal((m, k)).astype(np.float32) * 3
        weight = rng.standard_normal(k).astype(np.float32)
        out = np.empty_like(x)
        K.rmsnorm(out, x, weight, 1e-5)
        np.testing.assert_allclose(out, ref.rmsnorm(x, weight, 1e-5), rtol=2e-5, atol=2e-5)
        K.rmsnorm(x, x, weight, 1e-5)  # in place
        np.testing.assert_allclose(x, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(isa, neox):
    rng = np.random.default_rng(2)
    for m, h, d, positions in [
        (1, 9, 64, [37]),
        (7, 3, 64, list(range(100, 107))),
        (4, 2, 128, [0, 5000, 3, 70000]),  # 70000 exceeds the cached table: computed on the fly
        (3, 1, 6, [1, 2, 3]),
    ]:
        x = rng.standard_normal((m, h, d)).astype(np.float32)
        pos = np.array(positions, np.int32)
        expected = ref.rope(x, pos, 100000.0, neox)
        K.rope(x, pos, 100000.0, neox)
        np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_rope_freq_factors(isa):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 4, 64)).astype(np.float32)
    pos = np.arange(10, 15, dtype=np.int32)
    factors = rng.uniform(1.0, 8.0, 32).astype(np.float32)
    expected = ref.rope(x, pos, 500000.0, False, factors)
    K.rope(x, pos, 500000.0, False, factors)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_attention(isa, kv_dtype):
    rng = np.random.default_rng(6)
    h, hkv, d, c = 9, 3, 64, 300
    k_cache = rng.standard_normal((hkv, c, d)).astype(kv_dtype)
    v_cache = rng.standard_normal((hkv, c, d)).astype(kv_dtype)
    for m, pos0 in [(1, 0), (1, 200), (7, 0), (20, 5), (37, 263)]:
        q = (rng.standard_normal((m, h, d)) * 2).astype(np.float32)
        out = np.empty((m, h * d), np.float32)
        K.attention(out, q, k_cache, v_cache, pos0, 1 / 8)
        expected = ref.attention(q, k_cache, v_cache, pos0, 1 / 8)
        if kv_dtype == np.float32:
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=2e-5)
            continue
        # fp16 probabilities: a p within float32 noise of an fp16 rounding boundary may round the other way
        # than in the float64 reference (one fp16 ulp of p, <= 4.9e-4 times |v|); rare, and nothing else differs
        close = np.isclose(out, expected, rtol=1e-4, atol=2e-5)
        assert close.mean() > 0.99 and np.abs(out - expected).max() < 2e-3


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
def test_sliding_window_attention(isa, kv_dtype):
    """window > 0: row at position p sees keys p-window+1..p (rows before the window's end as one block, later
    ones each on the advanced cache), prefill and decode alike."""
    rng = np.random.default_rng(16)
    h, hkv, d, c = 4, 2, 32, 120
    k_cache = rng.standard_normal((hkv, c, d)).astype(kv_dtype)
    v_cache = rng.standard_normal((hkv, c, d)).astype(kv_dtype)
    for m, pos0, window in [(1, 0, 8), (1, 100, 8), (30, 0, 8), (25, 10, 16), (40, 70, 50), (5, 3, 100)]:
        q = (rng.standard_normal((m, h, d)) * 2).astype(np.float32)
        out = np.empty((m, h * d), np.float32)
        K.attention(out, q, k_cache, v_cache, pos0, 0.2, window)
        expected = ref.attention(q, k_cache, v_cache, pos0, 0.2, window)
        tol = (1e-4, 2e-5) if kv_dtype == np.float32 else (2e-3, 2e-3)
        np.testing.assert_allclose(out, expected, rtol=tol[0], atol=tol[1])
        unwindowed = ref.attention(q, k_cache, v_cache, pos0, 0.2)
        assert (pos0 + m <= window) == np.allclose(expected, unwindowed)  # the window really masks
    with pytest.raises(ValueError, match="window"):
        K.attention(np.empty((1, h * d), np.float32), q[:1], k_cache, v_cache, 0, 0.2, -1)


def test_attention_odd_head_dim(isa):
    rng = np.random.default_rng(13)
    h, hkv, d, c = 4, 2, 20, 40
    k_cache = rng.standard_normal((hkv, c, d)).astype(np.float32)
    v_cache = rng.standard_normal((hkv, c, d)).astype(np.float32)
    for m, pos0 in [(1, 9), (11, 3)]:
        q = rng.standard_normal((m, h, d)).astype(np.float32)
        out = np.empty((m, h * d), np.float32)
        K.attention(out, q, k_cache, v_cache, pos0, 0.2)
        np.testing.assert_allclose(out, ref.attention(q, k_cache, v_cache, pos0, 0.2), rtol=1e-4, atol=2e-5)


def test_attention_extreme_scores_are_stable(isa):
    """Large logits must not overflow: softmax is computed relative to the row maximum."""
    h, hkv, d, c = 2, 1, 16, 8
    k_cache = np.zeros((hkv, c, d), np.float32)
    k_cache[0, :, 0] = np.arange(c) * 100.0
    v_cache = np.arange(hkv * c * d, dtype=np.float32).reshape(hkv, c, d)
    q = np.ones((4, h, d), np.float32)
    out = np.empty((4, h * d), np.float32)
    K.attention(out, q, k_cache, v_cache, 4, 1.0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref.attention(q, k_cache, v_cache, 4, 1.0), rtol=1e-5, atol=1e-4)


def test_silu_mul_and_add(isa):
    rng = np.random.default_rng(8)
    for n in (1, 7, 1536, 100003):
        gate = (rng.standard_normal(n) * 4).astype(np.float32)
        gate[0] = -100.0  # exp overflow region
        up = rng.standard_normal(n).astype(np.float32)
        out = np.empty_like(gate)
        K.silu_mul(out, gate, up)
        np.testing.assert_allclose(out, ref.silu_mul(gate, up), rtol=2e-6, atol=1e-6)
        gate[-1] = 100.0 if n > 1 else gate[-1]
        K.gelu_mul(out, gate, up)
        np.testing.assert_allclose(out, ref.gelu_mul(gate, up), rtol=1e-5, atol=1e-6)
        x = gate.copy()
        K.add_inplace(x, up)
        np.testing.assert_array_equal(x, gate + up)


def test_argmax_and_topk():
    x = np.array([1.0, 5.0, np.nan, 5.0, -2.0, 3.0], np.float32)
    assert K.argmax(x) == 1
    values, indices = K.topk(x, 3)
    assert indices.tolist() == [1, 3, 5] and values.tolist() == [5.0, 5.0, 3.0]
    assert values.dtype == np.float32 and indices.dtype == np.int32
    values, indices = K.topk(x, 10)  # k > count of non-NaN: 5 results
    assert indices.tolist() == [1, 3, 5, 0, 4]
    rng = np.random.default_rng(9)
    logits = rng.standard_normal(49152).astype(np.float32)
    assert K.argmax(logits) == int(np.argmax(logits))
    values, indices = K.topk(logits, 40)
    order = np.argsort(-logits, kind="stable")[:40]
    assert indices.tolist() == order.tolist()
    np.testing.assert_array_equal(values, logits[order])


# ------------------------------------------------------------------ argument checking


def test_bad_arguments_raise_value_error():
    rng = np.random.default_rng(10)
    w = ref.make_weights(QT.Q4_1, 8, 64, rng)
    x = np.ones((2, 64), np.float32)
    out = np.empty((2, 8), np.float32)
    K.matmul(out, w, int(QT.Q4_1), x, 64)  # the valid call
    cases = [
        lambda: K.matmul(out, w, 99, x, 64),  # unknown type id
        lambda: K.matmul(out, w, 4, x, 64),  # removed type id
        lambda: K.matmul(out, w, -1, x, 64),
        lambda: K.matmul(out, w, int(QT.Q4_1), x, 48),  # K not a block multiple
        lambda: K.matmul(out, w[:7], int(QT.Q4_1), x, 64),  # too few weight bytes
        lambda: K.matmul(out, w, int(QT.Q4_K), x, 64),  # K-quant with K % 256
        lambda: K.matmul(np.empty((2, 9), np.float32), w, int(QT.Q4_1), x, 64),  # N mismatch
        lambda: K.matmul(out, w, int(QT.Q4_1), np.ones((2, 65), np.float32), 64),  # x not a multiple of K
        lambda: K.matmul(out, w, int(QT.Q4_1), x.astype(np.float64), 64),  # dtype
        lambda: K.matmul(out, w, int(QT.Q4_1), np.ones((64, 4), np.float32).T, 64),  # non-contiguous
        lambda: K.matmul(out.astype(np.int32), w, int(QT.Q4_1), x, 64),  # int32 out (itemsize 4)
        lambda: K.matmul(np.frombuffer(bytes(64), np.float32).reshape(2, 8), w, int(QT.Q4_1), x, 64),  # read-only
        lambda: K.matmul(x[:, :8], w, int(QT.Q4_1), x, 64),  # non-contiguous out
        lambda: K.get_rows(np.empty((1, 64), np.float32), w, int(QT.Q4_1), np.array([8], np.int32), 64),
        lambda: K.get_rows(np.empty((1, 64), np.float32), w, int(QT.Q4_1), np.array([-1], np.int32), 64),
        lambda: K.get_rows(np.empty((1, 64), np.float32), w, int(QT.Q4_1), np.array([0], np.int64), 64),
        lambda: K.get_rows(np.empty((2, 64), np.float32), w, int(QT.Q4_1), np.array([0], np.int32), 64),
        lambda: K.rmsnorm(np.empty(63, np.float32), x, np.ones(64, np.float32), 1e-5),
        lambda: K.rmsnorm(np.empty_like(x), x, np.ones(63, np.float32), 1e-5),
        lambda: K.rmsnorm(x[:, 1:], x[:, :63], np.ones(63, np.float32), 1e-5),
        lambda: K.rope(np.ones((2, 3, 5), np.float32), np.zeros(2, np.int32), 1e4, False),  # odd D
        lambda: K.rope(np.ones((2, 3, 4), np.float32), np.zeros(3, np.int32), 1e4, False),
        lambda: K.rope(np.ones((2, 3, 4), np.float32), np.array([0, -1], np.int32), 1e4, False),
        lambda: K.rope(np.ones((2, 12), np.float32), np.zeros(2, np.int32), 1e4, False),  # not 3-D
        lambda: K.rope(np.ones((2, 3, 4), np.float32), np.zeros(2, np.int32), 1e4, False, np.ones(3, np.float32)),
        lambda: K.silu_mul(np.empty(3, np.float32), np.ones(4, np.float32), np.ones(4, np.float32)),
        lambda: K.add_inplace(np.ones(4, np.float32), np.ones(5, np.float32)),
        lambda: K.topk(np.ones(4, np.float32), 0),
        lambda: K.argmax(np.ones(0, np.float32)),
        lambda: K._set_isa("sparc"),
        lambda: K.set_threads(-1),
    ]
    buf = np.zeros((2, 64), np.float32)
    cases.append(lambda: K.matmul(buf.reshape(-1)[:16], w, int(QT.Q4_1), buf, 64))  # out overlaps x
    q = np.ones((2, 4, 8), np.float32)
    kc = np.ones((2, 10, 8), np.float32)
    attn_out = np.empty((2, 32), np.float32)
    K.attention(attn_out, q, kc, kc, 8, 0.3)  # the valid call
    cases += [
        lambda: K.attention(attn_out, q, kc, kc, 9, 0.3),  # pos0 + M > C
        lambda: K.attention(attn_out, q, kc, kc, -1, 0.3),
        lambda: K.attention(attn_out, np.ones((2, 3, 8), np.float32), kc, kc, 0, 0.3),  # H % Hkv
        lambda: K.attention(attn_out, q, kc, kc.astype(np.float16), 0, 0.3),  # dtype mismatch
        lambda: K.attention(attn_out, q, kc[:, :, :4].copy(), kc[:, :, :4].copy(), 0, 0.3),  # D mismatch
        lambda: K.attention(np.empty((2, 31), np.float32), q, kc, kc, 0, 0.3),
        lambda: K.attention(attn_out, q.reshape(2, 32), kc, kc, 0, 0.3),  # q not 3-D
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
        assert i >= 0
    with pytest.raises(TypeError):
        K.matmul(out, [1, 2, 3], int(QT.Q4_1), x, 64)


def test_accepts_mmap_and_memoryview(tmp_path):
    """Weights straight from a read-only mapping, as the runtime does with GGUF files."""
    import mmap

    rng = np.random.default_rng(12)
    w = ref.make_weights(QT.Q8_0, 16, 256, rng)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 32 + w.tobytes())
    x = _activations(rng, 2, 256)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)[32:]
        out = np.empty((2, 16), np.float32)
        K.matmul(out, view, int(QT.Q8_0), x, 256)
        view.release()
    np.testing.assert_array_equal(out, _run_matmul(w, QT.Q8_0, x, 16))


def test_config_and_env_override():
    assert K.physical_cores() >= 1
    assert K.get_threads() >= 1
    assert K.isa() in ("scalar", "avx2", "avx512", "neon")
    assert isinstance(K.cpu_features(), str)
    assert K.row_nbytes(int(QT.Q4_1), 576) == 18 * 20
    env = dict(os.environ, ONDEVICE_ISA="scalar", ONDEVICE_THREADS="3")
    code = "import ondevice._kernels as k; print(k.isa(), k.get_threads())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["scalar", "3"]


# ------------------------------------------------------------------ NEON (aarch64) under emulation

REPO = Path(__file__).resolve().parents[1]


def _build_neon_check(cc: str) -> Path:
    """Cross-compiles the check once per source content (cached in the temp dir: the build takes
    most of this test's time), objects in parallel."""
    import hashlib
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    sources = sorted((REPO / "kernels").glob("*.c")) + [REPO / "tests" / "kernels_neon_check.c"]
    digest = hashlib.sha256(cc.encode())
    for path in sources + sorted((REPO / "kernels").glob("*.h")):
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = Path(tempfile.gettempdir()) / f"ondevice-neon-check-{digest.hexdigest()[:16]}"
    exe = out_dir / "kernels_neon_check"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O1", "-pthread", "-std=c11", f"-I{REPO / 'kernels'}"]

    def compile_one(src: Path) -> Path:
        obj = out_dir / (src.stem + ".o")
        subprocess.run([cc, *flags, "-c", str(src), "-o", str(obj)], check=True, timeout=600)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_one, sources))
    partial = out_dir / "kernels_neon_check.partial"
    subprocess.run([cc, "-static", "-pthread", *map(str, objects), "-lm", "-o", str(partial)], check=True, timeout=600)
    partial.rename(exe)  # atomic: a concurrent run never sees a half-written binary
    return exe


def test_neon_matches_scalar_under_qemu():
    """Builds kernels/*.c + tests/kernels_neon_check.c for aarch64 and runs it: every kernel on the
    NEON paths (with and without the dot-product extension) must match the scalar path."""
    native = platform.machine() in ("aarch64", "arm64") and sys.platform == "linux"
    cc = shutil.which("cc") if native else shutil.which("aarch64-linux-gnu-gcc")
    qemu = None if native else shutil.which("qemu-aarch64")
    if cc is None or (not native and qemu is None):
        unavailable("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    exe = _build_neon_check(cc)
    runs = [[str(exe)]] if native else [[qemu, str(exe)], [qemu, "-cpu", "cortex-a53", str(exe)]]
    for command in runs:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "PASSED" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
        if "cortex-a53" in command:  # no dot-product extension on that core: HWCAP must say so
            assert "dotprod" not in result.stdout.splitlines()[0]
