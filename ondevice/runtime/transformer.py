"""The decoder forward pass (llama and qwen2) over C kernels, with a preallocated KV cache.

Shapes: M tokens in a chunk, D width, H/Hkv heads, Dh head dim, F ffn width, C context length.
llama's q/k rows are stored permuted for interleaved RoPE (llama.cpp's layout); qwen2 uses NEOX RoPE.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.errors import OndeviceError
from ondevice.runtime.weights import Matrix, ModelWeights

try:
    from ondevice import _kernels as K
except ImportError:  # pragma: no cover - only on a broken install
    K = None


def kernels():
    if K is None:
        raise OndeviceError("the C kernels (ondevice._kernels) are not built: install with `pip install .` (needs a C "
                            "compiler), or in a checkout build them in place: python setup.py build_ext --inplace")
    return K


def lazy_zeros(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A zeroed array whose pages become resident only when written.

    The KV cache is laid out (layer, head, position, dim), so a short context touches a little of every
    (layer, head) slab. numpy backs large arrays with transparent huge pages, and one touched byte then commits
    2 MiB: the whole cache became resident on the first token (+80 MiB at n_ctx 2048). An anonymous mmap keeps
    4 KiB granularity, so RSS grows with the context actually used.
    """
    count = int(np.prod(shape))
    nbytes = count * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=count).reshape(shape)


# user-facing KV cache types -> element type of the cache arrays
KV_CACHE_DTYPES: dict[str, type] = {"f16": np.float16, "f32": np.float32}


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux


def _maps_file_read_only(view: np.ndarray) -> bool:
    """Whether `view` lies in a read-only mmap (a GGUF file's), where dropping pages loses nothing."""
    base = view
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap) and view.flags.writeable is False


