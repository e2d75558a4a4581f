"""The decoder (ondevice/decoder.py) over the C kernels, with preallocated buffers and KV cache.

Shapes: M tokens in a chunk, D width, H/Hkv heads, Dh head dim, F ffn width, C context length.
Weights are the GGUF's: q/k rows permuted for interleaved RoPE unless the architecture uses NEOX RoPE.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.decoder import DecoderOps, attention_scale, require_features, run_decoder
from ondevice.errors import OndeviceError
from ondevice.quant.legacy import Q8_0
from ondevice.rope import layer_freq_factors
from ondevice.runtime.kv import DEFAULT_KV_CACHE, KV_CACHE_DTYPES, check_kv_cache, kv_row_items
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


def block_hadamard(dim: int, block: int = 32) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of each `block` values of a `dim`-vector (block-diagonal, symmetric)."""
    h = np.ones((1, 1))
    while len(h) < block:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(dim // block), h / np.sqrt(block)).astype(np.float32)


def rotate_heads(heads: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """(rows, heads, dim) -> each head vector times the symmetric `rotation`, through the kernels' f32 matmul."""
    rows = heads.reshape(-1, rotation.shape[0])
    out = np.empty_like(rows)
    K.matmul(out, rotation, 0, rows, rotation.shape[0])  # type 0: F32 weights, out = rows @ rotation.T
    return out.reshape(heads.shape)


def repacked(w: Matrix) -> Matrix:
    """`w` in the interleaved layout the kernels multiply fastest on this CPU (Q4_0 -> Q4_0_X8, Q4_K -> Q4_K_X8:
    8 rows' blocks interleaved; Q4_K_X8 is 2.8% larger), or `w` itself when there is none. Done once at load."""
    packed_type = K.repacked_type(w.ggml_type)
    if packed_type is None or w.rows % 8 != 0:
        return w
    packed = np.empty((w.rows, K.row_nbytes(packed_type, w.cols)), np.uint8)
    mapped = _maps_file_read_only(w.data)
    # in slices of ~8 MB, each slice's file pages dropped once copied: a large matrix (a tied 262k-row embedding)
    # never has both forms resident, so the peak RSS stays that of the weights
    step = max(8, (8 << 20) // max(1, w.data.shape[1]) // 8 * 8)
    for r0 in range(0, w.rows, step):
        rows = slice(r0, min(w.rows, r0 + step))
        K.repack(packed[rows], w.data[rows], w.ggml_type, w.cols)
        if mapped:
            _release_pages(w.data[rows])
    return dataclasses.replace(w, data=packed, ggml_type=packed_type)


def repack_layers(weights: ModelWeights) -> None:
    """Repack the layers' matrices and the output layer in place (get_rows reads a repacked embedding too, so a
    tied one is repacked once for both; an untied embedding stays as stored: only get_rows reads it)."""
    for layer in weights.layers:
        for role, tensor in layer.items():
            if isinstance(tensor, Matrix):
                layer[role] = repacked(tensor)
    g = weights.globals
    tied = g["output"] is g["embed"]
    if isinstance(g["output"], Matrix):
        g["output"] = repacked(g["output"])
        if tied:
            g["embed"] = g["output"]


class ContextOverflowError(OndeviceError):
    """The tokens do not fit in the context window."""


# What the runtime's kernels express (decoder.FEATURES)
SUPPORTED_FEATURES = ("qkv_bias", "qk_norm", "rope_freq_factors", "norm_offset", "post_norms", "gelu_tanh",
                      "embed_scale", "attn_scale", "sliding_window", "local_rope_theta")


class Transformer:
    # A forward pass of up to this many tokens gives each row bit-identical logits to a one-token pass: the
    # kernels multiply that many activation rows with the matrix-vector path (the same per-output sums as one
    # row), and more with the tiled matrix-matrix path, whose sums round differently. Speculative decoding
    # verifies at most this many tokens per pass, so its output equals plain decoding (tests/test_speculative.py).
    exact_rows = K.MATMUL_EXACT_ROWS if K is not None else 1

    def __init__(self, weights: ModelWeights, n_ctx: int, max_batch: int = 256, kv_cache: str = DEFAULT_KV_CACHE) -> None:
        kernels()
        spec = weights.spec
        require_features(spec, "runtime", SUPPORTED_FEATURES)
        repack_layers(weights)
        self.w = weights
        self.spec = spec
        self.n_ctx = n_ctx
        self.max_batch = max_batch
        self.neox = get_architecture(spec.arch).neox_rope  # the description says which RoPE, not the name
        self.freq_factors = [None if f is None else np.asarray(f, np.float32)
                             for f in (layer_freq_factors(spec, i) for i in range(spec.n_layers))]
        self.scale = attention_scale(spec)
        self.kv_cache_type = check_kv_cache(kv_cache, spec.head_dim)
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache]
        self.kv_q8_0 = kv_cache == "q8_0"
        # q8_0 keys are stored rotated by an orthonormal Hadamard transform per 32-value block, and queries get the
        # same rotation, so q.k is unchanged while a key's outlier channels spread over its block instead of setting
        # the block's scale alone (most of a Q8_0 cache's error is in K). Symmetric: its own inverse.
        self.key_rotation = block_hadamard(spec.head_dim) if self.kv_q8_0 else None
        # Slot s holds one sequence's K/V in k_slots[s] / v_slots[s], (layer, head, position, dim); a q8_0 cache
        # keeps each (layer, head, position) row as its Q8_0 blocks' bytes instead of dims. Slot 0 is the
        # single-sequence cache (k_cache); ensure_slots adds more for batched decoding (ondevice.runtime.batch).
        self.k_slots: list[np.ndarray] = []
        self.v_slots: list[np.ndarray] = []
        self.ensure_slots(1)
        self.k_cache, self.v_cache = self.k_slots[0], self.v_slots[0]
        d, f = spec.hidden_size, spec.ffn_size
        q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        b = max_batch
        self._x = np.empty((b, d), np.float32)
        self._h = np.empty((b, d), np.float32)
        # one output buffer per projection role
        self._out = {"q": np.empty((b, q), np.float32), "k": np.empty((b, kv), np.float32),
                     "v": np.empty((b, kv), np.float32), "gate": np.empty((b, f), np.float32),
                     "up": np.empty((b, f), np.float32)}
        if spec.post_norms:  # the o and down outputs are normed before their residual add
            self._out.update({"o": np.empty((b, d), np.float32), "down": np.empty((b, d), np.float32)})
        self._attn = np.empty((b, q), np.float32)
        self._logits = np.empty((b, spec.vocab_size), np.float32)

    def ensure_slots(self, n: int) -> None:
        """Hold at least n sequence slots. Each is a lazily committed cache: only the positions a slot uses become
        resident, so idle slots cost address space, not memory."""
        spec = self.spec
        kv_shape = (spec.n_layers, spec.n_kv_heads, self.n_ctx, kv_row_items(self.kv_cache_type, spec.head_dim))
        while len(self.k_slots) < n:
            # f16 (the default) halves the cache and, with the kernels' f16 attention, matches llama.cpp's numerics;
            # q8_0 halves it again
            self.k_slots.append(lazy_zeros(kv_shape, self.kv_dtype))
            self.v_slots.append(lazy_zeros(kv_shape, self.kv_dtype))

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the K/V of positions 0..n-1 from slot src to slot dst (a shared prompt prefix: a copy, not a
        recomputation, and the same numbers)."""
        for caches in (self.k_slots, self.v_slots):
            caches[dst][:, :, :n, :] = caches[src][:, :, :n, :]

    def shift(self, slot: int, keep: int, discard: int, used: int) -> None:
        """Context shift: forget positions keep..keep+discard-1 of a slot that holds `used` positions, moving the
        later ones down by `discard`. Cached keys carry their position's rotation, so each is re-rotated by
        -discard (R(p - d) = R(-d) R(p)) instead of recomputing the tokens; values move as they are. A q8_0 cache's
        keys are dequantized, rotated and quantized again (each block gets a fresh scale: the rotation mixes pairs
        across the block, so the old codes do not carry over); its values move as bytes, unchanged."""
        if not (0 <= keep and discard > 0 and keep + discard <= used <= self.n_ctx):
            raise ValueError(f"bad shift: keep {keep}, discard {discard}, used {used}")
        spec, hd = self.spec, self.spec.head_dim
        half = hd // 2
        for layer in range(spec.n_layers):
            inv_freq = float(spec.layer_rope_theta(layer)) ** (-2.0 * np.arange(half) / hd)
            factors = self.freq_factors[layer]
            if factors is not None:
                inv_freq = inv_freq / factors.astype(np.float64)
            angle = -float(discard) * inv_freq
            cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
            k_cache, v_cache = self.k_slots[slot][layer], self.v_slots[slot][layer]
            moved = k_cache[:, keep + discard : used, :]
            keys = Q8_0().dequantize(moved, hd) @ self.key_rotation if self.kv_q8_0 else moved.astype(np.float32)
            if self.neox:  # pairs (j, j + half)
                a, b = keys[..., :half], keys[..., half:]
            else:  # interleaved pairs (2j, 2j + 1)
                a, b = keys[..., 0::2], keys[..., 1::2]
            ra, rb = a * cos - b * sin, a * sin + b * cos
            if self.neox:
                keys[..., :half], keys[..., half:] = ra, rb
            else:
                keys[..., 0::2], keys[..., 1::2] = ra, rb
            if self.kv_q8_0:
                rotated = np.ascontiguousarray((keys @ self.key_rotation).transpose(1, 0, 2), np.float32)
                K.kv_store_q8_0(k_cache, rotated, keep)
            else:
                k_cache[:, keep : used - discard, :] = keys
            v_cache[:, keep : used - discard, :] = v_cache[:, keep + discard : used, :].copy()

    def forward_segments(self, segments: list[tuple[int, np.ndarray, int]], logits: bool = True) -> np.ndarray | None:
        """One pass over several sequences: segments are (slot, tokens, pos0), their rows go through the weights
        together and each attends to its own slot's cache. The logits after each segment's last token, in order
        (None with logits=False: a prompt chunk that needs none). At most exact_rows rows in all keep every
        row's numbers those of a one-sequence pass."""
        total = sum(len(tokens) for _, tokens, _ in segments)
        if not segments or total > self.max_batch:
            raise ValueError(f"forward_segments takes 1..{self.max_batch} rows, got {total}")
        for slot, tokens, pos0 in segments:
            if not 0 <= slot < len(self.k_slots):
                raise ValueError(f"slot {slot} does not exist ({len(self.k_slots)} slots)")
            if len(tokens) == 0:
                raise ValueError("a segment needs at least one token")
            if pos0 < 0 or pos0 + len(tokens) > self.n_ctx:
                raise ContextOverflowError(f"{pos0 + len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        try:
            return run_decoder(KernelOps(self, [(slot, np.ascontiguousarray(tokens, dtype=np.int32), pos0)
                                                for slot, tokens, pos0 in segments], "last" if logits else "none"))
        except _NoLogits:
            return None

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
        try:
            return run_decoder(KernelOps(self, [(0, tokens, pos0)], rows))
        except _NoLogits:
            return None


class _NoLogits(Exception):
    """A prompt chunk before the last: its rows need no logits, so the pass ends after the blocks."""


class KernelOps(DecoderOps[np.ndarray]):
    """One pass of M rows: segments (slot, tokens, pos0) of one or more sequences, their rows stacked in order;
    every op writes into the Transformer's buffers. `rows`: which logits ("all", "last" of each segment, "none")."""

    def __init__(self, t: Transformer, segments: list[tuple[int, np.ndarray, int]], rows: str) -> None:
        super().__init__(t.spec)
        self.t, self.rows = t, rows
        self.tokens = segments[0][1] if len(segments) == 1 else np.concatenate([seg[1] for seg in segments])
        self.m = len(self.tokens)
        self.positions = np.concatenate([np.arange(pos0, pos0 + len(tokens), dtype=np.int32)
                                         for _, tokens, pos0 in segments])
        # (slot, first row, row count, pos0) per segment
        self.segments: list[tuple[int, int, int, int]] = []
        start = 0
        for slot, tokens, pos0 in segments:
            self.segments.append((slot, start, len(tokens), pos0))
            start += len(tokens)

    def embed(self) -> np.ndarray:
        table = self.t.w.globals["embed"]
        x = self.t._x[: self.m]
        K.get_rows(x, table.data, table.ggml_type, self.tokens, self.spec.hidden_size)
        return x

    def scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        np.multiply(x, np.float32(factor), out=x)
        return x

    def norm(self, x: np.ndarray, role: str, layer: int | None) -> np.ndarray:
        # a GGUF stores norm_offset + w (llama.cpp's convention), so the weight is used as it is
        weight = self.t.w.globals[role] if layer is None else self.t.w.layers[layer][role]
        h = self.t._h[: len(x)]
        K.rmsnorm(h, x, weight, self.spec.rms_eps)
        return h

    def project(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[np.ndarray]:
        weights = self.t.w.layers[layer]
        outs = []
        for role in roles:
            w, out = weights[role], self.t._out[role][: len(x)]
            K.matmul(out, w.data, w.ggml_type, x, w.cols)
            if bias:
                out += weights[f"{role}_bias"]
            outs.append(out)
        return outs

    def head_norm(self, x: np.ndarray, role: str, layer: int, n_heads: int) -> np.ndarray:
        rows = x.reshape(len(x) * n_heads, self.spec.head_dim)
        K.rmsnorm(rows, rows, self.t.w.layers[layer][role], self.spec.rms_eps)
        return x

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, layer: int) -> np.ndarray:
        t, spec, m = self.t, self.spec, self.m
        hd, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        q3, k3 = q.reshape(m, nh, hd), k.reshape(m, nkv, hd)
        theta, factors = spec.layer_rope_theta(layer), t.freq_factors[layer]
        for heads in (q3, k3):
            if factors is None:
                K.rope(heads, self.positions, theta, t.neox)
            else:
                K.rope(heads, self.positions, theta, t.neox, factors)
        v3 = v.reshape(m, nkv, hd)
        attn = t._attn[:m]
        if t.kv_q8_0:
            q3, rotated_k = rotate_heads(q3, t.key_rotation), rotate_heads(k3, t.key_rotation)
        for slot, start, n, pos0 in self.segments:  # each sequence attends to its own cache only
            k_cache, v_cache = t.k_slots[slot][layer], t.v_slots[slot][layer]
            if t.kv_q8_0:  # quantized on write, in C
                K.kv_store_q8_0(k_cache, rotated_k[start : start + n], pos0)
                K.kv_store_q8_0(v_cache, v3[start : start + n], pos0)
            else:
                k_cache[:, pos0 : pos0 + n, :] = k3[start : start + n].transpose(1, 0, 2)
                v_cache[:, pos0 : pos0 + n, :] = v3[start : start + n].transpose(1, 0, 2)
            K.attention(attn[start : start + n], q3[start : start + n], k_cache, v_cache, pos0, t.scale,
                        spec.window(layer))
        return attn

    def gated_act(self, gate: np.ndarray, up: np.ndarray, layer: int) -> np.ndarray:
        (K.gelu_mul if self.spec.activation == "gelu_tanh" else K.silu_mul)(gate, gate, up)
        return gate

    def add(self, x: np.ndarray, y: np.ndarray, layer: int, what: str) -> np.ndarray:
        K.add_inplace(x, y)
        return x

    def add_projection(self, x: np.ndarray, y: np.ndarray, role: str, layer: int) -> np.ndarray:
        w = self.t.w.layers[layer][role]
        K.matmul(x, w.data, w.ggml_type, y, w.cols, True)  # accumulate: x += y @ W^T
        return x

    def output_rows(self, x: np.ndarray) -> np.ndarray:
        if self.rows == "none":
            raise _NoLogits
        if self.rows == "all":
            return x
        if len(self.segments) == 1:  # the last row only: skip vocab-sized work for the rest
            return x[len(x) - 1 :]
        return x[[start + n - 1 for _, start, n, _ in self.segments]]

    def logits(self, x: np.ndarray) -> np.ndarray:
        out = self.t.w.globals["output"]
        logits = self.t._logits[: len(x)]
        K.matmul(logits, out.data, out.ggml_type, x, out.cols)
        return logits.copy()
