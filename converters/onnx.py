"""Target ONNX (`--to onnx`): a decoder graph with a KV cache, in the folder layout onnxruntime-genai loads.

model.onnx (+ model.onnx.data, weights streamed one tensor at a time) takes input_ids, attention_mask,
position_ids and past_key_values.{i}.key/.value (batch, kv_heads, past, head_dim) and returns logits for every
position plus present.{i}.key/.value. Built from standard ONNX ops (opset 17): RMSNorm, rotate-half RoPE
from cos/sin tables gathered by position id, grouped-query attention by broadcasting (no KV head copies), a
causal + padding mask from attention_mask, SwiGLU; q/k/v and gate/up projections are fused into one matmul each.
Weights: f32; f16 (stored half, cast to float32 once when onnxruntime loads the model); int4 through the
com.microsoft MatMulNBits op (blocks of 32 by default) and, for the embedding, GatherBlockQuantized on the same
bytes when embeddings are tied; int8 through the standard DynamicQuantizeLinear + MatMulInteger pair.
genai_config.json, tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja sit
beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ondevice.converters.base import (
    ConvertOptions,
    ConvertResult,
    Target,
    count_types,
    peak_rss_mib,
    progress_bar,
)

from ondevice.errors import MissingExtraError, OndeviceError, UnsupportedError
from ondevice.formats.atomic import atomic_output
from ondevice.model import CanonicalModel, LazyTensor

TARGET = Target(
    name="onnx",
    quants=("f32", "f16", "int8", "int4"),
    default_quant="int4",
    generic={"4bit": "int4", "8bit": "int8"},
    output_is_dir=True,
    suffix="",
    description="an ONNX Runtime folder (model.onnx + genai_config.json) for onnxruntime and onnxruntime-genai",
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (16, 32, 64, 128, 256)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass
class ONNXOptions(ConvertOptions):
    block_size: int | None = None  # int4 block (MatMulNBits block_size); None = 32
    symmetric: bool = True  # int4 without zero points, as onnxruntime-genai's builder does by default
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations inside the kernel (the CPU default of the builder)


@dataclass
class _Head:
    """What the output layer reuses from the embedding when they are tied."""

    initializers: list[str] = field(default_factory=list)


class _Weights:
    """Emits linear layers and embeddings in the chosen scheme, writing each weight as soon as it is loaded."""

    def __init__(self, g: Any, quant: str, block: int, symmetric: bool, accuracy_level: int) -> None:
        from onnx import TensorProto

        self.g, self.quant, self.block = g, quant, block
        self.symmetric, self.accuracy_level = symmetric, accuracy_level
        self.FLOAT = TensorProto.FLOAT
        self.types: list[str] = []

    # ---- float helpers
    def float_weight(self, name: str, array: np.ndarray) -> str:
        """A float tensor as float32 in the graph; stored half in f16 artifacts."""
        if self.quant == "f16":
            stored = self.g.weight(name, array.astype(np.float16))
            return self.g.op("Cast", [stored], f"{name}/cast", to=self.FLOAT)
        return self.g.weight(name, array.astype(np.float32))

    # ---- linear layers: w is (N outputs, K inputs) as in Hugging Face
    def linear(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
        g = self.g
        n, k = w.shape
        if self.quant in ("f32", "f16"):
            out = g.op("MatMul", [x, self.float_weight(f"{name}.weight", np.ascontiguousarray(w.T))], name)
            self.types.append(self.quant)
        elif self.quant == "int4":
            out = self._matmul_nbits(x, self._int4_initializers(w, name), k, n, name)
            self.types.append(f"int4-b{self.block}")
        else:
            out = self._matmul_int8(x, self._int8_initializers(w, name, transpose=True), name)
            self.types.append("int8")
        if bias is not None:
            out = g.op("Add", [out, g.weight(f"{name}.bias", bias.astype(np.float32))], f"{name}/bias")
        return out

    def _int4_initializers(self, w: np.ndarray, name: str) -> list[str]:
        from ondevice.converters.onnx_graph import quantize_int4_blocks

        packed, scales, zero_points = quantize_int4_blocks(w, self.block, self.symmetric)
        names = [self.g.weight(f"{name}.weight_q4", packed), self.g.weight(f"{name}.weight_scales", scales)]
        if zero_points is not None:
            names.append(self.g.weight(f"{name}.weight_zero_points", zero_points))
        return names

    def _matmul_nbits(self, x: str, initializers: list[str], k: int, n: int, name: str) -> str:
        return self.g.op("MatMulNBits", [x, *initializers], name, domain=MS_DOMAIN, K=k, N=n, bits=4,
                         block_size=self.block, accuracy_level=self.accuracy_level)

    def _int8_initializers(self, w: np.ndarray, name: str, transpose: bool) -> list[str]:
        from ondevice.converters.onnx_graph import quantize_int8_columns

        codes, scales = quantize_int8_columns(w)
        zero_points = np.full(codes.shape[0], 128, np.uint8)
        stored = np.ascontiguousarray(codes.T) if transpose else codes
        return [self.g.weight(f"{name}.weight_q8", stored), self.g.weight(f"{name}.weight_scales", scales),
                self.g.weight(f"{name}.weight_zero_points", zero_points)]

    def _matmul_int8(self, x: str, initializers: list[str], name: str) -> str:
        """y = (x_q - x_zp) (W_q - 128) * x_scale * w_scale, the pattern onnxruntime fuses into one kernel."""
        g = self.g
        weight, scales, zero_points = initializers
        xq, x_scale, x_zero = g.node("DynamicQuantizeLinear", [x], f"{name}/quantize_input", 3)
        acc = g.op("MatMulInteger", [xq, weight, x_zero, zero_points], f"{name}/matmul_integer")
        scale = g.op("Mul", [x_scale, scales], f"{name}/scale")
        return g.op("Mul", [g.op("Cast", [acc], f"{name}/cast", to=self.FLOAT), scale], name)

    # ---- embedding and output layer
    def embedding(self, ids: str, table: np.ndarray, tied: bool) -> tuple[str, _Head]:
        g = self.g
        name = "model.embed_tokens"
        if self.quant in ("f32", "f16"):
            weight = self.float_weight(f"{name}.weight", table)
            self.types.append(self.quant)
            return g.op("Gather", [weight, ids], f"{name}/gather"), _Head([weight])
        if self.quant == "int4":
            vocab, hidden = table.shape
            if hidden % self.block:
                raise UnsupportedError(f"embedding width {hidden} is not a multiple of --block-size {self.block}")
            initializers = self._int4_initializers(table, "lm_head" if tied else name)
            packed_rows = g.op("Reshape", [initializers[0], g.const([vocab, hidden // 2])], f"{name}/rows")
            out = g.op("GatherBlockQuantized", [packed_rows, ids, *initializers[1:]], f"{name}/gather",
                       domain=MS_DOMAIN, bits=4, block_size=self.block, gather_axis=0, quantize_axis=1)
            self.types.append(f"int4-b{self.block}")
            return out, _Head(initializers)
        # int8: tied tables are stored as the output layer wants them, (hidden, vocab), and gathered by column
        initializers = self._int8_initializers(table, "lm_head" if tied else name, transpose=tied)
        weight, scales, _zero = initializers
        if tied:
            columns = g.op("Gather", [weight, ids], f"{name}/gather", axis=1)  # (hidden, batch, seq)
            codes = g.op("Transpose", [columns], f"{name}/transpose", perm=[1, 2, 0])
        else:
            codes = g.op("Gather", [weight, ids], f"{name}/gather")
        centered = g.op("Sub", [g.op("Cast", [codes], f"{name}/cast", to=self.FLOAT),
                                g.const(128.0, np.float32)], f"{name}/center")
        row_scale = g.op("Unsqueeze", [g.op("Gather", [scales, ids], f"{name}/gather_scales"), g.const([-1])],
                         f"{name}/scales")
        self.types.append("int8")
        return g.op("Mul", [centered, row_scale], f"{name}/dequantize"), _Head(initializers)

    def lm_head(self, x: str, head: _Head | None, table: LazyTensor | None, vocab: int, hidden: int) -> str:
        g = self.g
        if head is None:  # untied: its own weight
            assert table is not None
            return self.linear(x, table.load(), "lm_head")
        if self.quant in ("f32", "f16"):
            # Tied float table (vocab, hidden): Gemm with transB reads it in place, no transposed copy.
            flat = g.op("Reshape", [x, g.const([-1, hidden])], "lm_head/flatten")
            logits = g.op("Gemm", [flat, head.initializers[0]], "lm_head", transB=1)
            shape = g.op("Concat", [g.op("Shape", [x], "lm_head/shape", end=-1), g.const([vocab])],
                         "lm_head/out_shape", axis=0)
            self.types.append(self.quant)
            return g.op("Reshape", [logits, shape], "lm_head/unflatten")
        self.types.append(f"int4-b{self.block}" if self.quant == "int4" else "int8")
        if self.quant == "int4":
            return self._matmul_nbits(x, head.initializers, hidden, vocab, "lm_head")
        return self._matmul_int8(x, head.initializers, "lm_head")


def _build_graph(model: CanonicalModel, g: Any, weights: _Weights, bar: Any) -> tuple[list[Any], list[Any]]:
    """Nodes of the decoder, weights streamed in order; returns the graph's (inputs, outputs) value infos."""
    from ondevice.converters.onnx_graph import rope_tables
    from onnx import TensorProto, helper

    spec = model.spec
    tensors = model.tensors
    d, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    group = nh // nkv
    FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64

    def load(name: str) -> np.ndarray:
        bar.update(1)
        return tensors[name].load()

    inputs = [
        helper.make_tensor_value_info("input_ids", INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, ["batch_size", "sequence_length", spec.vocab_size])]

    hidden, head = weights.embedding("input_ids", load("model.embed_tokens.weight"), spec.tie_embeddings)

    # RoPE: cos/sin rows for each position id, shaped (batch, 1, seq, head_dim/2) to broadcast over heads.
    cos_table, sin_table = rope_tables(d, spec.rope_theta, spec.context_length)
    cos = g.op("Unsqueeze", [g.op("Gather", [g.weight("rope.cos", cos_table), "position_ids"], "rope/cos"),
                             g.const([1])], "rope/cos_heads")
    sin = g.op("Unsqueeze", [g.op("Gather", [g.weight("rope.sin", sin_table), "position_ids"], "rope/sin"),
                             g.const([1])], "rope/sin_heads")

    # Additive mask (batch, 1, 1, seq, total): key j is visible to query i when j <= past + i and mask[j] == 1.
    seq_len = g.op("Shape", ["input_ids"], "mask/seq_len", start=1, end=2)
    total_len = g.op("Shape", ["attention_mask"], "mask/total_len", start=1, end=2)
    past_len = g.op("Sub", [total_len, seq_len], "mask/past_len")
    total = g.op("Squeeze", [total_len, g.const([0])], "mask/total")
    query_pos = g.op("Range", [g.op("Squeeze", [past_len, g.const([0])], "mask/past"), total, g.const(1)],
                     "mask/query_pos")
    key_pos = g.op("Range", [g.const(0), total, g.const(1)], "mask/key_pos")
    causal = g.op("LessOrEqual", [key_pos, g.op("Unsqueeze", [query_pos, g.const([1])], "mask/query_col")],
                  "mask/causal")
    padding = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "mask/bool", to=TensorProto.BOOL),
                                 g.const([1, 2, 3])], "mask/padding")
    visible = g.op("And", [causal, padding], "mask/visible")
    mask_bias = g.op("Where", [visible, g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32)],
                     "mask/bias")

    def rms_norm(x: str, weight_name: str) -> str:
        w = weights.float_weight(weight_name, load(weight_name))
        base = weight_name.removesuffix(".weight")
        square = g.op("Pow", [x, g.const(2.0, np.float32)], f"{base}/pow")
        mean = g.op("ReduceMean", [square], f"{base}/mean", axes=[-1], keepdims=1)
        root = g.op("Sqrt", [g.op("Add", [mean, g.const(spec.rms_eps, np.float32)], f"{base}/eps")], f"{base}/sqrt")
        return g.op("Mul", [g.op("Div", [x, root], f"{base}/div"), w], f"{base}/scale")

    def rope(x: str, name: str) -> str:
        first, second = g.node("Split", [x, g.const([d // 2, d // 2])], f"{name}/split", 2, axis=-1)
        a = g.op("Sub", [g.op("Mul", [first, cos], f"{name}/x1cos"), g.op("Mul", [second, sin], f"{name}/x2sin")],
                 f"{name}/a")
        b = g.op("Add", [g.op("Mul", [second, cos], f"{name}/x2cos"), g.op("Mul", [first, sin], f"{name}/x1sin")],
                 f"{name}/b")
        return g.op("Concat", [a, b], f"{name}/rotated", axis=-1)

    def heads(x: str, n: int, name: str) -> str:  # (batch, seq, n*d) -> (batch, n, seq, d)
        return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, d])], f"{name}/split_heads")],
                    f"{name}/heads", perm=[0, 2, 1, 3])

    for i in range(spec.n_layers):
        p = f"model.layers.{i}"
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        kv_dims = ["batch_size", nkv, "past_sequence_length", d]
        inputs += [helper.make_tensor_value_info(past_k, FLOAT, kv_dims),
                   helper.make_tensor_value_info(past_v, FLOAT, kv_dims)]
        present_dims = ["batch_size", nkv, "total_sequence_length", d]
        outputs += [helper.make_tensor_value_info(f"present.{i}.key", FLOAT, present_dims),
                    helper.make_tensor_value_info(f"present.{i}.value", FLOAT, present_dims)]

        x = rms_norm(hidden, f"{p}.input_layernorm.weight")
        a = f"{p}.self_attn"
        w_qkv = np.concatenate([load(f"{a}.q_proj.weight"), load(f"{a}.k_proj.weight"), load(f"{a}.v_proj.weight")])
        b_qkv = None
        if spec.qkv_bias:
            b_qkv = np.concatenate([load(f"{a}.q_proj.bias"), load(f"{a}.k_proj.bias"), load(f"{a}.v_proj.bias")])
        qkv = weights.linear(x, w_qkv, f"{a}.qkv_proj", b_qkv)
        del w_qkv
        q, k, v = g.node("Split", [qkv, g.const([nh * d, nkv * d, nkv * d])], f"{a}/split_qkv", 3, axis=-1)
        q = rope(heads(q, nh, f"{a}/q"), f"{a}/q_rope")
        k = rope(heads(k, nkv, f"{a}/k"), f"{a}/k_rope")
        v = heads(v, nkv, f"{a}/v")
        keys = g.op("Concat", [past_k, k], f"{a}/keys", out=f"present.{i}.key", axis=2)
        values = g.op("Concat", [past_v, v], f"{a}/values", out=f"present.{i}.value", axis=2)
        # GQA by broadcasting: queries (b, kv, group, s, d) against keys (b, kv, 1, t, d).
        q5 = g.op("Mul", [g.op("Reshape", [q, g.const([0, nkv, group, -1, d])], f"{a}/q_groups"),
                          g.const(1.0 / np.sqrt(d), np.float32)], f"{a}/q_scaled")
        k5 = g.op("Transpose", [g.op("Unsqueeze", [keys, g.const([2])], f"{a}/k_groups")], f"{a}/k_t",
                  perm=[0, 1, 2, 4, 3])
        scores = g.op("Add", [g.op("MatMul", [q5, k5], f"{a}/scores"), mask_bias], f"{a}/masked")
        probs = g.op("Softmax", [scores], f"{a}/softmax", axis=-1)
        ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [values, g.const([2])], f"{a}/v_groups")], f"{a}/context")
        ctx = g.op("Transpose", [g.op("Reshape", [ctx, g.const([0, nh, -1, d])], f"{a}/merge_groups")],
                   f"{a}/context_t", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const([0, 0, nh * d])], f"{a}/merge_heads")
        hidden = g.op("Add", [hidden, weights.linear(ctx, load(f"{a}.o_proj.weight"), f"{a}.o_proj")],
                      f"{p}/attn_residual")

        x = rms_norm(hidden, f"{p}.post_attention_layernorm.weight")
        m = f"{p}.mlp"
        ffn = spec.ffn_size
        w_gate_up = np.concatenate([load(f"{m}.gate_proj.weight"), load(f"{m}.up_proj.weight")])
        gate_up = weights.linear(x, w_gate_up, f"{m}.gate_up_proj")
        del w_gate_up
        gate, up = g.node("Split", [gate_up, g.const([ffn, ffn])], f"{m}/split", 2, axis=-1)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{m}/sigmoid")], f"{m}/silu")
        down = weights.linear(g.op("Mul", [act, up], f"{m}/gated"), load(f"{m}.down_proj.weight"), f"{m}.down_proj")
        hidden = g.op("Add", [hidden, down], f"{p}/mlp_residual")

    x = rms_norm(hidden, "model.norm.weight")
    if spec.tie_embeddings:
        logits = weights.lm_head(x, head, None, spec.vocab_size, spec.hidden_size)
    else:
        bar.update(1)
        logits = weights.lm_head(x, None, tensors["lm_head.weight"], spec.vocab_size, spec.hidden_size)
    g.op("Identity", [logits], "logits", out="logits")
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
                    "position_ids": "position_ids",
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