def _release_pages(view: np.ndarray) -> None:
    """Drop the whole pages of a read-only file mapping that `view` spans from this process's RSS (they stay in the
    page cache and come back on the next read): a repacked copy then replaces, rather than duplicates, the
    weights' resident memory. Best effort: a no-op where madvise is unavailable."""
    start = view.ctypes.data
    first, last = -(-start // _PAGE) * _PAGE, (start + view.nbytes) // _PAGE * _PAGE
    if last > first and hasattr(ctypes.CDLL(None), "madvise"):
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def repacked(w: Matrix) -> Matrix:
    """`w` in the interleaved layout the kernels multiply fastest on this CPU (Q4_0 -> Q4_0_X8, Q4_K -> Q4_K_X8:
    8 rows' blocks interleaved; Q4_K_X8 is 2.8% larger), or `w` itself when there is none. Done once at load."""
    packed_type = K.repacked_type(w.ggml_type)
    if packed_type is None or w.rows % 8 != 0:
        return w
    packed = np.empty((w.rows, K.row_nbytes(packed_type, w.cols)), np.uint8)
    wtype = K.repack(packed, w.data, w.ggml_type, w.cols)
    if _maps_file_read_only(w.data):
        _release_pages(w.data)
    return dataclasses.replace(w, data=packed, ggml_type=wtype)


def repack_layers(weights: ModelWeights) -> None:
    """Repack the layers' matrices in place (token_embd / output stay as stored: get_rows reads token_embd)."""
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    for layer in weights.layers:
        for name in names:
            setattr(layer, name, repacked(getattr(layer, name)))


class ContextOverflowError(OndeviceError):
    """The tokens do not fit in the context window."""


class Transformer:
    def __init__(self, weights: ModelWeights, n_ctx: int, max_batch: int = 256, kv_dtype: type = np.float16) -> None:
        kernels()
        spec = weights.spec
        repack_layers(weights)
        self.w = weights
        self.spec = spec
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.neox = get_architecture(spec.arch).neox_rope  # the description says which RoPE, not the name
        self.scale = 1.0 / float(np.sqrt(spec.head_dim))
        kv_shape = (spec.n_layers, spec.n_kv_heads, n_ctx, spec.head_dim)
        # f16 (the default) halves the cache and, with the kernels' f16 attention, matches llama.cpp's numerics
        self.k_cache = lazy_zeros(kv_shape, kv_dtype)
        self.v_cache = lazy_zeros(kv_shape, kv_dtype)
        d, f = spec.hidden_size, spec.ffn_size
        q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        b = max_batch
        self._x = np.empty((b, d), np.float32)
        self._h = np.empty((b, d), np.float32)
        self._q = np.empty((b, q), np.float32)
        self._k = np.empty((b, kv), np.float32)
        self._v = np.empty((b, kv), np.float32)
        self._attn = np.empty((b, q), np.float32)
        self._gate = np.empty((b, f), np.float32)
        self._up = np.empty((b, f), np.float32)
        self._logits = np.empty((b, spec.vocab_size), np.float32)

    @staticmethod
    def _matmul(out: np.ndarray, w: Matrix, x: np.ndarray) -> np.ndarray:
        K.matmul(out, w.data, w.ggml_type, x, w.cols)
        return out

    def forward(self, tokens: np.ndarray, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions pos0.. through the model; logits of the last (or every) token."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(tokens)
        if pos0 < 0 or pos0 + n > self.n_ctx:
            raise ContextOverflowError(f"{pos0 + n} tokens do not fit in the context of {self.n_ctx}")
        if n == 0:
            raise ValueError("forward needs at least one token")
        outs = []
        for start in range(0, n, self.max_batch):
            chunk = tokens[start : start + self.max_batch]
            last_chunk = start + len(chunk) == n
            rows = "all" if all_logits else ("last" if last_chunk else "none")
            logits = self._forward_chunk(chunk, pos0 + start, rows)
            if logits is not None:
                outs.append(logits)
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def _forward_chunk(self, tokens: np.ndarray, pos0: int, rows: str) -> np.ndarray | None:
        spec, w = self.spec, self.w
        m = len(tokens)
        hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        positions = np.arange(pos0, pos0 + m, dtype=np.int32)
        x, h = self._x[:m], self._h[:m]
        q, k, v = self._q[:m], self._k[:m], self._v[:m]
        attn, gate, up = self._attn[:m], self._gate[:m], self._up[:m]
        K.get_rows(x, w.token_embd.data, w.token_embd.ggml_type, tokens, spec.hidden_size)
        for li, layer in enumerate(w.layers):
            K.rmsnorm(h, x, layer.attn_norm, spec.rms_eps)
            self._matmul(q, layer.wq, h)
            self._matmul(k, layer.wk, h)
            self._matmul(v, layer.wv, h)
            if layer.bq is not None:
                q += layer.bq
                k += layer.bk
                v += layer.bv
            q3, k3 = q.reshape(m, nh, hd), k.reshape(m, nkv, hd)
            K.rope(q3, positions, spec.rope_theta, self.neox)
            K.rope(k3, positions, spec.rope_theta, self.neox)
            self.k_cache[li, :, pos0 : pos0 + m, :] = k3.transpose(1, 0, 2)
            self.v_cache[li, :, pos0 : pos0 + m, :] = v.reshape(m, nkv, hd).transpose(1, 0, 2)
            K.attention(attn, q3, self.k_cache[li], self.v_cache[li], pos0, self.scale)
            K.matmul(x, layer.wo.data, layer.wo.ggml_type, attn, layer.wo.cols, True)  # accumulate: x += attn @ Wo^T
            K.rmsnorm(h, x, layer.ffn_norm, spec.rms_eps)
            self._matmul(gate, layer.w_gate, h)
            self._matmul(up, layer.w_up, h)
            K.silu_mul(gate, gate, up)
            K.matmul(x, layer.w_down.data, layer.w_down.ggml_type, gate, layer.w_down.cols, True)
        if rows == "none":
            return None
        if rows == "last":  # prompt processing needs only the last row: skip the vocab-sized matmul for the rest
            x, h = x[m - 1 :], h[m - 1 :]
        K.rmsnorm(h, x, w.output_norm, spec.rms_eps)
        logits = self._logits[: len(x)]
        self._matmul(logits, w.output, h)
        return logits.copy()
