"""Numpy reference implementations for the C kernels in ondevice._kernels (test oracles).

Weights are dequantized with gguf-py (`gguf.quants.dequantize`), an implementation independent of
ours. Activation quantization is emulated exactly (same float32 arithmetic and rounding) so the
quantized-matmul check can be tight; `activation_error_bound` bounds what that rounding costs
against the unquantized product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

QK = 32

# GGML type id -> (block elements, block bytes)
TYPE_LAYOUT: dict[int, tuple[int, int]] = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q4_0: (32, 18),
    QT.Q4_1: (32, 20),
    QT.Q5_0: (32, 22),
    QT.Q5_1: (32, 24),
    QT.Q8_0: (32, 34),
    QT.Q3_K: (256, 110),
    QT.Q4_K: (256, 144),
    QT.Q5_K: (256, 176),
    QT.Q6_K: (256, 210),
    QT.IQ4_NL: (32, 18),
    QT.IQ4_XS: (256, 136),
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
QUANT_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS)
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES


def row_nbytes(wtype: int, k: int) -> int:
    elems, nbytes = TYPE_LAYOUT[wtype]
    return k // elems * nbytes


def make_weights(wtype: int, n: int, k: int, rng: np.random.Generator, random_bytes: bool = False) -> np.ndarray:
    """Weights of type `wtype` as raw GGUF bytes, uint8 [n, row_nbytes].

    Float types and the 32-element formats come from gguf-py's quantizer on random normal data;
    with random_bytes=True (and always for the K-quants, which gguf-py cannot quantize) every quant
    byte is random (so extreme codes such as q8 = -128 appear) and only the fp16 scales are set to
    sane magnitudes.
    """
    dense = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    if wtype in FLOAT_TYPES:
        if wtype == QT.F32:
            return dense.view(np.uint8).reshape(n, -1)
        if wtype == QT.F16:
            return dense.astype(np.float16).view(np.uint8).reshape(n, -1)
        return quants.quantize(dense, QT.BF16).reshape(n, -1)
    if not random_bytes and wtype not in (QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS):
        return quants.quantize(dense, wtype).reshape(n, -1)
    elems, nbytes = TYPE_LAYOUT[wtype]
    blocks = rng.integers(0, 256, size=(n * k // elems, nbytes), dtype=np.uint8)

    def half_field(offset: int, lo: float, hi: float) -> None:
        values = (rng.uniform(lo, hi, size=len(blocks)) * rng.choice([-1, 1], size=len(blocks))).astype(np.float16)
        blocks[:, offset : offset + 2] = values.view(np.uint8).reshape(-1, 2)

    if wtype == QT.Q6_K:
        half_field(208, 1e-4, 1e-3)
    elif wtype == QT.Q3_K:
        half_field(108, 1e-4, 1e-3)  # times a 6-bit scale - 32
    elif wtype in (QT.Q4_K, QT.Q5_K):
        half_field(0, 1e-4, 2e-3)
        half_field(2, 1e-4, 2e-3)
    elif wtype == QT.IQ4_XS:
        half_field(0, 1e-5, 1e-4)  # times a 6-bit block scale
    else:
        half_field(0, 1e-3, 1e-2)
        if wtype in (QT.Q4_1, QT.Q5_1):
            half_field(2, 1e-3, 5e-2)
    return blocks.reshape(n, -1)


def dequantize(w: np.ndarray, wtype: int, k: int) -> np.ndarray:
    """float32 [n, k] from raw rows."""
    n = w.shape[0]
    if wtype == QT.F32:
        return w.reshape(-1).view(np.float32).reshape(n, k)
    if wtype == QT.F16:
        return w.reshape(-1).view(np.float16).astype(np.float32).reshape(n, k)
    return np.asarray(quants.dequantize(w.reshape(n, -1), wtype), dtype=np.float32).reshape(n, k)


# Block layouts of the weight types whose blocks carry a min m (w = d * q + m): offset of m in bytes.
MIN_FIELD_OFFSET = {QT.Q4_1: 2, QT.Q5_1: 2}


def activation_scheme(wtype: int) -> str:
    """The 8-bit activation rounding llama.cpp's CPU backend (and so our kernels) pairs with wtype."""
    if wtype in (QT.Q4_1, QT.Q5_1):
        return "q8_1"
    if wtype in (QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_XS):
        return "q8_K"
    return "q8_0"


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def quantize_activations(x: np.ndarray, wtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [m, k] float32 -> (values q*d [m, k], s_excess [m, k/32], step [m, k/32]), emulating the kernels.

    q = round-half-even(x * 127 / amax) with amax over 32 values (over 256 for q8_K); d is amax / 127
    rounded to fp16 (q8_0, q8_1) or 1 / (127 / amax) in f32 (q8_K). s_excess is what the block's stored
    sum s adds beyond d * sum(q) (q8_1 rounds s to fp16 on its own); step is the block's d before rounding.
    """
    scheme = activation_scheme(wtype)
    m, k = x.shape
    group = 256 if scheme == "q8_K" and k % 256 == 0 else QK
    groups = x.reshape(m, k // group, group).astype(np.float32)
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(groups * inv).reshape(m, k // QK, QK)  # half to even, like the kernels
    per_block = group // QK
    amax_blocks = np.repeat(amax.reshape(m, -1), per_block, axis=1)  # [m, nb]
    if scheme == "q8_K":
        with np.errstate(divide="ignore"):
            d = np.where(inv != 0, np.float32(1.0) / inv, np.float32(0.0)).astype(np.float32)
        d = np.repeat(d.reshape(m, -1), per_block, axis=1)
    else:
        d = _fp16(amax_blocks / np.float32(127.0))
    s_excess = np.zeros_like(d)
    if scheme == "q8_1":
        sums = q.sum(axis=-1).astype(np.float32)
        s = _fp16((amax_blocks / np.float32(127.0)) * sums)
        s_excess = s.astype(np.float64) - d.astype(np.float64) * sums
    values = (q * d[..., None]).reshape(m, k).astype(np.float32)
    return values, s_excess, amax_blocks / 127.0


def block_mins(w: np.ndarray, wtype: int, k: int) -> np.ndarray:
    """[n, k/32] per-block min m of Q4_1/Q5_1 rows (zeros for every other type)."""
    n = w.shape[0]
    if wtype not in MIN_FIELD_OFFSET:
        return np.zeros((n, k // QK))
    nbytes = TYPE_LAYOUT[wtype][1]
    blocks = np.ascontiguousarray(w).reshape(n, k // QK, nbytes)
    offset = MIN_FIELD_OFFSET[wtype]
    return blocks[:, :, offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float64)


def matmul(x: np.ndarray, w: np.ndarray, wtype: int, k: int, quantized: bool) -> np.ndarray:
    """Exact (float64) product of what the kernel should compute, from the raw weight rows w."""
    w_dense = dequantize(w, wtype, k).astype(np.float64)
    if not quantized:
        return x.astype(np.float64) @ w_dense.T
    xs, s_excess, _ = quantize_activations(x, wtype)
    return xs.astype(np.float64) @ w_dense.T + s_excess @ block_mins(w, wtype, k).T


def magnitude(x: np.ndarray, w_dense: np.ndarray) -> np.ndarray:
    """|x| @ |W|^T: the scale against which float rounding error is measured."""
    return np.abs(x.astype(np.float64)) @ np.abs(w_dense.astype(np.float64)).T


def activation_error_bound(x: np.ndarray, w: np.ndarray, wtype: int, k: int) -> np.ndarray:
    """Max |x@W^T - kernel|: each activation moves by at most half its step d (plus the fp16 rounding of
    d: 127 steps times 2^-11 relative), and a q8_1 block sum s by its own fp16 rounding."""
    m = x.shape[0]
    _, s_excess, step = quantize_activations(x, wtype)
    w_dense = dequantize(w, wtype, k).astype(np.float64)
    w_block_abs = np.abs(w_dense).reshape(w_dense.shape[0], k // QK, QK).sum(axis=-1)  # [n, nb]
    per_activation = step.reshape(m, -1) * (0.5 + 127 * 2.0**-11)
    s_bound = np.abs(step * 127 * QK * 2.0**-11) @ np.abs(block_mins(w, wtype, k)).T
    return (per_activation @ w_block_abs.T + s_bound) * (1 + 1e-5)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    return x64 * inv * weight.astype(np.float64)


def rope(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """x [m, h, d] -> rotated copy (float64)."""
    m, h, d = x.shape
    inv_freq = theta ** (-2.0 * np.arange(d // 2) / d)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.astype(np.float64)
    angle = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [m, d/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x64 = x.astype(np.float64)
    if neox:
        a, b = x64[..., : d // 2], x64[..., d // 2 :]
    else:
        a, b = x64[..., 0::2], x64[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x64)
    if neox:
        out[..., : d // 2], out[..., d // 2 :] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, scale: float,
              window: int = 0) -> np.ndarray:
    """q [m, h, d], caches [hkv, c, d] -> [m, h*d] (float64); window > 0: each row sees its last `window` keys.

    fp16 caches follow llama.cpp: q is rounded to fp16 before q.k and the probabilities before P.V.
    """
    f16 = k_cache.dtype == np.float16
    if f16:
        q = q.astype(np.float16)
    m, h, d = q.shape
    hkv = k_cache.shape[0]
    group = h // hkv
    n_keys = pos0 + m
    kc = k_cache[:, :n_keys].astype(np.float64)
    vc = v_cache[:, :n_keys].astype(np.float64)
    out = np.empty((m, h, d))
    causal = np.arange(n_keys)[None, :] <= (pos0 + np.arange(m))[:, None]  # [m, n_keys]
    if window:
        causal &= np.arange(n_keys)[None, :] > (pos0 + np.arange(m))[:, None] - window
    for head in range(h):
        kvh = head // group
        scores = q[:, head].astype(np.float64) @ kc[kvh].T * scale
        scores = np.where(causal, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        if f16:
            p = p.astype(np.float32).astype(np.float16).astype(np.float64)
        out[:, head] = p @ vc[kvh]
    return out.reshape(m, h * d)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return g / (1.0 + np.exp(-g)) * up.astype(np.float64)


def gelu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (transformers' gelu_pytorch_tanh), times up."""
    g = gate.astype(np.float64)
    return 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g**3))) * up


def available_isas(kernels) -> list[str]:
    """The code paths this machine can run, "scalar" first (the kernels' ISA is left as it was)."""
    current, found = kernels.isa(), []
    for name in ("scalar", "avx2", "avx512", "neon"):
        try:
            kernels._set_isa(name)
            found.append(name)
        except ValueError:
            pass
    kernels._set_isa(current)
    return found


@contextlib.contextmanager
def forced_isa(kernels, name: str) -> Iterator[None]:
    """Run the block on one code path, then restore the previous one."""
    previous = kernels.isa()
    kernels._set_isa(name)
    try:
        yield
    finally:
        kernels._set_isa(previous)