def _check_options(options: ConvertOptions) -> tuple[int, bool, int]:
    block = getattr(options, "block_size", None)
    if block is not None and options.quant != "int4":
        raise UnsupportedError(f"--block-size applies to --quant int4 only, not {options.quant}")
    block = 32 if block is None else block
    if block not in BLOCK_SIZES:
        raise UnsupportedError(f"--block-size {block} is not supported by MatMulNBits; choose 16, 32, 64, 128 or 256")
    accuracy = int(getattr(options, "accuracy_level", 4))
    if accuracy not in (0, 1, 2, 3, 4):
        raise UnsupportedError(f"accuracy level {accuracy} is not one of 0-4")
    return block, bool(getattr(options, "symmetric", True)), accuracy


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise MissingExtraError("--to onnx needs the onnx package: pip install onnx") from None
    from ondevice.converters.mlx import write_tokenizer_files
    from ondevice.converters.onnx_graph import ExternalData, GraphBuilder

    start = time.perf_counter()
    block, symmetric, accuracy = _check_options(options)
    spec = model.spec
    if spec.head_dim % 2:
        raise UnsupportedError(f"head_dim {spec.head_dim} must be even for RoPE")

    with atomic_output(out, force=options.force, directory=True) as tmp:
        data = ExternalData(tmp / DATA_FILE)
        try:
            g = GraphBuilder(data)
            weights = _Weights(g, options.quant, block, symmetric, accuracy)
            with progress_bar(len(model.tensors), f"onnx {options.quant}", options.progress) as bar:
                inputs, outputs = _build_graph(model, g, weights, bar)
        finally:
            data.close()
        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if options.quant == "int4":
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        onnx_model = helper.make_model(graph, opset_imports=opsets, ir_version=8, producer_name="ondevice",
                                       doc_string=f"{spec.arch} decoder, {options.quant}")
        for key, value in (("ondevice.quant", options.quant), ("ondevice.arch", spec.arch),
                           ("ondevice.block_size", str(block) if options.quant == "int4" else "")):
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
    if options.quant == "int4":
        kind = "symmetric" if symmetric else "asymmetric"
        notes.append(f"onnx int4: MatMulNBits, block {block}, {kind}, accuracy_level {accuracy}")
    return ConvertResult(
        target="onnx", quant=options.quant, output=str(out), size_bytes=size, seconds=time.perf_counter() - start,
        tensor_types=count_types(weights.types), notes=notes, peak_rss_mib=peak_rss_mib(),
    )
