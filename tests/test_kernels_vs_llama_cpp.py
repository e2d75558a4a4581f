"""Our 8-bit activations and quantized dot products against llama.cpp's own CPU functions.

llama-cpp-python ships ggml's CPU library; its `quantize_row_q8_0/q8_1/q8_K` and `ggml_vec_dot_*` are
exported, so they are called here through ctypes as the oracle. The activations must be identical
(same codes, same fp16/f32 scales): that is what makes greedy decoding token-identical to llama.cpp.
The dot products must agree to float summation order (2e-6 of sum |x||w|); before the activations
matched, they differed by ~1e-4 (fp16 scale rounding), so this tolerance has teeth.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import kernel_ref as ref
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

K = pytest.importorskip("ondevice._kernels")
llama_cpp = pytest.importorskip("llama_cpp")

# activation type per weight type, as in ggml-cpu's type traits (vec_dot_type)
VEC_DOT_TYPE = {QT.Q4_0: "q8_0", QT.Q5_0: "q8_0", QT.Q8_0: "q8_0", QT.Q4_1: "q8_1", QT.Q5_1: "q8_1",
                QT.Q3_K: "q8_K", QT.Q4_K: "q8_K", QT.Q5_K: "q8_K", QT.Q6_K: "q8_K",
                QT.IQ4_NL: "q8_0", QT.IQ4_XS: "q8_K"}
# bytes per block of the activation types: (elements, bytes)
ACT_LAYOUT = {"q8_0": (32, 34), "q8_1": (32, 36), "q8_K": (256, 292)}
ISAS = [name for name in ("scalar", "avx2", "avx512", "neon") if name in ("scalar", "avx2", K.isa())
        and (name != "avx2" or "avx2" in K.cpu_features())]


@pytest.fixture(scope="module")
def ggml():
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    try:
        ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        lib.ggml_cpu_init()
        for name in ("quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    except (OSError, AttributeError) as exc:
        pytest.skip(f"ggml CPU library not usable here: {exc}")
    return lib


@pytest.fixture(params=ISAS)
def isa(request):
    default = K.isa()
    K._set_isa(request.param)
    yield request.param
    K._set_isa(default)


def _activations(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 7] *= 40.0  # outlier channel
    x[0, 32:64] = 0.0  # a zero block
    x[-1, :256] = np.round(x[-1, :256] * 4) / 4  # values on a coarse grid: ties in x * 127 / amax
    return x


def _ggml_quantize(ggml, act_type: str, row: np.ndarray) -> np.ndarray:
    elems, nbytes = ACT_LAYOUT[act_type]
    out = np.zeros(len(row) // elems * nbytes, np.uint8)
    getattr(ggml, f"quantize_row_{act_type}")(row.ctypes.data, out.ctypes.data, len(row))
    return out.reshape(-1, nbytes)


def _ours(x: np.ndarray, wtype: int) -> tuple[np.ndarray, np.ndarray]:
    m, k = x.shape
    qs = np.zeros((m, k), np.int8)
    ds = np.zeros((m, k // 32, 2), np.float32)
    K._quantize_activations(qs, ds, x, int(wtype), k)
    return qs, ds


@pytest.mark.parametrize("wtype", [QT.Q8_0, QT.Q4_1, QT.Q6_K], ids=lambda t: QT(t).name)
def test_activations_identical_to_llama_cpp(ggml, isa, wtype):
    act_type = VEC_DOT_TYPE[wtype]
    rng = np.random.default_rng(int(wtype))
    x = _activations(rng, 4, 1536)
    qs, ds = _ours(x, wtype)
    for r in range(x.shape[0]):
        blocks = _ggml_quantize(ggml, act_type, x[r])
        if act_type == "q8_K":
            d = blocks[:, :4].copy().view(np.float32)[:, 0]  # one scale per 256
            theirs = blocks[:, 4:260].view(np.int8).astype(np.float32) * d[:, None]
            ours = (qs[r].reshape(-1, 32).astype(np.float32) * ds[r, :, :1]).reshape(-1, 256)
            np.testing.assert_array_equal(ours, theirs)  # llama.cpp's codes may have the opposite sign
            continue
        d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float32)
        np.testing.assert_array_equal(qs[r].reshape(-1, 32), blocks[:, -32:].view(np.int8))
        np.testing.assert_array_equal(ds[r, :, 0], d)
        if act_type == "q8_1":
            s = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
            np.testing.assert_array_equal(ds[r, :, 1], s)


@pytest.mark.parametrize("wtype", list(VEC_DOT_TYPE), ids=lambda t: QT(t).name)
def test_matmul_matches_llama_cpp_vec_dot(ggml, isa, wtype):
    act_type = VEC_DOT_TYPE[wtype]
    weight_name = QT(wtype).name.lower().replace("_k", "_K")  # ggml spells them q4_0, q4_K
    vec_dot = getattr(ggml, f"ggml_vec_dot_{weight_name}_{act_type}")
    vec_dot.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rng = np.random.default_rng(100 + int(wtype))
    m, n, k = 3, 24, 1536
    w = ref.make_weights(wtype, n, k, rng)
    x = _activations(rng, m, k)
    out = np.zeros((m, n), np.float32)
    K.matmul(out, w, int(wtype), x, k)
    theirs = np.zeros((m, n), np.float32)
    result = ctypes.c_float()
    for r in range(m):
        act = _ggml_quantize(ggml, act_type, x[r])
        for j in range(n):
            row = np.ascontiguousarray(w[j])
            vec_dot(k, ctypes.byref(result), 0, row.ctypes.data, 0, act.ctypes.data, 0, 1)
            theirs[r, j] = result.value
    mag = ref.magnitude(x, ref.dequantize(w, wtype, k))
    assert (np.abs(out - theirs) / mag).max() < 2e-6
