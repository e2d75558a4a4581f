"""The decoder (ondevice/decoder.py) in float32 numpy: the calibration pass of the quantizers that minimize a
layer's output error, and an oracle for tests. Several token windows run at once, each attending only to itself;
one layer's weights are loaded at a time (the canonical tensors are lazy)."""

from __future__ import annotations

import numpy as np

from ondevice.decoder import FEATURES, DecoderOps, attention_scale, require_features, run_decoder
from ondevice.model import CanonicalModel
from ondevice.rope import rope_kind, rope_tables


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:  # x (heads, S, d), rotate-half
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class NumpyOps(DecoderOps[np.ndarray]):
    def __init__(self, model: CanonicalModel, windows: list[list[int]]) -> None:
        super().__init__(model.spec)
        require_features(model.spec, "numpy reference", FEATURES)
        self.model = model
        self.tokens = np.concatenate([np.asarray(window, np.int64) for window in windows])
        self.bounds = np.cumsum([0] + [len(window) for window in windows])
        self.longest = max(len(window) for window in windows)
        self.tables: dict[tuple[float, bool], tuple[np.ndarray, np.ndarray]] = {}  # per kind of RoPE

    def rope(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        key = rope_kind(self.spec, layer)
        if key not in self.tables:
            self.tables[key] = rope_tables(self.spec, self.longest, layer=layer)
        return self.tables[key]

    def load(self, role: str, layer: int | None) -> np.ndarray:
        return self.model.tensors[self.tensor_name(role, layer)].load()

    def embed(self) -> np.ndarray:
        return self.load("embed", None)[self.tokens]

    def scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        return x * np.float32(factor)

    def norm_weight(self, role: str, layer: int | None) -> np.ndarray:
        return self.load(role, layer) + np.float32(self.spec.norm_offset)

    def norm(self, x: np.ndarray, role: str, layer: int | None) -> np.ndarray:
        return _rms_norm(x, self.norm_weight(role, layer), self.spec.rms_eps)

    def project(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[np.ndarray]:
        out = [x @ self.load(role, layer).T for role in roles]
        return [y + self.load(f"{role}_bias", layer) for y, role in zip(out, roles, strict=True)] if bias else out

    def head_norm(self, x: np.ndarray, role: str, layer: int, n_heads: int) -> np.ndarray:
        heads = x.reshape(len(x), n_heads, -1)
        return _rms_norm(heads, self.norm_weight(role, layer), self.spec.rms_eps).reshape(x.shape)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, layer: int) -> np.ndarray:
        spec = self.spec
        d, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        context = np.empty((len(q), nh * d), np.float32)
        cos_table, sin_table = self.rope(layer)
        scale, window = np.float32(attention_scale(spec)), spec.window(layer)
        for start, stop in zip(self.bounds[:-1], self.bounds[1:], strict=True):  # causal within each window
            s = stop - start
            qs, ks, vs = (t[start:stop].reshape(s, n, d).transpose(1, 0, 2) for t, n in ((q, nh), (k, nkv), (v, nkv)))
            cos, sin = cos_table[:s], sin_table[:s]
            qs, ks = _rope(qs, cos, sin), _rope(ks, cos, sin)
            ks, vs = np.repeat(ks, nh // nkv, axis=0), np.repeat(vs, nh // nkv, axis=0)
            scores = qs @ ks.transpose(0, 2, 1) * scale
            scores += np.triu(np.full((s, s), -np.inf, np.float32), 1)
            if window:  # key t is visible from query p when p - window < t
                scores += np.tril(np.full((s, s), -np.inf, np.float32), -window)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context[start:stop] = ((scores / scores.sum(axis=-1, keepdims=True)) @ vs).transpose(1, 0, 2).reshape(s, -1)
        return context

    def gated_act(self, gate: np.ndarray, up: np.ndarray, layer: int) -> np.ndarray:
        if self.spec.activation == "gelu_tanh":
            return 0.5 * gate * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (gate + 0.044715 * gate**3))) * up
        with np.errstate(over="ignore"):  # exp overflows to inf for very negative gates: silu -> 0, right
            return gate / (1.0 + np.exp(-gate)) * up

    def add(self, x: np.ndarray, y: np.ndarray, layer: int, what: str) -> np.ndarray:
        return x + y

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.load("embed" if self.spec.tie_embeddings else "output", None).T


class FinalHiddenOps(NumpyOps):
    """Stops before the output layer: its result is the output layer's input (the final norm's output)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x


def reference_logits(model: CanonicalModel, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits of one sequence."""
    return run_decoder(NumpyOps(model, [tokens])).astype(np.float32)


def final_hidden_states(model: CanonicalModel, windows: list[list[int]]) -> np.ndarray:
    """The final norm's output for every token of `windows`: (tokens, hidden) float32."""
    return run_decoder(FinalHiddenOps(model, windows)).astype(np.float32)
