"""Importance-weighted quantization against ggml itself: for every type whose ggml quantizer takes an imatrix
(Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS), ondevice's bytes equal ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row,
imatrix) from llama-cpp-python's libggml, called through ctypes; on edge-case and heavy-tailed rows and on real
SmolLM2 tensors with the importance of a real imatrix."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from test_quant import edge_case_rows

from ondevice.errors import InvalidModelError
from ondevice.quant import get_quant_type

WEIGHTED = ("q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs")


@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    try:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        fn = lib.ggml_quantize_chunk
    except (OSError, AttributeError) as exc:
        pytest.skip(f"ggml library not usable here: {exc}")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]

    def quantize(name: str, x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        qtype = get_quant_type(name)
        x = np.ascontiguousarray(x, np.float32)
        out = np.zeros((x.shape[0], qtype.row_nbytes(x.shape[1])), np.uint8)
        imatrix = None if importance is None else np.ascontiguousarray(importance, np.float32)
        size = fn(qtype.ggml_type, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                  None if imatrix is None else imatrix.ctypes.data)
        assert size == out.nbytes
        return out

    return quantize


def assert_same_blocks(name: str, ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    size = get_quant_type(name).type_size
    same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1)
    assert same.all(), f"{name} {what}: {int((~same).sum())}/{same.size} blocks differ from ggml, first {np.argmin(same)}"


def synthetic_rows(n: int = 512) -> np.ndarray:
    rng = np.random.default_rng(5)
    return np.concatenate([edge_case_rows(n), (rng.standard_t(3, (48, n)) * 0.02).astype(np.float32)])


def importance_vectors(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(9)
    skewed = (rng.random(n) ** 4 * 10).astype(np.float32)
    skewed[::50] = 0  # columns no calibration token activated
    outliers = np.full(n, 1e-3, np.float32)
    outliers[rng.choice(n, 8, replace=False)] = 1e4
    return {"skewed": skewed, "outliers": outliers, "ones": np.ones(n, np.float32),
            "zeros": np.zeros(n, np.float32)}


@pytest.mark.parametrize("name", WEIGHTED)
def test_weighted_quantizers_are_byte_identical_to_ggml(ggml, name):
    x = synthetic_rows()
    for label, importance in importance_vectors(x.shape[1]).items():
        ours = get_quant_type(name).quantize(x, importance=importance)
        assert_same_blocks(name, ours, ggml(name, x, importance), label)
    # and the weights matter: most types change a quarter of their bytes or more on skewed weights
    plain = get_quant_type(name).quantize(x)
    assert (get_quant_type(name).quantize(x, importance=importance_vectors(512)["skewed"]) != plain).mean() > 0.1


@pytest.mark.parametrize("path", ["native", "numpy"])
@pytest.mark.parametrize("name", ("iq4_nl", "iq4_xs", "q3_k", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"))
def test_native_and_numpy_are_ggml_quantize_chunk(ggml, monkeypatch, name, path):
    """The types kernels/quantize.c quantizes with importance weights, through it and through numpy, with and
    without them (IQ4 without: ggml_quantize_chunk runs the same search with weights x^2, not quantize_row_*_ref),
    at 1 and 2 threads."""
    from ondevice.quant import base as quant_base

    if path == "numpy":
        monkeypatch.setattr(quant_base, "_NUMPY_ONLY", True)
    elif quant_base.native_kernels() is None:
        pytest.skip("the C kernels are not built")
    x = synthetic_rows()
    kernels = quant_base.native_kernels()
    threads = kernels.get_threads() if kernels else 1
    try:
        for n_threads in (1, 2) if kernels else (1,):
            if kernels:
                kernels.set_threads(n_threads)
            assert_same_blocks(name, get_quant_type(name).quantize(x), ggml(name, x, None), "no imatrix")
            for label, importance in importance_vectors(x.shape[1]).items():
                ours = get_quant_type(name).quantize(x, importance=importance)
                assert_same_blocks(name, ours, ggml(name, x, importance), f"{label}, {n_threads} threads")
    finally:
        if kernels:
            kernels.set_threads(threads)


def test_types_without_importance_ignore_it(ggml):
    x = synthetic_rows(256)
    for name in ("q8_0", "f16", "f32"):
        qtype = get_quant_type(name)
        assert not qtype.takes_importance
        assert np.array_equal(qtype.quantize(x, importance=np.ones(256, np.float32)), qtype.quantize(x))
    assert np.array_equal(get_quant_type("q8_0").quantize(x), ggml("q8_0", x, np.ones(256, np.float32)))


def test_bad_importance_vectors_are_refused():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(InvalidModelError, match="rows have 64; the imatrix was computed for another model"):
        get_quant_type("q4_0").quantize(x, importance=np.ones(32, np.float32), name="blk.0.attn_q.weight")
    with pytest.raises(InvalidModelError, match="not finite"):
        get_quant_type("q4_0").quantize(x, importance=np.full(64, np.nan, np.float32))


@pytest.mark.slow
def test_real_smollm2_tensors_with_a_real_imatrix(ggml, smollm2):
    """Real weights (SmolLM2's dequantized tensors) and the importance our imatrix gives them on one chunk of the
    calibration text: ffn_down (1536 wide: every type) and attn_q / ffn_gate (576 wide: the 32-block types)."""
    from ondevice.architectures import get_architecture
    from ondevice.quant.imatrix import bundled_calibration_text, chunk_tokens, compute_imatrix
    from ondevice.sources import open_source

    model = open_source(smollm2)
    try:
        imatrix = compute_imatrix(model, chunk_tokens(model, bundled_calibration_text(), 128, 1))
        arch = get_architecture(model.spec.arch)
        tensors = {arch.gguf_name(hf): t.load() for hf, t in model.tensors.items()
                   if any(f"layers.{i}." in hf for i in (0, 14, 29)) and hf.endswith(("down_proj.weight",
                                                                                    "q_proj.weight", "gate_proj.weight"))}
    finally:
        model.close()
    checked = 0
    for gguf_name, weights in tensors.items():
        importance = imatrix.importance(gguf_name)
        for name in WEIGHTED:
            if weights.shape[1] % get_quant_type(name).block_size:
                continue
            ours = get_quant_type(name).quantize(weights, importance=importance)
            assert_same_blocks(name, ours, ggml(name, weights, importance), gguf_name)
            checked += 1
    assert checked == 3 * (10 + 5 + 5)
