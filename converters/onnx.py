"""Target ONNX (`--to onnx`): a decoder graph with a KV cache, in the folder layout onnxruntime-genai loads.

model.onnx (+ model.onnx.data, weights streamed one tensor at a time) takes input_ids, attention_mask and
past_key_values.{i}.key/.value (batch, kv_heads, past, head_dim) and returns logits for every position plus
present.{i}.key/.value. RMSNorm from standard ops (onnxruntime fuses it), attention through the
com.microsoft GroupQueryAttention op (packed q|k|v, rotate-half RoPE from cos/sin caches, KV cache append,
grouped heads, causal mask; what onnxruntime-genai's builder emits too), SwiGLU; q/k/v and gate/up projections
are fused into one matmul each. A graph of standard ops only (explicit RoPE, mask and broadcasting GQA) ran
2-3x slower at decode on onnxruntime's CPU provider: ~50 small nodes per layer instead of ~13.
Weights: f32; f16 (stored half, cast to float32 once when onnxruntime loads the model); int4 and int8 through
the com.microsoft MatMulNBits op (what onnxruntime-genai's builder writes; asymmetric blocks, of 32 for int4
and 16 for int8 by default, see DEFAULTS); the embedding is quantized the same way and, when tied,
shares the output layer's bytes (GatherBlockQuantized for int4). int8 keeps a few sensitive layers in f16
(see FLOAT_LAYERS).
Why not MatMulInteger + DynamicQuantizeLinear for int8: they quantize activations per tensor, and the
activation outliers of small LLMs ruin it (SmolLM2-135M: top-1 agreement 53% on a 256-token prefill, 87% token
by token, against 96-98% for MatMulNBits 8-bit blocks).
genai_config.json, tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja sit
beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from ondevice.converters.base import (
    ConvertOptions,
    ConvertResult,
    Target,
    TargetOption,
    awq_folded,
    awq_target_options,
    check_calibration_chunks,
    check_method,
    count_types,
    options_as,
    peak_rss_mib,
    progress_bar,
    write_tokenizer_files,
)

from ondevice.architectures import get_architecture
from ondevice.decoder import DecoderOps, attention_scale, check_consumed, require_features, run_decoder
from ondevice.errors import MissingExtraError, OndeviceError, UnsupportedError
from ondevice.formats.atomic import atomic_output
from ondevice.model import CanonicalModel, LazyTensor
from ondevice.rope import rope_kind, rope_tables


@dataclass
class ONNXOptions(ConvertOptions):
    block_size: int | None = None  # MatMulNBits block; None = the scheme's default (DEFAULTS)
    symmetric: bool | None = None  # None = the scheme's default
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations inside the kernel (fast on CPU; the builder's default)
    float_layers: bool = True  # keep the layers FLOAT_LAYERS names for this quant in f16 (False: quantize all)
    method: str | None = None  # "awq": scales searched on the calibration text, folded in before the rounding
    calibration_chunks: int | None = None  # chunks of 512 tokens of the calibration text (default: all, 24)


METHODS = ("awq",)

TARGET = Target(
    name="onnx",
    quants=("f32", "f16", "int8", "int4"),
    default_quant="int4",
    generic={"4bit": "int4", "8bit": "int8"},
    output_is_dir=True,
    suffix="",
    description="an ONNX Runtime folder (model.onnx + genai_config.json) for onnxruntime and onnxruntime-genai",
    options=ONNXOptions,
    cli_options=(
        TargetOption("--block-size", "block_size", "MatMulNBits block: 16, 32, 64, 128 or 256 (default: int4 32, "
                     "int8 16)"),
        *awq_target_options("MatMulNBits' own rounding", "onnxruntime"),
    ),
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ROWS_PER_CHUNK_ELEMENTS = 1 << 22


# Measured on SmolLM2-135M (from its Q4_1 GGUF) against the f32 model, KL / top-1 on the bundled text:
# int4 block 32: asymmetric 0.59 / 60% beats symmetric 0.65 / 56% (the builder's default) for 2.4% more bytes.
# int8 with accuracy_level 4 (int8 activations, per block, inside the kernel): asymmetric block 16 0.0046 / 96.8%,
# symmetric 16 0.0053 / 96.3%, symmetric 32 0.0077 / 94.8%. accuracy_level 0 (float activations) reaches
# 0.0017 / 98.4% but onnxruntime's CPU provider has no packed 8-bit float kernel: ~10x slower decoding.
DEFAULTS: dict[str, tuple[int, bool]] = {"int4": (32, False), "int8": (16, False)}  # (block, symmetric)

# Linear layers kept in f16 (stored half, float32 at run time) inside a quantized artifact: (layer kinds in every
# block, number of last blocks kept whole). Why, for int8: with int8 activations the kernel quantizes its input in
# blocks of 16, and the inputs of q|k|v (an RMSNorm output) carry outlier channels, as do all activations of the
# last blocks (SmolLM2-135M: one channel 56x the median at gate|up and 125x at down_proj in block 29). Measured on
# SmolLM2-135M, KL / top-1 on the bundled text (held-out text in parentheses), decode tok/s relative to all-int8
# (2 threads, onnxruntime-genai; prefill about the same): all int8 0.0046 / 96.8% (0.0059 / 96.0%), 180.6 MB;
# q|k|v f16 0.0029 / 96.6% (0.0037 / 96.9%), 194.3 MB, -11%; q|k|v + last 2 blocks f16 0.0024 / 97.4%
# (0.0033 / 97.2%), 198.5 MB, -18%; q|k|v + gate|up f16 0.0018 / 98.1% (0.0026 / 97.9%), 229.8 MB, -38%.
# lm_head or q|k|v at accuracy_level 0 instead: 3-9x slower decoding (no fast 8-bit kernel with float activations).
# Reproduce: benchmarks/onnx_int8_schemes.py (docs/BENCHMARKS.md section 5).
FLOAT_LAYERS: dict[str, tuple[tuple[str, ...], int]] = {"int8": (("qkv_proj",), 2)}


@dataclass
class _Head:
    """What the output layer reuses from the embedding when they are tied."""

    initializers: list[str] = field(default_factory=list)


class _Weights:
    """Emits linear layers and embeddings in the chosen scheme, writing each weight as soon as it is loaded."""

    def __init__(self, g: Any, quant: str, block: int, symmetric: bool, accuracy_level: int,
                 float_layers: tuple[tuple[str, ...], int] = ((), 0), n_layers: int = 0) -> None:
        from onnx import TensorProto

        self.g, self.quant, self.block = g, quant, block
        self.bits = {"int4": 4, "int8": 8}.get(quant)
        self.symmetric, self.accuracy_level = symmetric, accuracy_level
        self.float_kinds, self.float_tail, self.n_layers = float_layers[0], float_layers[1], n_layers
        self.FLOAT = TensorProto.FLOAT
        self.types: list[str] = []
        self.kept_float: list[str] = []

    @property
    def type_name(self) -> str:
        return f"{self.quant}-b{self.block}" if self.bits else self.quant

    # ---- float helpers
    def float_weight(self, name: str, array: np.ndarray, half: bool = False) -> str:
        """A float tensor as float32 in the graph; stored half in f16 artifacts (or when `half`)."""
        if half or self.quant == "f16":
            stored = self.g.weight(name, array.astype(np.float16))
            return self.g.op("Cast", [stored], f"{name}/cast", to=self.FLOAT)
        return self.g.weight(name, array.astype(np.float32))

    def keeps_float(self, name: str, block: int) -> bool:
        """Whether quantized artifacts keep this linear layer of this block in f16 (FLOAT_LAYERS)."""
        if self.bits is None:
            return False
        in_tail = self.float_tail > 0 and block >= self.n_layers - self.float_tail
        return in_tail or name.rsplit(".", 1)[-1] in self.float_kinds

    # ---- linear layers: w is (N outputs, K inputs) as in Hugging Face
    def linear(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None, block: int = -1) -> str:
        """x @ w.T (+ bias); `block` is the decoder block the layer belongs to (-1: none)."""
        g = self.g
        n, k = w.shape
        half = block >= 0 and self.keeps_float(name, block)
        if self.bits is None or half:
            out = g.op("MatMul", [x, self.float_weight(f"{name}.weight", np.ascontiguousarray(w.T), half)], name)
        else:
            out = self._matmul_nbits(x, self._quantized(w, name), k, n, name)
        self.types.append("f16" if half else self.type_name)
        if half:
            self.kept_float.append(name)
        if bias is not None:
            out = g.op("Add", [out, g.weight(f"{name}.bias", bias.astype(np.float32))], f"{name}/bias")
        return out

    def _quantized(self, w: np.ndarray, name: str) -> list[str]:
        """Initializers (B, scales[, zero points]) of a MatMulNBits weight."""
        from ondevice.converters.onnx_graph import quantize_blocks

        assert self.bits is not None
        # Row chunks bound the float32 temporaries (a 150k-token embedding would need several GB at once).
        step = max(1, ROWS_PER_CHUNK_ELEMENTS // w.shape[1])
        parts = [quantize_blocks(w[i:i + step], self.block, self.bits, self.symmetric)
                 for i in range(0, w.shape[0], step)]
        packed, scales = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        zero_points = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        del parts
        names = [self.g.weight(f"{name}.weight_q{self.bits}", packed),
                 self.g.weight(f"{name}.weight_scales", scales)]
        if zero_points is not None:
            names.append(self.g.weight(f"{name}.weight_zero_points", zero_points))
        return names

    def _matmul_nbits(self, x: str, initializers: list[str], k: int, n: int, name: str) -> str:
        return self.g.op("MatMulNBits", [x, *initializers], name, domain=MS_DOMAIN, K=k, N=n, bits=self.bits,
                         block_size=self.block, accuracy_level=self.accuracy_level)

    # ---- embedding and output layer
    def embedding(self, ids: str, table: np.ndarray, tied: bool) -> tuple[str, _Head]:
        g = self.g
        name = "model.embed_tokens"
        self.types.append(self.type_name)
        if self.bits is None:
            weight = self.float_weight(f"{name}.weight", table)
            return g.op("Gather", [weight, ids], f"{name}/gather"), _Head([weight])
        vocab, hidden = table.shape
        if hidden % self.block:
            raise UnsupportedError(f"the embedding width {hidden} is not a multiple of the block size {self.block}")
        # Tied: the output layer's MatMulNBits weight doubles as the table (same bytes, one copy in the file).
        initializers = self._quantized(table, "lm_head" if tied else name)
        blocks = hidden // self.block
        if self.bits == 4:
            rows = g.op("Reshape", [initializers[0], g.const([vocab, hidden // 2])], f"{name}/rows")
            out = g.op("GatherBlockQuantized", [rows, ids, *initializers[1:]], f"{name}/gather",
                       domain=MS_DOMAIN, bits=4, block_size=self.block, gather_axis=0, quantize_axis=1)
            return out, _Head(initializers)
        # 8-bit (GatherBlockQuantized takes 4-bit data only): gather code rows and their block scales, then
        # (code - zero point) * scale with standard ops, block by block.
        codes = g.op("Cast", [g.op("Gather", [initializers[0], ids], f"{name}/gather")], f"{name}/cast",
                     to=self.FLOAT)  # (batch, seq, blocks, block)
        if len(initializers) > 2:
            zero = g.op("Cast", [g.op("Gather", [initializers[2], ids], f"{name}/gather_zero")],
                        f"{name}/zero_cast", to=self.FLOAT)
            zero = g.op("Unsqueeze", [zero, g.const([-1])], f"{name}/zero")
        else:
            zero = g.const(128.0, np.float32)
        scales = g.op("Unsqueeze", [g.op("Gather", [initializers[1], ids], f"{name}/gather_scales"),
                                    g.const([-1])], f"{name}/scales")
        values = g.op("Mul", [g.op("Sub", [codes, zero], f"{name}/center"), scales], f"{name}/dequantize")
        assert blocks * self.block == hidden
        return g.op("Reshape", [values, g.const([0, 0, hidden])], f"{name}/rows"), _Head(initializers)

    def lm_head(self, x: str, head: _Head | None, table: LazyTensor | None, vocab: int, hidden: int) -> str:
        g = self.g
        if head is None:  # untied: its own weight
            assert table is not None
            return self.linear(x, table.load(), "lm_head")
        self.types.append(self.type_name)
        if self.bits is None:
            # Tied float table (vocab, hidden): Gemm with transB reads it in place, no transposed copy.
            flat = g.op("Reshape", [x, g.const([-1, hidden])], "lm_head/flatten")
            logits = g.op("Gemm", [flat, head.initializers[0]], "lm_head", transB=1)
            shape = g.op("Concat", [g.op("Shape", [x], "lm_head/shape", end=-1), g.const([vocab])],
                         "lm_head/out_shape", axis=0)
            return g.op("Reshape", [logits, shape], "lm_head/unflatten")
        return self._matmul_nbits(x, head.initializers, hidden, vocab, "lm_head")


# What this graph builder expresses (decoder.FEATURES)
SUPPORTED_FEATURES = ("qkv_bias", "qk_norm", "rope_freq_factors", "norm_offset", "post_norms", "gelu_tanh",
                      "embed_scale", "attn_scale", "sliding_window", "local_rope_theta")


@dataclass(frozen=True)
class _Part:
    """Output `index` of a fused projection `packed` (widths `widths`), split only when used apart."""

    packed: str
    index: int
    widths: tuple[int, ...]


class _OnnxOps(DecoderOps[Any]):
    """Nodes of the decoder; every weight is loaded, emitted and dropped when its node is built."""

    def __init__(self, model: CanonicalModel, g: Any, weights: _Weights, bar: Any, seqlens_k: str,
                 total_len: str) -> None:
        super().__init__(model.spec)
        self.model, self.g, self.weights, self.bar = model, g, weights, bar
        self.seqlens_k, self.total_len = seqlens_k, total_len
        self.head: _Head | None = None
        self.splits: dict[str, list[str]] = {}
        self.rope_caches: dict[tuple[float, bool], tuple[str, str]] = {}  # (base, scaled) -> cos, sin initializers

    def rope_cache(self, layer: int) -> tuple[str, str]:
        """GroupQueryAttention's cos/sin caches for this layer's RoPE (one pair per distinct base and scaling)."""
        spec = self.spec
        key = rope_kind(spec, layer)
        if key not in self.rope_caches:
            cos, sin = rope_tables(spec, spec.context_length, layer=layer)
            suffix = "" if not self.rope_caches else f"_{len(self.rope_caches)}"
            self.rope_caches[key] = (self.g.weight(f"rope.cos_cache{suffix}", cos),
                                     self.g.weight(f"rope.sin_cache{suffix}", sin))
        return self.rope_caches[key]

    def load(self, role: str, layer: int | None) -> np.ndarray:
        self.bar.update(1)
        return self.model.tensors[self.tensor_name(role, layer)].load()

    def value(self, x: Any) -> str:
        """A graph value name, splitting a fused projection's parts out (once) when one is used apart."""
        if not isinstance(x, _Part):
            return x
        if x.packed not in self.splits:
            self.splits[x.packed] = self.g.node("Split", [x.packed, self.g.const(list(x.widths))],
                                                f"{x.packed}/split", len(x.widths), axis=-1)
        return self.splits[x.packed][x.index]

    def embed(self) -> str:
        hidden, self.head = self.weights.embedding("input_ids", self.load("embed", None), self.spec.tie_embeddings)
        return hidden

    def scale(self, x: Any, factor: float) -> str:
        return self.g.op("Mul", [self.value(x), self.g.const(factor, np.float32)], "embed/scale")

    def norm(self, x: Any, role: str, layer: int | None) -> str:
        base = self.arch.hf_tensor(role, layer).removesuffix(".weight")
        return self._rms_norm(self.value(x), self.load(role, layer), base)

    def _rms_norm(self, x: str, weight: np.ndarray, base: str) -> str:
        g = self.g
        w = self.weights.float_weight(f"{base}.weight", weight)
        if self.spec.norm_offset:  # the source's w is stored (f16 artifacts round it, not 1 + w)
            w = g.op("Add", [w, g.const(self.spec.norm_offset, np.float32)], f"{base}/offset")
        square = g.op("Pow", [x, g.const(2.0, np.float32)], f"{base}/pow")
        mean = g.op("ReduceMean", [square], f"{base}/mean", axes=[-1], keepdims=1)
        root = g.op("Sqrt", [g.op("Add", [mean, g.const(self.spec.rms_eps, np.float32)], f"{base}/eps")],
                    f"{base}/sqrt")
        return g.op("Mul", [g.op("Div", [x, root], f"{base}/div"), w], f"{base}/scale")

    def project(self, x: Any, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[Any]:
        """One MatMul for all roles (q|k|v, gate|up): their outputs stay packed until used apart."""
        x = self.value(x)
        names = [self.arch.hf_tensor(role, layer).removesuffix(".weight") for role in roles]
        fused = names[0] if len(roles) == 1 else _fused_name(names)
        w = np.concatenate([self.load(role, layer) for role in roles])
        b = np.concatenate([self.load(f"{role}_bias", layer) for role in roles]) if bias else None
        out = self.weights.linear(x, w, fused, b, block=layer)
        widths = tuple(int(self.model.tensors[self.arch.hf_tensor(role, layer)].shape[0]) for role in roles)
        del w
        return [out] if len(roles) == 1 else [_Part(out, i, widths) for i in range(len(roles))]

    def head_norm(self, x: Any, role: str, layer: int, n_heads: int) -> str:
        g, d = self.g, self.spec.head_dim
        base = self.arch.hf_tensor(role, layer).removesuffix(".weight")
        heads = g.op("Reshape", [self.value(x), g.const([0, 0, n_heads, d])], f"{base}/heads")
        normed = self._rms_norm(heads, self.load(role, layer), base)
        return g.op("Reshape", [normed, g.const([0, 0, n_heads * d])], f"{base}/flat")

    def attention(self, q: Any, k: Any, v: Any, layer: int) -> str:
        spec, g = self.spec, self.g
        a = f"model.layers.{layer}.self_attn"
        packed = all(isinstance(t, _Part) for t in (q, k, v)) and q.packed == k.packed == v.packed
        # Packed q|k|v (or q, k, v apart); rotate-half RoPE, the KV cache append, grouped heads and the causal
        # mask inside.
        qkv = [q.packed, "", ""] if packed else [self.value(q), self.value(k), self.value(v)]
        window = {"local_window_size": spec.window(layer)} if spec.window(layer) else {}
        return g.node("GroupQueryAttention", [*qkv, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                                              self.seqlens_k, self.total_len, *self.rope_cache(layer)],
                      f"{a}/attention", [f"{a}/attention/out", f"present.{layer}.key", f"present.{layer}.value"],
                      domain=MS_DOMAIN, num_heads=spec.n_heads, kv_num_heads=spec.n_kv_heads, do_rotary=1,
                      rotary_interleaved=0, scale=float(attention_scale(spec)), **window)[0]

    def gated_act(self, gate: Any, up: Any, layer: int) -> str:
        g, m = self.g, f"model.layers.{layer}.mlp"
        gate, up = self.value(gate), self.value(up)
        if self.spec.activation == "gelu_tanh":  # x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
            c = 2 * np.sqrt(2 / np.pi)
            inner = g.op("Add", [g.const(c, np.float32), g.op("Mul", [g.const(c * 0.044715, np.float32),
                                                                       g.op("Mul", [gate, gate], f"{m}/square")],
                                                               f"{m}/poly")], f"{m}/inner")
            sigmoid = g.op("Sigmoid", [g.op("Mul", [gate, inner], f"{m}/2u")], f"{m}/sigmoid")
            act = g.op("Mul", [gate, sigmoid], f"{m}/gelu")
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{m}/sigmoid")], f"{m}/silu")
        return g.op("Mul", [act, up], f"{m}/gated")

    def add(self, x: Any, y: Any, layer: int, what: str) -> str:
        return self.g.op("Add", [self.value(x), self.value(y)], f"model.layers.{layer}/{what}_residual")

    def logits(self, x: Any) -> str:
        spec = self.spec
        if spec.tie_embeddings:
            self.tensor_name("embed", None)
            return self.weights.lm_head(x, self.head, None, spec.vocab_size, spec.hidden_size)
        self.bar.update(1)
        table = self.model.tensors[self.tensor_name("output", None)]
        return self.weights.lm_head(x, None, table, spec.vocab_size, spec.hidden_size)


class _BlockRounding:
    """MatMulNBits' rounding as AWQ's search sees a quantizer: quantize() returns the rounded float32 weights
    (quantize_blocks, then (code - zero point) * scale), dequantize() hands them back as they are."""

    def __init__(self, block: int, bits: int, symmetric: bool) -> None:
        self.name, self.block, self.bits, self.symmetric = f"onnx_int{bits}_b{block}", block, bits, symmetric

    def quantize(self, x: np.ndarray, *, name: str | None = None, importance: np.ndarray | None = None) -> np.ndarray:
        from ondevice.converters.onnx_graph import dequantize_blocks, quantize_blocks

        return dequantize_blocks(*quantize_blocks(x, self.block, self.bits, self.symmetric), self.bits, x.shape[1])

    def dequantize(self, data: np.ndarray, n: int) -> np.ndarray:
        return data


def awq_types(model: CanonicalModel, weights: _Weights) -> dict:
    """What AWQ's search rounds each tensor with: MatMulNBits' rounding for the linear layers the graph quantizes,
    float for the rest (the embedding and output layer are quantized by the graph but not scaled by AWQ)."""
    from ondevice.quant import get_quant_type

    f32 = get_quant_type("f32")
    rounding = _BlockRounding(weights.block, weights.bits, weights.symmetric)
    arch = get_architecture(model.spec.arch)
    types = {name: f32 for name in model.tensors}
    for layer in range(model.spec.n_layers):
        for fused, roles in (("qkv_proj", ("q", "k", "v")), ("o_proj", ("o",)), ("gate_up_proj", ("gate", "up")),
                             ("down_proj", ("down",))):
            if not weights.keeps_float(fused, layer):
                types.update({arch.hf_tensor(role, layer): rounding for role in roles})
    return types


def _fused_name(names: list[str]) -> str:
    """...self_attn.q_proj + k_proj + v_proj -> ...self_attn.qkv_proj; ...mlp.gate_proj + up_proj ->
    ...mlp.gate_up_proj (the names FLOAT_LAYERS and earlier artifacts use)."""
    parent = names[0].rsplit(".", 1)[0]
    kinds = [n.rsplit(".", 1)[1].removesuffix("_proj") for n in names]
    return f"{parent}.{('' if all(len(k) == 1 for k in kinds) else '_').join(kinds)}_proj"


def _build_graph(model: CanonicalModel, g: Any, weights: _Weights, bar: Any) -> tuple[list[Any], list[Any]]:
    """Nodes of the decoder, weights streamed in order; returns the graph's (inputs, outputs) value infos."""
    from onnx import TensorProto, helper

    spec = model.spec
    require_features(spec, "onnx", SUPPORTED_FEATURES)
    d, nkv = spec.head_dim, spec.n_kv_heads
    FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", INT64, ["batch_size", "total_sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch_size", "sequence_length", spec.vocab_size])]
    for i in range(spec.n_layers):
        kv_dims = ["batch_size", nkv, "past_sequence_length", d]
        present_dims = ["batch_size", nkv, "total_sequence_length", d]
        inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", FLOAT, kv_dims)
                   for kind in ("key", "value")]
        outputs += [helper.make_tensor_value_info(f"present.{i}.{kind}", FLOAT, present_dims)
                    for kind in ("key", "value")]

    # GroupQueryAttention's view of the cache: per sequence the index of its last token (mask sum - 1) and the
    # total length; it derives positions (for RoPE) and the causal mask from them.
    mask_sum = g.op("ReduceSum", ["attention_mask", g.const([1])], "mask/sum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, g.const(1)], "mask/last")], "mask/seqlens_k",
                     to=TensorProto.INT32)
    total = g.op("Squeeze", [g.op("Shape", ["attention_mask"], "mask/shape", start=1, end=2), g.const([0])],
                 "mask/total")
    total_len = g.op("Cast", [total], "mask/total_len", to=TensorProto.INT32)
    ops = _OnnxOps(model, g, weights, bar, seqlens_k, total_len)
    g.op("Identity", [run_decoder(ops)], "logits", out="logits")
    check_consumed(model.tensors, ops.used, "onnx")
    return inputs, outputs


