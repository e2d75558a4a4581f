"""Gemma3ForCausalLM (Gemma 3 270M / 1B, text): GELU-tanh MLP, sandwich norms (four per block) with Gemma's
1 + w RMSNorm, q/k head norms, embeddings times sqrt(hidden), sliding-window layers (all but every sixth) with a
RoPE base of their own, q.k scaled by query_pre_attn_scalar^-1/2.

In GGUF (llama.cpp's gemma3): norms hold 1 + w, NEOX RoPE, the window in attention.sliding_window, the pattern and
the local base (10000) implied by the architecture, the query scale 1/sqrt(head dim).
"""

from __future__ import annotations

import math
from typing import Any

from ondevice.architectures.base import LAYER_TENSORS, DecoderArchitecture
from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.formats.gguf import GGUFFile, TypedValue, ValueType
from ondevice.model import MAX_CONTEXT, ModelSpec

SLIDING_PATTERN = 6  # llama.cpp: layer i slides unless i % 6 == 5
LOCAL_ROPE_THETA = 10000.0
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _default_windows(n_layers: int, window: int) -> tuple[int, ...]:
    return tuple(0 if i % SLIDING_PATTERN == SLIDING_PATTERN - 1 else window for i in range(n_layers))


class Gemma3(DecoderArchitecture):
    name = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM",)
    hf_model_type = "gemma3_text"
    neox_rope = True
    qk_norm = True
    # Gemma's "post_attention_layernorm" is the norm on the attention's output, not the llama MLP's input
    layer_tensors = {**LAYER_TENSORS, "ffn_norm": ("pre_feedforward_layernorm.weight", "ffn_norm.weight")}

    def spec_from_hf(self, config: dict[str, Any], where: str) -> ModelSpec:
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if config.get(key) is not None:
                raise UnsupportedError(f"{where}: gemma3 with {key} is not supported yet")
        if config.get("attention_bias") or config.get("use_bidirectional_attention"):
            raise UnsupportedError(f"{where}: gemma3 with attention_bias / bidirectional attention is not supported")
        act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in HF_ACTIVATIONS:
            raise UnsupportedError(f"{where}: gemma3 hidden_activation {act!r} is not supported")
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict) or not all(isinstance(v, dict) for v in rope.values()):
            raise InvalidModelError(f"{where}: config.json 'rope_parameters' should map layer types to objects")
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedError(f"{where}: RoPE scaling of gemma3's sliding layers is not supported")
        flat = {**config, "rope_parameters": full, "rope_theta": config.get("rope_theta") or full.get("rope_theta")
                or 1_000_000.0}
        spec = super().spec_from_hf(flat, where)
        window = config.get("sliding_window")
        if not isinstance(window, int) or isinstance(window, bool) or not 0 < window <= MAX_CONTEXT:
            raise InvalidModelError(f"{where}: config.json 'sliding_window' should be a positive int, got {window!r}")
        kinds = config.get("layer_types")
        if kinds is None:
            windows = _default_windows(spec.n_layers, window)
        elif (isinstance(kinds, list) and len(kinds) == spec.n_layers
              and set(kinds) <= {"sliding_attention", "full_attention"}):
            windows = tuple(window if kind == "sliding_attention" else 0 for kind in kinds)
        else:
            raise InvalidModelError(f"{where}: config.json 'layer_types' should list {spec.n_layers} of "
                                    "sliding_attention / full_attention")
        scalar = config.get("query_pre_attn_scalar", spec.head_dim)
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or not scalar > 0:
            raise InvalidModelError(f"{where}: config.json 'query_pre_attn_scalar' should be positive")
        local_theta = local.get("rope_theta") or config.get("rope_local_base_freq") or LOCAL_ROPE_THETA
        return self._gemma_spec(spec, windows, 1.0 / math.sqrt(scalar), float(local_theta), where)

    def _gemma_spec(self, spec: ModelSpec, windows: tuple[int, ...], attn_scale: float, local_theta: float,
                    where: str) -> ModelSpec:
        import dataclasses

        return dataclasses.replace(
            spec, norm_offset=1.0, post_norms=True, activation="gelu_tanh",
            embed_scale=float(math.sqrt(spec.hidden_size)),
            attn_scale=None if math.isclose(attn_scale, 1.0 / math.sqrt(spec.head_dim)) else attn_scale,
            layer_windows=windows, local_rope_theta=local_theta).validate(where)

    def hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        config = super().hf_config(spec)
        del config["hidden_act"], config["rope_theta"]
        window = max(spec.layer_windows, default=0)
        scale = spec.attn_scale if spec.attn_scale is not None else 1.0 / math.sqrt(spec.head_dim)
        scalar = scale ** -2
        full = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.hf_rope_scaling is not None:
            full.update(dict(spec.hf_rope_scaling))
        config.update({
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": round(scalar) if math.isclose(scalar, round(scalar)) else scalar,  # an int in HF
            "sliding_window": window or spec.context_length,
            "layer_types": ["sliding_attention" if spec.window(i) else "full_attention" for i in range(spec.n_layers)],
            "rope_parameters": {"full_attention": full, "sliding_attention": {
                "rope_type": "default", "rope_theta": spec.local_rope_theta or LOCAL_ROPE_THETA}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        })
        config.pop("rope_scaling", None)
        return config

    def gguf_fields(self, spec: ModelSpec) -> dict[str, TypedValue]:
        windows = [w for w in spec.layer_windows if w]
        if (len(set(windows)) > 1 or spec.layer_windows != _default_windows(spec.n_layers, max(windows, default=0))
                or spec.local_rope_theta not in (None, LOCAL_ROPE_THETA) or spec.attn_scale is not None):
            raise UnsupportedError("gguf: llama.cpp's gemma3 implies one window on every layer but each sixth, a "
                                   "local RoPE base of 10000 and a query scale of 1/sqrt(head dim); this model "
                                   "differs")
        fields = super().gguf_fields(spec)
        fields[f"{self.name}.attention.sliding_window"] = TypedValue(ValueType.UINT32, max(windows, default=0))
        # llama.cpp reads the head dim of gemma3 from key_length always
        fields[f"{self.name}.attention.key_length"] = TypedValue(ValueType.UINT32, spec.head_dim)
        fields[f"{self.name}.attention.value_length"] = TypedValue(ValueType.UINT32, spec.head_dim)
        return fields

    def spec_from_gguf(self, gguf: GGUFFile) -> ModelSpec:
        spec = super().spec_from_gguf(gguf)
        window = gguf.require(f"{self.name}.attention.sliding_window", int)
        if not 0 < window <= MAX_CONTEXT:
            raise InvalidModelError(f"{gguf.path}: metadata {self.name}.attention.sliding_window {window} is out of "
                                    "range")
        if spec.n_layers == 62:  # llama.cpp scales Gemma 3 27B's queries by 1/sqrt(hidden / heads) instead
            raise UnsupportedError(f"{gguf.path}: Gemma 3 27B's query scale is not supported yet")
        return self._gemma_spec(spec, _default_windows(spec.n_layers, window), 1.0 / math.sqrt(spec.head_dim),
                                LOCAL_ROPE_THETA, str(gguf.path))
