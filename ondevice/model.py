"""The canonical model every source produces and every writer consumes.

Tensors use Hugging Face names and layouts (rotate-half q/k rows, (out, in) matrices); they are lazy, so a
converter holds one tensor in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ondevice.quant import QuantType
    from ondevice.tokenizer import SpecialTokens


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
    name: str = "model"

    @property
    def n_params(self) -> int:
        d, f, kv = self.hidden_size, self.ffn_size, self.n_kv_heads * self.head_dim
        q = self.n_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += q + 2 * kv
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
    generation_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # general.* facts: name, license, source...
    source_path: str = ""
    source_format: str = ""  # "hf" or "gguf"
    close: Callable[[], None] = lambda: None
