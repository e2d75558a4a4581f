"""Target Core ML (`--to coreml`): an mlprogram for iOS 18 / macOS 15, built with coremltools' MIL builder from our
own weights (no torch), with a stateful fp16 KV cache.

Program "main": input_ids (1, S) int32 with S flexible in 1..max_seq, position (1,) int32 (the first token's
position); states key_cache / value_cache (n_layers, kv_heads, max_seq, head_dim) fp16; output logits (1, S,
vocab). Everything computes in fp16. New K/V rows are written at position.. with slice_update, keys past the
query's position are masked. Weights: fp16; int8 per output channel; int4 in blocks of 32 along the input
(constexpr_blockwise_shift_scale, iOS 18): symmetric, by coremltools, except from a source that stores weights as
Q4_0/Q4_1 in such blocks: those keep their own grid (codes copied, fp16 scale and offset: lossless) and the source's
other weights are quantized the way Q4_1 is (asymmetric, offset beside the scale: 5 bits per weight). Every
linear weight and the embedding table are quantized (the tied output layer reuses the embedding's, so its bytes
are stored once).

The package cannot be run on Linux; ondevice.runners.coreml_interpreter evaluates the saved program with numpy,
which is how the tests prove it. `<stem>.json` (manifest) and `<stem>.tokenizer.json` are written beside it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
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

from ondevice.errors import MissingExtraError, UnsupportedError
from ondevice.formats.atomic import atomic_output, check_output_path, write_text_atomic
from ondevice.model import CanonicalModel, ModelSpec
from ondevice.quant import AFFINE_4BIT_TYPES

TARGET = Target(
    name="coreml",
    quants=("fp16", "int8", "int4"),
    default_quant="int4",
    generic={"4bit": "int4", "8bit": "int8", "f16": "fp16"},
    output_is_dir=True,
    suffix=".mlpackage",
    description="a Core ML mlprogram (.mlpackage, iOS 18 / macOS 15) with a stateful KV cache",
)

MANIFEST_FORMAT = "ondevice-coreml/1"
DEFAULT_MAX_SEQ = 2048
BLOCK_SIZES = (16, 32, 64, 128)
MASK_MIN = -30000.0  # finite in fp16: a fully masked row still gives a defined softmax


@dataclass
class CoreMLOptions(ConvertOptions):
    block_size: int | None = None  # int4 block; None = 32
    max_seq_len: int | None = None  # KV cache positions; None = min(context length, 2048)


def manifest_path(package: Path) -> Path:
    return package.with_suffix(".json")


def tokenizer_path(package: Path) -> Path:
    return package.with_suffix(".tokenizer.json")


def require_coremltools() -> Any:
    try:
        import coremltools as ct
    except ImportError:
        raise MissingExtraError("--to coreml needs the coreml extra: pip install 'ondevice[coreml]'") from None
    return ct


def mil_name(name: str) -> str:
    """The const's name in the program (coremltools renames dotted names to these anyway)."""
    return name.replace(".", "_")


def rope_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)


