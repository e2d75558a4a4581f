"""The canonical model every source produces and every writer consumes.

Tensors use Hugging Face names and layouts (rotate-half q/k rows, (out, in) matrices); they are lazy, so a
converter holds one tensor in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ondevice.errors import InvalidModelError

if TYPE_CHECKING:
    from ondevice.quant import QuantType
    from ondevice.tokenizer import SpecialTokens


# Far above any small model (the largest open models have ~128 layers, 256k vocabularies, 1M contexts), far
# below what would exhaust memory when a table is sized per layer or per head.
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_WIDTH = 65536
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # GGUF architecture name: "llama", "qwen2"
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    rope_theta: float
    rms_eps: float
    context_length: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (qwen3)
    # Per-pair divisors of the RoPE frequencies (llama3 / linear scaling, llama.cpp's rope_freqs); None: unscaled
    rope_freq_factors: tuple[float, ...] | None = None
    # The HF rope_scaling object the factors came from (as sorted items), so `--to hf` can write it back
    hf_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): gemma's 1 + w (GGUF stores the sum)
    post_norms: bool = False  # sandwich norms: also on the attention's and the MLP's output (gemma3)
    activation: str = "silu"  # the MLP gate's: "silu" or "gelu_tanh"
    embed_scale: float | None = None  # embeddings are multiplied by this (gemma: sqrt(hidden))
    attn_scale: float | None = None  # q.k scale; None: 1/sqrt(head_dim)
    layer_windows: tuple[int, ...] = ()  # sliding window of each layer (0: full attention); (): all full
    local_rope_theta: float | None = None  # RoPE base of the sliding-window layers (gemma3: 10000)
    name: str = "model"

    def window(self, layer: int) -> int:
        """The layer's sliding window (0: it attends to the whole context)."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def layer_rope_theta(self, layer: int | None) -> float:
        if layer is not None and self.window(layer) and self.local_rope_theta is not None:
            return self.local_rope_theta
        return self.rope_theta

    def validate(self, where: str) -> ModelSpec:
        """The one check of a description, whatever its source (GGUF metadata, config.json): every count in
        range before anything is sized by it, every float finite. Returns self."""
        for name, value, limit in (("vocab_size", self.vocab_size, MAX_VOCAB), ("hidden_size", self.hidden_size,
                                   MAX_WIDTH), ("n_layers", self.n_layers, MAX_LAYERS), ("n_heads", self.n_heads,
                                   MAX_HEADS), ("n_kv_heads", self.n_kv_heads, MAX_HEADS), ("head_dim",
                                   self.head_dim, MAX_WIDTH), ("ffn_size", self.ffn_size, MAX_WIDTH * 8),
                                  ("context_length", self.context_length, MAX_CONTEXT)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise InvalidModelError(f"{where}: {name} {value!r} is out of range (1..{limit})")
        if self.n_heads % self.n_kv_heads:
            raise InvalidModelError(f"{where}: {self.n_kv_heads} KV heads do not divide {self.n_heads} heads")
        if self.head_dim % 2:
            raise InvalidModelError(f"{where}: head dim {self.head_dim} must be even for RoPE")
        for name, value in (("rope_theta", self.rope_theta), ("rms_eps", self.rms_eps)):
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise InvalidModelError(f"{where}: {name} {value!r} must be a finite positive number")
        factors = self.rope_freq_factors
        if factors is not None and (len(factors) != self.head_dim // 2
                                    or not all(math.isfinite(f) and f > 0 for f in factors)):
            raise InvalidModelError(f"{where}: RoPE frequency factors must be {self.head_dim // 2} finite positive "
                                    f"numbers, got {len(factors)}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise InvalidModelError(f"{where}: activation {self.activation!r} is not silu or gelu_tanh")
        for name, value in (("embed_scale", self.embed_scale), ("attn_scale", self.attn_scale),
                            ("local_rope_theta", self.local_rope_theta)):
            if value is not None and (not isinstance(value, float) or not math.isfinite(value) or value <= 0):
                raise InvalidModelError(f"{where}: {name} {value!r} must be a finite positive number")
        if not (isinstance(self.norm_offset, float) and math.isfinite(self.norm_offset)):
            raise InvalidModelError(f"{where}: norm_offset {self.norm_offset!r} must be a finite number")
        if self.layer_windows and (len(self.layer_windows) != self.n_layers or not all(
                isinstance(w, int) and 0 <= w <= MAX_CONTEXT for w in self.layer_windows)):
            raise InvalidModelError(f"{where}: layer windows must be {self.n_layers} counts in 0..{MAX_CONTEXT}")
        return self

    @property
    def n_params(self) -> int:
        d, f, kv = self.hidden_size, self.ffn_size, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        if self.post_norms:
            per_layer += 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + d


@dataclass
class LazyTensor:
    """A tensor whose float32 values are produced on demand.

    `raw` optionally gives the tensor's stored quantized rows (type, uint8 rows) when the source holds
    them already, so a writer can copy rows through without a dequantize/requantize round trip.
    """

    name: str
    shape: tuple[int, ...]
    source_dtype: str
    loader: Callable[[], np.ndarray]
    raw: Callable[[], tuple[QuantType, np.ndarray]] | None = None

    def load(self) -> np.ndarray:
        data = self.loader()
        if data.shape != self.shape:
            data = data.reshape(self.shape)
        return np.ascontiguousarray(data, dtype=np.float32)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class CanonicalModel:
    spec: ModelSpec
    tensors: dict[str, LazyTensor]  # Hugging Face names
    tokenizer_json: str  # a Hugging Face `tokenizers` JSON document
    special: SpecialTokens
    chat_template: str | None
    pre_tokenizer: str | None = None  # llama.cpp pre-tokenizer name, when the source states it
    # The source's GGUF vocabulary (GGUFVocab) when it has one: SentencePiece scores do not fit in tokenizer.json,
    # so a GGUF target writes the tokenizer.ggml.* keys from it rather than from tokenizer_json.
    gguf_vocab: Any = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # general.* facts: name, license, source...
    source_path: str = ""
    source_format: str = ""  # "hf" or "gguf"
    close: Callable[[], None] = lambda: None
