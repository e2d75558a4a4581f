"""What every decoder architecture shares: HF config <-> spec, tensor names in HF and GGUF, GGUF keys.

An architecture file (llama.py, qwen2.py) subclasses DecoderArchitecture, sets its flags and overrides
what differs; registering it is one line in architectures/__init__.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.formats.gguf import GGUFFile, TypedValue, ValueType
from ondevice.model import MAX_WIDTH, ModelSpec
from ondevice.rope import freq_factors_from_hf

# The tensor table: role -> (HF name, GGUF name); per-layer names lack their "model.layers.N." / "blk.N." prefix.
# The decoder (ondevice/decoder.py) and every backend ask for tensors by role.
LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attn_norm": ("input_layernorm.weight", "attn_norm.weight"),
    "q": ("self_attn.q_proj.weight", "attn_q.weight"),
    "k": ("self_attn.k_proj.weight", "attn_k.weight"),
    "v": ("self_attn.v_proj.weight", "attn_v.weight"),
    "q_bias": ("self_attn.q_proj.bias", "attn_q.bias"),
    "k_bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "v_bias": ("self_attn.v_proj.bias", "attn_v.bias"),
    "q_norm": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "k_norm": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    "o": ("self_attn.o_proj.weight", "attn_output.weight"),
    "ffn_norm": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "down": ("mlp.down_proj.weight", "ffn_down.weight"),
    # sandwich norms (gemma3): on the attention's and the MLP's output, before the residual add
    "post_attn_norm": ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    "post_ffn_norm": ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
}
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "output": ("lm_head.weight", "output.weight"),
}
ROPE_FREQS_GGUF = "rope_freqs.weight"  # llama.cpp's per-pair frequency factors: part of the spec, not a weight


def _require(config: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = config.get(key)
    if value is None:
        raise InvalidModelError(f"{where}: config.json lacks {key!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidModelError(f"{where}: config.json {key!r} should be {kind.__name__}, got {value!r}")
    if kind in (int, float) and value <= 0:
        raise InvalidModelError(f"{where}: config.json {key!r} must be positive, got {value!r}")
    return value


def _optional(config: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """An optional config field: None when absent, else of the right kind and positive (checked like _require)."""
    return None if config.get(key) is None else _require(config, key, kind, where)


def permute_for_gguf(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp interleaved-pair order: per head, row i and i+D/2 become 2i, 2i+1."""
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_from_gguf(rows: np.ndarray, n_heads: int) -> np.ndarray:
    shape = rows.shape
    return rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class DecoderArchitecture:
    name: str = ""  # GGUF general.architecture
    hf_architectures: tuple[str, ...] = ()  # config.json "architectures" entries
    hf_model_type: str = ""
    neox_rope: bool = False  # qwen2: rotate-half RoPE in llama.cpp too, so no row permutation
    qkv_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm per q/k head before RoPE
    rope_scaling_types: tuple[str, ...] = ()  # HF rope_scaling types this architecture expresses as rope_freqs
    layer_tensors: dict[str, tuple[str, str]] = LAYER_TENSORS  # role -> (HF, GGUF) names; override what differs

    # --------------------------------------------------------------------- the tensor table
    def layer_roles(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """The roles of one block's tensors this spec has, with their HF shapes."""
        d, f = spec.hidden_size, spec.ffn_size
        q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        roles: dict[str, tuple[int, ...]] = {"attn_norm": (d,), "q": (q, d), "k": (kv, d), "v": (kv, d)}
        if spec.qkv_bias:
            roles.update({"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)})
        if spec.qk_norm:
            roles.update({"q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,)})
        roles.update({"o": (d, q), "ffn_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f)})
        if spec.post_norms:
            roles.update({"post_attn_norm": (d,), "post_ffn_norm": (d,)})
        return roles

    def hf_tensor(self, role: str, layer: int | None = None) -> str:
        """The HF name of a role's tensor (of block `layer`, or a global one)."""
        if layer is None:
            return GLOBAL_TENSORS[role][0]
        return f"model.layers.{layer}.{self.layer_tensors[role][0]}"

    def gguf_tensor(self, role: str, layer: int | None = None) -> str:
        if layer is None:
            return GLOBAL_TENSORS[role][1]
        return f"blk.{layer}.{self.layer_tensors[role][1]}"

    # --------------------------------------------------------------------- Hugging Face config
    def spec_from_hf(self, config: dict[str, Any], where: str) -> ModelSpec:
        hidden = _require(config, "hidden_size", int, where)
        n_heads = _require(config, "num_attention_heads", int, where)
        n_kv = config.get("num_key_value_heads") or n_heads
        head_dim = _optional(config, "head_dim", int, where) or hidden // n_heads
        rope = config.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise InvalidModelError(f"{where}: config.json 'rope_parameters' should be an object")
        theta = _optional(config, "rope_theta", float, where) or _optional(rope, "rope_theta", float, where)
        scaling = self.rope_scaling(config, where)
        if not isinstance(n_kv, int) or isinstance(n_kv, bool):
            raise InvalidModelError(f"{where}: config.json 'num_key_value_heads' should be int, got {n_kv!r}")
        spec = ModelSpec(
            arch=self.name,
            vocab_size=_require(config, "vocab_size", int, where),
            hidden_size=hidden,
            n_layers=_require(config, "num_hidden_layers", int, where),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn_size=_require(config, "intermediate_size", int, where),
            rope_theta=theta or 10000.0,
            rms_eps=_optional(config, "rms_norm_eps", float, where) or 1e-6,
            context_length=_optional(config, "max_position_embeddings", int, where) or 2048,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            rope_freq_factors=None if scaling is None else freq_factors_from_hf(scaling, head_dim, theta or 10000.0),
            hf_rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
            name=str(config.get("_name_or_path") or "model").rstrip("/").split("/")[-1] or "model",
        )
        return spec.validate(where)

    def rope_scaling(self, config: dict[str, Any], where: str) -> dict[str, Any] | None:
        """The config's RoPE scaling object when it scales (checked field by field), else None."""
        scaling = config.get("rope_scaling")
        rope = config.get("rope_parameters") or {}
        for key, value in (("rope_scaling", scaling), ("rope_parameters", rope)):
            if value is not None and not isinstance(value, dict):
                raise InvalidModelError(f"{where}: config.json {key!r} should be an object, got {value!r:.40}")
        scaling = scaling or rope
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "default":
            return None
        if kind not in self.rope_scaling_types:
            supported = ", ".join(self.rope_scaling_types) or "none"
            raise UnsupportedError(f"{where}: RoPE scaling {kind!r} is not supported yet for {self.name} "
                                   f"(supported: {supported})")
        fields = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")
        for key in fields:
            _require(scaling, key, float, f"{where} rope_scaling")
        if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
            raise InvalidModelError(f"{where}: config.json rope_scaling low_freq_factor must be below "
                                    "high_freq_factor")
        return {"rope_type": kind, **{key: scaling[key] for key in fields}}

    def hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return {
            "architectures": [self.hf_architectures[0]],
            "model_type": self.hf_model_type,
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.ffn_size,
            "num_hidden_layers": spec.n_layers,
            "num_attention_heads": spec.n_heads,
            "num_key_value_heads": spec.n_kv_heads,
            "head_dim": spec.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": spec.context_length,
            "rms_norm_eps": spec.rms_eps,
            "rope_theta": spec.rope_theta,
            "tie_word_embeddings": spec.tie_embeddings,
            "torch_dtype": "float32",
            **self.hf_rope_config(spec),
        }

    def hf_rope_config(self, spec: ModelSpec) -> dict[str, Any]:
        if spec.rope_freq_factors is None:
            return {}
        if spec.hf_rope_scaling is None:  # factors read from a GGUF: the parameters that made them are gone
            raise UnsupportedError("hf: RoPE frequency factors without their rope_scaling parameters (a GGUF "
                                   "source) cannot be written as a config.json; convert from the HF folder")
        return {"rope_scaling": dict(spec.hf_rope_scaling)}

    # --------------------------------------------------------------------- GGUF metadata
    def gguf_fields(self, spec: ModelSpec) -> dict[str, TypedValue]:
        a = self.name
        u32, f32 = ValueType.UINT32, ValueType.FLOAT32
        fields = {
            f"{a}.context_length": TypedValue(u32, spec.context_length),
            f"{a}.embedding_length": TypedValue(u32, spec.hidden_size),
            f"{a}.block_count": TypedValue(u32, spec.n_layers),
            f"{a}.feed_forward_length": TypedValue(u32, spec.ffn_size),
            f"{a}.rope.dimension_count": TypedValue(u32, spec.head_dim),
            f"{a}.rope.freq_base": TypedValue(f32, spec.rope_theta),
            f"{a}.attention.head_count": TypedValue(u32, spec.n_heads),
            f"{a}.attention.head_count_kv": TypedValue(u32, spec.n_kv_heads),
            f"{a}.attention.layer_norm_rms_epsilon": TypedValue(f32, spec.rms_eps),
            f"{a}.vocab_size": TypedValue(u32, spec.vocab_size),
        }
        if spec.head_dim * spec.n_heads != spec.hidden_size:
            fields[f"{a}.attention.key_length"] = TypedValue(u32, spec.head_dim)
            fields[f"{a}.attention.value_length"] = TypedValue(u32, spec.head_dim)
        return fields

    def spec_from_gguf(self, gguf: GGUFFile) -> ModelSpec:
        a = self.name

        def number(key: str, kind: type, default: Any = None) -> Any:
            """A scalar of the right kind (a GGUF value may be anything: an array, a string, NaN, negative);
            ranges are ModelSpec.validate's."""
            if default is not None and gguf.get(f"{a}.{key}") is None:
                return default
            return gguf.require(f"{a}.{key}", kind)

        hidden, n_heads = number("embedding_length", int), number("attention.head_count", int)
        n_kv = number("attention.head_count_kv", int, n_heads)
        token_embd = gguf.tensors.get("token_embd.weight")
        if token_embd is None:
            raise InvalidModelError(f"{gguf.path}: token_embd.weight is missing")
        n_layers = number("block_count", int)
        present = {name.split(".")[1] for name in gguf.tensors if name.startswith("blk.")}
        if n_layers != len(present):  # checked before anything is sized by it
            raise InvalidModelError(f"{gguf.path}: metadata {a}.block_count is {n_layers} but the file holds "
                                    f"{len(present)} blocks of tensors")
        spec = ModelSpec(
            arch=a,
            vocab_size=number("vocab_size", int, token_embd.shape[0]),
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=number("attention.key_length", int, hidden // n_heads if n_heads > 0 else 0),
            ffn_size=number("feed_forward_length", int),
            rope_theta=number("rope.freq_base", float, 10000.0),
            rms_eps=number("attention.layer_norm_rms_epsilon", float),
            context_length=number("context_length", int, 2048),
            tie_embeddings="output.weight" not in gguf.tensors,
            qkv_bias=self.qkv_bias,
            qk_norm=self.qk_norm,
            rope_freq_factors=self.gguf_rope_factors(gguf),
            name=str(gguf.get("general.name", "model")),
        )
        return spec.validate(str(gguf.path))

    def gguf_rope_factors(self, gguf: GGUFFile) -> tuple[float, ...] | None:
        info = gguf.tensors.get(ROPE_FREQS_GGUF)
        if info is None:
            return None
        if not self.rope_scaling_types:
            raise InvalidModelError(f"{gguf.path}: {self.name} has no RoPE frequency factors ({ROPE_FREQS_GGUF})")
        if len(info.shape) != 1 or info.ggml_type != 0 or not 0 < info.shape[0] <= MAX_WIDTH:  # 0: GGML f32
            raise InvalidModelError(f"{gguf.path}: {ROPE_FREQS_GGUF} should be a float32 vector, got type "
                                    f"{info.ggml_type} shape {info.shape}")
        return tuple(float(f) for f in gguf.tensor_data(ROPE_FREQS_GGUF).view(np.float32).ravel())

    # --------------------------------------------------------------------- tensors
    def tensor_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """Every tensor the architecture expects, by HF name, in HF layout."""
        d = spec.hidden_size
        shapes: dict[str, tuple[int, ...]] = {self.hf_tensor("embed"): (spec.vocab_size, d)}
        roles = self.layer_roles(spec)
        for i in range(spec.n_layers):
            for role, shape in roles.items():
                shapes[self.hf_tensor(role, i)] = shape
        shapes[self.hf_tensor("final_norm")] = (d,)
        if not spec.tie_embeddings:
            shapes[self.hf_tensor("output")] = (spec.vocab_size, d)
        return shapes

    def gguf_name(self, hf_name: str) -> str:
        for hf, gg in GLOBAL_TENSORS.values():
            if hf == hf_name:
                return gg
        parts = hf_name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"]:
            for hf, gg in self.layer_tensors.values():
                if hf == parts[3]:
                    return f"blk.{parts[2]}.{gg}"
        raise UnsupportedError(f"tensor {hf_name!r} has no GGUF name for architecture {self.name}")

    def hf_name(self, gguf_name: str) -> str:
        for hf, gg in GLOBAL_TENSORS.values():
            if gg == gguf_name:
                return hf
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk":
            for hf, gg in self.layer_tensors.values():
                if gg == parts[2]:
                    return f"model.layers.{parts[1]}.{hf}"
        raise UnsupportedError(f"GGUF tensor {gguf_name!r} is not part of architecture {self.name}")

    def gguf_norm_shift(self, spec: ModelSpec, hf_name: str) -> float:
        """What a GGUF adds to this tensor: llama.cpp stores an RMSNorm's effective weight norm_offset + w."""
        return spec.norm_offset if hf_name.endswith("norm.weight") else 0.0

    def qk_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        """Head count for the llama.cpp q/k row permutation, or None when the tensor is not permuted."""
        if self.neox_rope:
            return None
        if hf_name.endswith("self_attn.q_proj.weight") or hf_name.endswith("self_attn.q_proj.bias"):
            return spec.n_heads
        if hf_name.endswith("self_attn.k_proj.weight") or hf_name.endswith("self_attn.k_proj.bias"):
            return spec.n_kv_heads
        return None