def source_grid(model: CanonicalModel, name: str, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The source's own 4-bit grid for `name` as Core ML's scale * (code - offset): (uint8 codes (N, K), fp16 scale,
    fp16 offset (N, K / block)), when the tensor is stored as Q4_0/Q4_1 in blocks of `block`; else None.

    Re-quantizing an already 4-bit weight onto a second 4-bit grid doubles its error (SmolLM2 Q4_1 -> symmetric int4:
    top-1 55%); the Q4_1 grid (weight = d * code + m) is exactly a blockwise shift-scale with offset -m / d."""
    tensor = model.tensors[name]
    if tensor.raw is None or len(tensor.shape) != 2 or tensor.source_dtype not in AFFINE_4BIT_TYPES:
        return None
    qtype, rows = tensor.raw()
    if qtype.block_size != block:
        return None
    return shift_scale(*qtype.affine_codes(rows, tensor.shape[-1]), block)


def asymmetric_grid(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """`values` quantized the way Q4_1 is (per block of 32: d = (max - min) / 15, m = min), as a shift-scale."""
    from ondevice.quant import get_quant_type

    q4_1 = get_quant_type("q4_1")
    return shift_scale(*q4_1.affine_codes(q4_1.quantize(values), values.shape[-1]), 32)


def shift_scale(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """weight = scale * code + bias (float32 per block) -> (codes, fp16 scale, fp16 offset) with weight = scale *
    (code - offset), checked to within 1/64 of a code step; None where fp16 cannot hold it (then re-quantize)."""
    flat = scale == 0  # a constant block: code 1 times its value
    codes = np.where(np.repeat(flat, block, axis=1), np.uint8(1), codes)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        offset = np.where(flat, 0.0, -bias / np.where(flat, 1.0, scale)).astype(np.float16)
    scale16 = np.where(flat, bias, scale).astype(np.float16)
    want = (codes.reshape(*scale.shape, block) * scale[..., None] + bias[..., None]).reshape(codes.shape)
    got = ((codes.reshape(*scale.shape, block) - offset[..., None].astype(np.float32))
           * scale16[..., None].astype(np.float32)).reshape(codes.shape)
    # fp16 offsets round -m/d by <= 2^-11 relative: far below a code step; refuse anything else (overflow, inf)
    step = np.repeat(np.abs(np.where(flat, bias, scale)), block, axis=1)  # Q4_0 scales can be negative
    if not (np.isfinite(got).all() and (np.abs(got - want) <= step / 64 + 1e-7).all()):
        return None
    return codes, scale16, offset


def build_program(model: CanonicalModel, max_seq: int, bar: Any = None,
                  grid_block: int | None = None) -> tuple[Any, list[str], dict[str, list[str]]]:
    """The MIL program (fp16), the names of the weight consts still to quantize (linears and the embedding) and
    those already in int4 blocks of `grid_block` (None: none), by kind ("source-grid", "asymmetric")."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    spec = model.spec
    d, nh, nkv, n_layers = spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.n_layers
    group = nh // nkv
    fp16 = np.float16
    weight_names: list[str] = []
    copied_names: list[str] = []
    asymmetric_names: list[str] = []
    # A source stored as Q4_0/Q4_1 gives an asymmetric 5-bit package: its grids are copied and the weights it holds
    # otherwise (SmolLM2: the 8-bit embedding / output layer) get the same form rather than symmetric int4.
    follow_source = grid_block == 32 and any(t.source_dtype in AFFINE_4BIT_TYPES for t in model.tensors.values())

    def load(name: str) -> np.ndarray:
        if bar is not None:
            bar.update(1)
        return model.tensors[name].load()

    seq = get_new_symbol()
    cache_shape = (n_layers, nkv, max_seq, d)
    input_specs = [
        mb.TensorSpec((1, seq), dtype=types.int32),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.StateTensorSpec(cache_shape, dtype=types.fp16),
        mb.StateTensorSpec(cache_shape, dtype=types.fp16),
    ]

    @mb.program(input_specs=input_specs, opset_version=ct.target.iOS18)
    def main(input_ids: Any, position: Any, key_cache: Any, value_cache: Any) -> Any:
        def weight(name: str, value: np.ndarray, quantize: bool) -> Any:
            if quantize:
                weight_names.append(name)
            return mb.const(val=value.astype(fp16), name=mil_name(name))

        def quantized_weight(name: str) -> Any:
            grid = source_grid(model, name, grid_block) if grid_block else None
            if grid is not None:
                if bar is not None:
                    bar.update(1)
                copied_names.append(name)
            else:
                values = load(name)
                grid = asymmetric_grid(values) if follow_source else None  # the same form as the copied weights
                if grid is None:
                    return weight(name, values, True)
                asymmetric_names.append(name)
            codes, grid_scale, offset = grid
            return mb.constexpr_blockwise_shift_scale(data=codes.astype(types.np_uint4_dtype), scale=grid_scale,
                                                      offset=offset, name=mil_name(name))

        def linear(x: Any, prefix: str, bias: bool = False) -> Any:
            w = quantized_weight(f"{prefix}.weight")
            b = mb.const(val=load(f"{prefix}.bias").astype(fp16), name=mil_name(f"{prefix}.bias")) if bias else None
            return mb.linear(x=x, weight=w, bias=b, name=f"{prefix}/out") if b is not None else \
                mb.linear(x=x, weight=w, name=f"{prefix}/out")

        def rms_norm(x: Any, name: str) -> Any:
            w = weight(name, load(name), False)
            base = name.removesuffix(".weight")
            # fp16 squares of activations overflow past 256: scale down first (x/s normalizes the same way).
            xs = mb.mul(x=x, y=fp16(1.0 / 16.0), name=f"{base}/prescale")
            mean = mb.reduce_mean(x=mb.mul(x=xs, y=xs), axes=[-1], keep_dims=True, name=f"{base}/mean")
            inv = mb.rsqrt(x=mean, epsilon=fp16(max(spec.rms_eps / 256.0, 6e-8)), name=f"{base}/rsqrt")
            return mb.mul(x=mb.mul(x=xs, y=inv), y=w, name=f"{base}/out")

        length = mb.slice_by_index(x=mb.shape(x=input_ids), begin=[1], end=[2], name="seq_len")  # (1,) int32
        start = mb.squeeze(x=position, name="start")
        end = mb.add(x=start, y=mb.squeeze(x=length), name="end")
        query_pos = mb.range_1d(start=start, end=end, step=np.int32(1), name="query_pos")  # (S,)
        cos_table, sin_table = rope_tables(d, spec.rope_theta, max_seq)
        cos = mb.gather(x=mb.const(val=cos_table, name="rope.cos"), indices=query_pos, axis=0, name="rope/cos")
        sin = mb.gather(x=mb.const(val=sin_table, name="rope.sin"), indices=query_pos, axis=0, name="rope/sin")
        key_pos = mb.const(val=np.arange(max_seq, dtype=np.int32)[None, :], name="key_pos")
        visible = mb.less_equal(x=key_pos, y=mb.expand_dims(x=query_pos, axes=[1]), name="mask/visible")
        mask = mb.select(cond=visible, a=fp16(0.0), b=fp16(MASK_MIN), name="mask")  # (S, max_seq)

        def rope(x: Any, name: str) -> Any:  # x (heads, S, d), rotate-half
            first = mb.slice_by_index(x=x, begin=[0, 0, 0], end=[0, 0, d // 2], end_mask=[True, True, False],
                                      name=f"{name}/first")
            second = mb.slice_by_index(x=x, begin=[0, 0, d // 2], end=[0, 0, d], end_mask=[True, True, False],
                                       name=f"{name}/second")
            a = mb.sub(x=mb.mul(x=first, y=cos), y=mb.mul(x=second, y=sin), name=f"{name}/a")
            b = mb.add(x=mb.mul(x=second, y=cos), y=mb.mul(x=first, y=sin), name=f"{name}/b")
            return mb.concat(values=[a, b], axis=-1, name=f"{name}/out")

        def heads(x: Any, n: int, name: str) -> Any:  # (1, S, n*d) -> (n, S, d)
            return mb.transpose(x=mb.reshape(x=x, shape=[-1, n, d], name=f"{name}/split"), perm=[1, 0, 2],
                                name=f"{name}/heads")

        embed = quantized_weight("model.embed_tokens.weight")
        hidden = mb.gather(x=embed, indices=input_ids, axis=0, name="embed")  # (1, S, hidden)
        scale = fp16(1.0 / np.sqrt(d))
        for i in range(n_layers):
            p = f"model.layers.{i}"
            a = f"{p}.self_attn"
            x = rms_norm(hidden, f"{p}.input_layernorm.weight")
            q = rope(heads(linear(x, f"{a}.q_proj", spec.qkv_bias), nh, f"{a}/q"), f"{a}/q_rope")
            k = rope(heads(linear(x, f"{a}.k_proj", spec.qkv_bias), nkv, f"{a}/k"), f"{a}/k_rope")
            v = heads(linear(x, f"{a}.v_proj", spec.qkv_bias), nkv, f"{a}/v")
            begin = mb.concat(values=[np.array([i, 0], np.int32), position, np.array([0], np.int32)], axis=0,
                              name=f"{a}/begin")
            stop = mb.concat(values=[np.array([i + 1, nkv], np.int32), mb.expand_dims(x=end, axes=[0]),
                                     np.array([d], np.int32)], axis=0, name=f"{a}/end")
            for state, new, kind in ((key_cache, k, "key"), (value_cache, v, "value")):
                current = mb.read_state(input=state, name=f"{a}/{kind}_read")
                updated = mb.slice_update(x=current, update=mb.expand_dims(x=new, axes=[0]), begin=begin, end=stop,
                                          name=f"{a}/{kind}_update")
                mb.coreml_update_state(state=state, value=updated, name=f"{a}/{kind}_write")
            keys = mb.slice_by_index(x=mb.read_state(input=key_cache, name=f"{a}/keys_read"), begin=[i, 0, 0, 0],
                                     end=[i + 1, nkv, max_seq, d], squeeze_mask=[True, False, False, False],
                                     name=f"{a}/keys")  # (kv, T, d)
            values = mb.slice_by_index(x=mb.read_state(input=value_cache, name=f"{a}/values_read"),
                                       begin=[i, 0, 0, 0], end=[i + 1, nkv, max_seq, d],
                                       squeeze_mask=[True, False, False, False], name=f"{a}/values")
            # GQA: the `group` query heads of a KV head become extra rows of one matmul against it.
            qg = mb.reshape(x=mb.mul(x=q, y=scale), shape=[nkv, -1, d], name=f"{a}/q_groups")  # (kv, g*S, d)
            scores = mb.matmul(x=qg, y=keys, transpose_y=True, name=f"{a}/scores")  # (kv, g*S, T)
            scores = mb.reshape(x=scores, shape=[nkv, group, -1, max_seq], name=f"{a}/scores4")
            probs = mb.softmax(x=mb.add(x=scores, y=mask, name=f"{a}/masked"), axis=-1, name=f"{a}/probs")
            ctx = mb.matmul(x=mb.reshape(x=probs, shape=[nkv, -1, max_seq], name=f"{a}/probs3"), y=values,
                            name=f"{a}/context")  # (kv, g*S, d)
            ctx = mb.transpose(x=mb.reshape(x=ctx, shape=[nh, -1, d], name=f"{a}/ctx_heads"), perm=[1, 0, 2],
                               name=f"{a}/ctx_t")  # (S, nh, d)
            ctx = mb.reshape(x=ctx, shape=[1, -1, nh * d], name=f"{a}/ctx")
            hidden = mb.add(x=hidden, y=linear(ctx, f"{a}.o_proj"), name=f"{p}/attn_residual")
            m = f"{p}.mlp"
            x = rms_norm(hidden, f"{p}.post_attention_layernorm.weight")
            gated = mb.mul(x=mb.silu(x=linear(x, f"{m}.gate_proj"), name=f"{m}/silu"), y=linear(x, f"{m}.up_proj"),
                           name=f"{m}/gated")
            hidden = mb.add(x=hidden, y=linear(gated, f"{m}.down_proj"), name=f"{p}/mlp_residual")
        x = rms_norm(hidden, "model.norm.weight")
        if spec.tie_embeddings:
            head = embed
        else:
            head = quantized_weight("lm_head.weight")
        return mb.linear(x=x, weight=head, name="logits")

    return main, weight_names, {"source-grid": copied_names, "asymmetric": asymmetric_names}


def quantize(mlmodel: Any, quant: str, block: int, names: list[str]) -> Any:
    import coremltools.optimize.coreml as cto

    if quant == "int4":
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                             block_size=block, weight_threshold=0)
    else:
        config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                             weight_threshold=0)
    # By name: the RoPE tables and norms stay fp16 whatever their size.
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs={mil_name(n): config for n in names}))