def genai_config(model: CanonicalModel) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this decoder (the same keys its model builder writes)."""
    spec, special = model.spec, model.special
    eos = special.eos_ids or ([special.eos_id] if special.eos_id is not None else [])
    generation = model.generation_config
    return {
        "model": {
            "bos_token_id": special.bos_id,
            "context_length": spec.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": spec.n_kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": special.pad_id if special.pad_id is not None else (eos[0] if eos else 0),
            "type": spec.arch,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": spec.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 50)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


def _check_options(options: ONNXOptions) -> tuple[int, bool, int]:
    block = options.block_size
    symmetric = options.symmetric
    if options.quant not in DEFAULTS:
        if block is not None:
            raise UnsupportedError(f"--block-size applies to --quant int4/int8 only, not {options.quant}")
        if options.method is not None:
            raise UnsupportedError(f"--quant {options.quant} keeps the weights in float: there is nothing to "
                                   f"calibrate (--method {options.method} applies to int4/int8)")
        check_calibration_chunks(options.calibration_chunks, False, "--method awq")
        return 0, True, 0
    default_block, default_symmetric = DEFAULTS[options.quant]
    block = default_block if block is None else block
    if block not in BLOCK_SIZES:
        raise UnsupportedError(f"--block-size {block} is not supported by MatMulNBits; choose 16, 32, 64, 128 or 256")
    accuracy = int(options.accuracy_level)
    if accuracy not in (0, 1, 2, 3, 4):
        raise UnsupportedError(f"accuracy level {accuracy} is not one of 0-4")
    check_method(options.method, METHODS, "onnx")
    check_calibration_chunks(options.calibration_chunks, options.method is not None, "--method awq")
    return block, default_symmetric if symmetric is None else bool(symmetric), accuracy


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    options = options_as(ONNXOptions, options)
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise MissingExtraError("--to onnx needs the onnx package: pip install onnx") from None
    from ondevice.converters.onnx_graph import ExternalData, GraphBuilder

    start = time.perf_counter()
    block, symmetric, accuracy = _check_options(options)
    spec = model.spec
    if spec.head_dim % 16:
        raise UnsupportedError(f"head_dim {spec.head_dim} is not a multiple of 16, which onnxruntime's "
                               "GroupQueryAttention needs")
    keep = FLOAT_LAYERS.get(options.quant, ((), 0)) if options.float_layers else ((), 0)
    if options.method is not None:
        # the scales change the tensors the graph reads: the same graph builder over the folded model
        model = replace(model, tensors={**model.tensors, **awq_folded(
            model, awq_types(model, _Weights(None, options.quant, block, symmetric, accuracy, keep, spec.n_layers)),
            options.calibration_chunks, options.progress)})

    with atomic_output(out, force=options.force, directory=True) as tmp:
        data = ExternalData(tmp / DATA_FILE)
        try:
            g = GraphBuilder(data)
            weights = _Weights(g, options.quant, block, symmetric, accuracy, keep, spec.n_layers)
            with progress_bar(len(model.tensors), f"onnx {options.quant}", options.progress) as bar:
                inputs, outputs = _build_graph(model, g, weights, bar)
        finally:
            data.close()
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        onnx_model = helper.make_model(graph, opset_imports=opsets, ir_version=8, producer_name="ondevice",
                                       doc_string=f"{spec.arch} decoder, {options.quant}")
        for key, value in (("ondevice.quant", options.quant), ("ondevice.arch", spec.arch),
                           ("ondevice.block_size", str(block) if weights.bits else "")):
            if value:
                entry = onnx_model.metadata_props.add()
                entry.key, entry.value = key, value
        onnx.save_model(onnx_model, str(tmp / MODEL_FILE))
        try:
            onnx.checker.check_model(str(tmp / MODEL_FILE))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid graph"
            raise OndeviceError(f"the ONNX graph failed onnx.checker ({first}); please report this") from None
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(model), indent=2) + "\n", encoding="utf-8")
        write_tokenizer_files(model, tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir())
    notes = []
    if weights.bits:
        kind = "symmetric" if symmetric else "asymmetric"
        notes.append(f"onnx {options.quant}: MatMulNBits, block {block}, {kind}, accuracy_level {accuracy}"
                     + (f", {options.method} scales folded in" if options.method else ""))
        if weights.kept_float:
            kinds = "/".join(weights.float_kinds) or "none"
            notes.append(f"onnx {options.quant}: {len(weights.kept_float)} sensitive linear layers kept in f16 "
                         f"({kinds} in every block, all of the last {weights.float_tail}; see FLOAT_LAYERS)")
    return ConvertResult(
        target="onnx", quant=options.quant, output=str(out), size_bytes=size, seconds=time.perf_counter() - start,
        tensor_types=count_types(weights.types), notes=notes, peak_rss_mib=peak_rss_mib(),
    )