def count_weight_ops(package: Path) -> dict[str, int]:
    """Op types that produce the weights of every linear/gather in the saved program (from its spec)."""
    from ondevice.runners.coreml_interpreter import load_program

    program = load_program(package)
    producers = {op.outputs[0].name: op.op_type for op in program.functions["main"].operations}
    counts: dict[str, int] = {}
    for op in program.functions["main"].operations:
        if op.op_type == "linear" or (op.op_type == "gather" and "embed_tokens" in op.inputs["x"].name):
            source = op.inputs["weight" if op.op_type == "linear" else "x"].name
            kind = producers.get(source, "const")
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def make_manifest(model: CanonicalModel, quant: str, block: int | None, max_seq: int, names: list[str],
                  package: Path, prequantized: dict[str, list[str]] | None = None) -> dict[str, Any]:
    spec, special = model.spec, model.special
    scheme = {"fp16": "fp16", "int8": "int8-per-channel", "int4": f"int4-block{block}"}[quant]
    layers = dict.fromkeys(names, scheme)
    for kind, kind_names in (prequantized or {}).items():
        layers |= dict.fromkeys(kind_names, f"int4-block{block}-{kind}")
    return {
        "format": MANIFEST_FORMAT,
        "package": package.name,
        "tokenizer": tokenizer_path(package).name,
        "inputs": ["input_ids (1, S) int32", "position (1,) int32"],
        "states": ["key_cache", "value_cache"],
        "max_seq_len": max_seq,
        "quant": quant,
        "block_size": block,
        "spec": {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__},
        "special": {"bos_id": special.bos_id, "eos_id": special.eos_id, "eos_ids": list(special.eos_ids),
                    "pad_id": special.pad_id, "add_bos": special.add_bos},
        "chat_template": model.chat_template,
        "generation": {k: v for k, v in model.generation_config.items() if v is not None},
        "layers": layers,
    }


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    ct = require_coremltools()
    start = time.perf_counter()
    quant, spec = options.quant, model.spec
    block = getattr(options, "block_size", None)
    if block is not None and quant != "int4":
        raise UnsupportedError(f"--block-size applies to --quant int4 only, not {quant}")
    block = 32 if block is None and quant == "int4" else block
    if block is not None and block not in BLOCK_SIZES:
        raise UnsupportedError(f"--block-size {block} is not supported; choose 16, 32, 64 or 128")
    if block is not None:
        widths = {spec.hidden_size, spec.ffn_size, spec.n_heads * spec.head_dim}
        bad = sorted(w for w in widths if w % block)
        if bad:
            raise UnsupportedError(f"--block-size {block} does not divide the layer width {bad[0]}; choose one "
                                   f"that divides {min(widths)}")
    max_seq = getattr(options, "max_seq_len", None) or min(spec.context_length, DEFAULT_MAX_SEQ)
    out = Path(out)
    for path in (out, manifest_path(out), tokenizer_path(out)):
        check_output_path(path, options.force)

    with progress_bar(len(model.tensors), f"coreml {quant}", options.progress) as bar:
        program, names, prequantized = build_program(model, max_seq, bar, grid_block=block if quant == "int4" else None)
    inputs = [ct.TensorType(name="input_ids", shape=(1, ct.RangeDim(1, max_seq, default=1)), dtype=np.int32),
              ct.TensorType(name="position", shape=(1,), dtype=np.int32)]
    mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, inputs=inputs,
                         compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    del program
    if quant != "fp16" and names:
        mlmodel = quantize(mlmodel, quant, block or 0, names)
    mlmodel.short_description = f"{spec.arch} decoder ({spec.name}), {quant}, stateful KV cache of {max_seq}"

    write_text_atomic(tokenizer_path(out), model.tokenizer_json, force=options.force)
    manifest = make_manifest(model, quant, block, max_seq, names, out, prequantized)
    write_text_atomic(manifest_path(out), json.dumps(manifest, indent=1) + "\n", force=options.force)
    with atomic_output(out, force=options.force, directory=True) as tmp:
        staging = tmp / "model.mlpackage"  # coremltools wants the suffix; move its contents up after saving
        mlmodel.save(str(staging))
        for child in staging.iterdir():
            os.replace(child, tmp / child.name)
        staging.rmdir()
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    ops = count_weight_ops(out)
    types = list(manifest["layers"].values())
    notes = [f"coreml {quant}: mlprogram iOS18, fp16 state KV cache of {max_seq}; weight producers {ops}; "
             f"manifest {manifest_path(out).name}"]
    return ConvertResult(target="coreml", quant=quant, output=str(out), size_bytes=size,
                         seconds=time.perf_counter() - start, tensor_types=count_types(types), notes=notes,
                         peak_rss_mib=peak_rss_mib())
