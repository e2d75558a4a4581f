"""Target Core ML (`--to coreml`): an mlprogram for iOS 18 / macOS 15, built with coremltools' MIL builder from our
own weights (no torch), with a stateful fp16 KV cache.

Program "main": input_ids (1, S) int32 with S flexible in 1..max_seq, position (1,) int32 (the first token's
position); states key_cache / value_cache (n_layers, kv_heads, max_seq, head_dim) fp16; output logits (1, S,
vocab). Everything computes in fp16. New K/V rows are written at position.. with slice_update, keys past the
query's position are masked. Weights: fp16; int8 per output channel (coremltools); int4 in blocks of 32 along the
input (constexpr_blockwise_shift_scale, iOS 18) in Q4_1's asymmetric form, see Int4Weight: 4.75 bits per weight.
At int4:
- a weight the source stores as Q4_0/Q4_1 in such blocks keeps its own grid (codes and scales copied);
- the output layer is quantized by GPTQ on a calibration text (ondevice.quant.gptq, .calibration) in rotated
  coordinates (a sign-flipped block Hadamard R: the table holds W R, the final hidden state is rotated by R, and a
  tied embedding lookup un-rotates by R^T);
- every other weight is rounded to Q4_1's grid.
Every linear weight and the embedding table are quantized (the tied output layer reuses the embedding's, so its
bytes are stored once).

The package cannot be run on Linux; ondevice.runners.coreml_interpreter evaluates the saved program with numpy,
which is how the tests prove it. `<stem>.json` (manifest) and `<stem>.tokenizer.json` are written beside it.
"""

from __future__ import annotations

import json
import math
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
    TargetOption,
    count_types,
    options_as,
    peak_rss_mib,
    progress_bar,
)
from ondevice.converters.coreml_fp16 import (
    CHECK_WINDOWS,
    check_headroom,
    program_ranges,
    residual_range,
    residual_scale_for,
)

from ondevice.architectures import get_architecture
from ondevice.decoder import DecoderOps, attention_scale, check_consumed, require_features, run_decoder
from ondevice.errors import MissingExtraError, UnsupportedError
from ondevice.formats.atomic import atomic_output, check_output_path, write_text_atomic
from ondevice.model import CanonicalModel, ModelSpec
from ondevice.quant.affine import affine_block_params, affine_round, centered, source_affine_grid
from ondevice.quant.calibration import calibration_windows, output_layer_hessian
from ondevice.quant.gptq import gptq_affine_4bit
from ondevice.rope import rope_kind, rope_tables


@dataclass
class CoreMLOptions(ConvertOptions):
    block_size: int | None = None  # int4 block; None = 32
    max_seq_len: int | None = None  # KV cache positions; None = min(context length, 2048)
    calibrate: bool = True  # int4: the output layer by GPTQ on the calibration text (False: rounded)

TARGET = Target(
    name="coreml",
    quants=("fp16", "int8", "int4"),
    default_quant="int4",
    generic={"4bit": "int4", "8bit": "int8", "f16": "fp16"},
    output_is_dir=True,
    suffix=".mlpackage",
    description="a Core ML mlprogram (.mlpackage, iOS 18 / macOS 15) with a stateful KV cache",
    options=CoreMLOptions,
    cli_options=(TargetOption("--block-size", "block_size", "int4 block: 16, 32, 64 or 128 (default 32)"),
                 TargetOption("--max-seq-len", "max_seq_len", "stateful KV cache length (default: min(context, 2048))"),
                 TargetOption("--no-calibrate", "calibrate", "int4: round the output layer to the grid instead of "
                              "GPTQ on the bundled calibration text (SmolLM2: top-1 80%% instead of 91%%)", None)),
)

MANIFEST_FORMAT = "ondevice-coreml/1"
DEFAULT_MAX_SEQ = 2048
RANGE_TOKENS = 2048  # calibration tokens whose float residual range picks the residual scale
BLOCK_SIZES = (16, 32, 64, 128)
MASK_MIN = -8192.0  # finite in fp16 with headroom (coreml_fp16.py): a fully masked row still gives a softmax


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


@dataclass
class Int4Weight:
    """A weight in Core ML's int4 blocks, held as Q4_1's form weight = d * code + m split in two parts:
    d * (code - 8) from signed int4 codes with an fp16 scale per block (constexpr_blockwise_shift_scale, 4.5 bits
    per weight), and the block offsets m + 8d as an int8 matrix (rows, blocks) with an fp16 scale per row (0.25
    bits per weight at blocks of 32). A linear applies the offsets to the block means of its input; an embedding
    lookup adds them to the gathered rows. An fp16 offset beside each scale would cost 0.5 bits per weight."""

    codes: np.ndarray  # int8 (rows, cols), -8..7
    scale: np.ndarray  # fp16 (rows, blocks)
    offsets: np.ndarray | None  # int8 (rows, blocks): block offset * block size, in units of offset_scale;
    offset_scale: np.ndarray | None  # fp16 (rows, 1). None when every offset is 0 (Q4_0's symmetric grid)
    kind: str  # "source-grid", "asymmetric" or "gptq" (scheme "int4-block{b}-{kind}" in the manifest)

    @classmethod
    def from_affine(cls, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, kind: str) -> Int4Weight:
        """From weight = scale * code + bias (codes 0..15 (N, K), float32 scale and bias (N, K / block))."""
        block = codes.shape[1] // scale.shape[1]
        scale16 = scale.astype(np.float16)
        signed, block_offsets = centered(codes, scale16.astype(np.float32), bias)
        total = block_offsets * block  # applied to block means, not sums: sums of 32 activations can pass fp16's range
        offset_scale = (np.abs(total).max(axis=1, keepdims=True) / 127.0).astype(np.float16)
        unit = np.where(offset_scale == 0, np.float16(1), offset_scale).astype(np.float32)
        offsets = np.clip(np.rint(total / unit), -127, 127).astype(np.int8)
        if not offsets.any():
            return cls(signed, scale16, None, None, kind)
        return cls(signed, scale16, offsets, offset_scale, kind)

    def scaled(self, factor: float) -> Int4Weight:
        """The same codes for factor * weight (exact for a power of two, as the residual scale is)."""
        offset_scale = None if self.offset_scale is None else (self.offset_scale * factor).astype(np.float16)
        return Int4Weight(self.codes, (self.scale * factor).astype(np.float16), self.offsets, offset_scale,
                          self.kind)

    def dequantize(self) -> np.ndarray:
        """The float32 weight the package computes (before any rotation)."""
        rows, blocks = self.scale.shape
        block = self.codes.shape[1] // blocks
        values = self.codes.reshape(rows, blocks, block) * self.scale.astype(np.float32)[..., None]
        if self.offsets is not None:
            values += (self.offsets * self.offset_scale.astype(np.float32) / block)[..., None]
        return values.reshape(self.codes.shape)


def source_int4(model: CanonicalModel, name: str, block: int) -> Int4Weight | None:
    """The source's own 4-bit grid for `name`, when the tensor is stored as Q4_0/Q4_1 in blocks of `block`: its
    codes and scales copied as they are. Re-quantizing an already 4-bit weight onto a second 4-bit grid doubles its
    error (SmolLM2 Q4_1 -> symmetric int4: top-1 55%)."""
    grid = source_affine_grid(model.tensors[name], block)
    if grid is None:
        return None
    codes, scale, bias = grid
    if not (np.isfinite(scale).all() and np.abs(scale).max(initial=0) < 65504):
        return None
    return Int4Weight.from_affine(codes, scale, bias, "source-grid")


def stored_block_params(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1's block parameters with the scale rounded to fp16: the grid the package will hold."""
    scale, bias = affine_block_params(values, block)
    return scale.astype(np.float16).astype(np.float32), bias


def rounded_int4(values: np.ndarray, block: int) -> Int4Weight:
    """`values` rounded to the nearest point of Q4_1's grid (per block: d = (max - min) / 15, m = min)."""
    scale, bias = stored_block_params(values, block)
    return Int4Weight.from_affine(affine_round(values, scale, bias), scale, bias, "asymmetric")


def hadamard_rotation(width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """R = diag(signs) @ blockdiag(H, ..., H) with H an orthonormal Sylvester Hadamard matrix of 2^k <= 64 rows
    dividing `width`: (signs (width,), H). Orthogonal; its entries +-1/sqrt(size) are exact in fp16 for 16 and 64
    rows, within fp16 rounding (2^-11) for 8 and 32."""
    size = 64
    while size > 1 and width % size:
        size //= 2
    if size < 8:
        return None
    h = np.ones((1, 1))
    while len(h) < size:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], width)
    return signs, h / np.sqrt(size)


def rotation_matrix(rotation: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """R = diag(signs) @ blockdiag(H, ..., H) as a (width, width) matrix."""
    signs, h = rotation
    return signs[:, None] * np.kron(np.eye(len(signs) // len(h)), h)


def gptq_output_layer(values: np.ndarray, hessian: np.ndarray, block: int,
                      rotation: tuple[np.ndarray, np.ndarray] | None) -> Int4Weight:
    """The output layer by GPTQ against `hessian` (E[h h^T] of its inputs, ondevice.quant.calibration), in
    rotated coordinates when `rotation` is given: rows of W R, inputs h R (R orthogonal, so logits h W^T are
    unchanged). The rotation spreads the few hidden channels that carry most of h's energy over 64 channels each;
    SmolLM2's tied output layer: top-1 80.7% (plain rounding), 87.0% (GPTQ), 90.3% (rotated GPTQ),
    benchmarks/coreml_output_layer.py."""
    if rotation is not None:
        r = rotation_matrix(rotation)
        values, hessian = values @ r, r.T @ hessian @ r
    scale, bias = stored_block_params(values, block)
    codes, scale, bias = gptq_affine_4bit(values.astype(np.float32), hessian, block, params=(scale, bias))
    return Int4Weight.from_affine(codes, scale, bias, "gptq")


# What this graph builder expresses (decoder.FEATURES)
SUPPORTED_FEATURES = ("qkv_bias", "qk_norm", "rope_freq_factors", "norm_offset", "post_norms", "gelu_tanh",
                      "embed_scale", "attn_scale", "sliding_window", "local_rope_theta")


def build_program(model: CanonicalModel, max_seq: int, bar: Any = None, int4_block: int | None = None,
                  calibrate: bool = True, residual_scale: float = 1.0,
                  overflow_safe_norms: bool = True) -> tuple[Any, list[str], dict[str, str]]:
    """The MIL program (fp16), the names of the weight consts still to quantize (int8: the linears and the
    embedding) and, at int4 (`int4_block`), the kind of each weight's int4 form (Int4Weight.kind). `calibrate`:
    the output layer by GPTQ on the calibration text (else plain rounding, like the others). The residual
    stream is carried divided by `residual_scale` (a power of two; coreml_fp16.py). overflow_safe_norms=False
    builds the plain RMSNorm, which overflows fp16 on large rows: only to show that it does."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    spec = model.spec
    d, nh, nkv, n_layers = spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.n_layers
    group = nh // nkv
    fp16 = np.float16
    weight_names: list[str] = []
    int4_kinds: dict[str, str] = {}
    output_name = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
    rotation = hadamard_rotation(spec.hidden_size) if int4_block and calibrate else None
    require_features(spec, "coreml", SUPPORTED_FEATURES)
    used: set[str] = set()  # the tensors the program consumed (filled while it is built)

    # The residual stream is x / residual_scale: what adds to it is scaled by 1/residual_scale (the o/down
    # weights, or with sandwich norms the post-norm weights), the norms that read it scale eps by 1/s^2.
    arch = get_architecture(spec.arch)
    into_residual = ("post_attn_norm", "post_ffn_norm") if spec.post_norms else ("o", "down")
    scaled = {arch.hf_tensor(role, i) for role in into_residual for i in range(n_layers)} \
        if residual_scale != 1.0 else set()
    residual_norms = {arch.hf_tensor(role, i) for role in ("attn_norm", "ffn_norm") for i in range(n_layers)}
    residual_norms.add(arch.hf_tensor("final_norm", None))

    def load(name: str) -> np.ndarray:
        if bar is not None:
            bar.update(1)
        return model.tensors[name].load()

    def linear_weight(name: str) -> np.ndarray:
        values = load(name)
        return values * np.float32(1.0 / residual_scale) if name in scaled else values

    def int4_weight(name: str) -> Int4Weight:
        held = source_int4(model, name, int4_block) if name != output_name or rotation is None else None
        if held is not None:
            if bar is not None:
                bar.update(1)
            return held.scaled(1.0 / residual_scale) if name in scaled else held
        values = linear_weight(name)
        if name == output_name and rotation is not None:
            return gptq_output_layer(values, output_layer_hessian(model), int4_block, rotation)
        return rounded_int4(values, int4_block)

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
        block_means: dict[str, Any] = {}  # input var name -> its block means (q/k/v and gate/up share an input)

        def weight(name: str, value: np.ndarray, quantize: bool) -> Any:
            if quantize:
                weight_names.append(name)
            return mb.const(val=value.astype(fp16), name=mil_name(name))

        def quantized_weight(name: str) -> tuple[Any, Any]:
            """(the weight, or its int4 part; the int8 block offsets at int4, else None)"""
            if not int4_block:
                return weight(name, linear_weight(name), True), None
            q = int4_weight(name)
            int4_kinds[name] = q.kind
            base = mil_name(name)
            w = mb.constexpr_blockwise_shift_scale(data=q.codes.astype(types.np_int4_dtype), scale=q.scale,
                                                   name=base)
            if q.offsets is None:
                return w, None
            offsets = mb.constexpr_blockwise_shift_scale(data=q.offsets, scale=q.offset_scale,
                                                         name=f"{base}_offsets")
            return w, offsets

        def means(x: Any, width: int) -> Any:  # (1, S, width) -> (1, S, width / block)
            if x.name not in block_means:
                blocks = mb.reshape(x=x, shape=[1, -1, width // int4_block, int4_block], name=f"{x.name}/blocks")
                block_means[x.name] = mb.reduce_mean(x=blocks, axes=[-1], keep_dims=False, name=f"{x.name}/means")
            return block_means[x.name]

        def project(x: Any, w: Any, offsets: Any, width: int, name: str, b: Any = None) -> Any:
            main_name = name if offsets is None else f"{name}_int4"
            out = mb.linear(x=x, weight=w, bias=b, name=main_name) if b is not None else \
                mb.linear(x=x, weight=w, name=main_name)
            if offsets is None:
                return out
            shift = mb.linear(x=means(x, width), weight=offsets, name=f"{name}_offsets")
            return mb.add(x=out, y=shift, name=name)

        def linear(x: Any, prefix: str, width: int, bias: bool = False) -> Any:
            w, offsets = quantized_weight(f"{prefix}.weight")
            b = mb.const(val=load(f"{prefix}.bias").astype(fp16), name=mil_name(f"{prefix}.bias")) if bias else None
            return project(x, w, offsets, width, f"{prefix}/out", b)

        def rotate(x: Any, name: str, inverse: bool) -> Any:
            """x R (x @ diag(signs) @ blockdiag(H)) or x R^T, on (1, S, hidden)."""
            signs, h = rotation
            hidden = len(signs)
            signs16 = mb.const(val=signs.astype(fp16), name=f"{name}_signs")
            if not inverse:
                x = mb.mul(x=x, y=signs16, name=f"{name}/signed")
            blocks = mb.reshape(x=x, shape=[1, -1, hidden // len(h), len(h)], name=f"{name}/blocks")
            mixed = mb.matmul(x=blocks, y=mb.const(val=h.astype(fp16), name=f"{name}_hadamard"), name=f"{name}/mix")
            x = mb.reshape(x=mixed, shape=[1, -1, hidden], name=f"{name}/flat")
            return mb.mul(x=x, y=signs16, name=f"{name}/unsigned") if inverse else x

        def rms_norm(x: Any, name: str) -> Any:
            values = load(name) + spec.norm_offset  # (1 + w) rounded to fp16 once
            if name in scaled:  # a post-norm: its weight scales what it adds to the residual stream
                values = values * np.float32(1.0 / residual_scale)
            w = weight(name, values, False)
            base = name.removesuffix(".weight")
            eps = spec.rms_eps / residual_scale**2 if name in residual_norms else spec.rms_eps
            if not overflow_safe_norms:  # x/16 squared: inf in fp16 once a row holds |x| > 4096
                xs = mb.mul(x=x, y=fp16(1.0 / 16.0), name=f"{base}/prescale")
                mean = mb.reduce_mean(x=mb.mul(x=xs, y=xs), axes=[-1], keep_dims=True, name=f"{base}/mean")
                inv = mb.rsqrt(x=mean, epsilon=fp16(max(eps / 256.0, 6e-8)), name=f"{base}/rsqrt")
                return mb.mul(x=mb.mul(x=xs, y=inv), y=w, name=f"{base}/out")
            # x / max|x| first: the squares are <= 1 whatever the row's range; eps / max^2 follows it
            # ((sqrt(eps) / max)^2, flushing to 0 for rows where eps no longer matters).
            top = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x, name=f"{base}/abs"), axes=[-1], keep_dims=True,
                                             name=f"{base}/max"), y=fp16(6.1e-5), name=f"{base}/top")
            xs = mb.real_div(x=x, y=top, name=f"{base}/prescale")
            mean = mb.reduce_mean(x=mb.mul(x=xs, y=xs), axes=[-1], keep_dims=True, name=f"{base}/mean")
            root_eps = mb.real_div(x=fp16(math.sqrt(eps)), y=top, name=f"{base}/root_eps")
            shifted = mb.add(x=mean, y=mb.mul(x=root_eps, y=root_eps), name=f"{base}/mean_eps")
            inv = mb.rsqrt(x=shifted, epsilon=fp16(6e-8), name=f"{base}/rsqrt")
            return mb.mul(x=mb.mul(x=xs, y=inv), y=w, name=f"{base}/out")

        length = mb.slice_by_index(x=mb.shape(x=input_ids), begin=[1], end=[2], name="seq_len")  # (1,) int32
        start = mb.squeeze(x=position, name="start")
        end = mb.add(x=start, y=mb.squeeze(x=length), name="end")
        query_pos = mb.range_1d(start=start, end=end, step=np.int32(1), name="query_pos")  # (S,)
        rope_of_kind: dict[tuple[float, bool], tuple[Any, Any]] = {}  # one (cos, sin) per distinct RoPE

        def rope_rows(layer: int) -> tuple[Any, Any]:
            kind = rope_kind(spec, layer)
            if kind not in rope_of_kind:
                cos_table, sin_table = rope_tables(spec, max_seq, np.float16, layer=layer)
                n = "" if not rope_of_kind else str(len(rope_of_kind))
                rope_of_kind[kind] = (
                    mb.gather(x=mb.const(val=cos_table, name=f"rope.cos{n}"), indices=query_pos, axis=0,
                              name=f"rope/cos{n}"),
                    mb.gather(x=mb.const(val=sin_table, name=f"rope.sin{n}"), indices=query_pos, axis=0,
                              name=f"rope/sin{n}"))
            return rope_of_kind[kind]

        key_pos = mb.const(val=np.arange(max_seq, dtype=np.int32)[None, :], name="key_pos")
        rows = mb.expand_dims(x=query_pos, axes=[1], name="mask/rows")
        visible = mb.less_equal(x=key_pos, y=rows, name="mask/visible")
        causal = mb.select(cond=visible, a=fp16(0.0), b=fp16(MASK_MIN), name="mask")  # (S, max_seq)
        masks: dict[int, Any] = {0: causal}  # window (0: none) -> additive mask

        def mask_of(window: int) -> Any:  # causal, and keys p-window+1..p only
            if window not in masks:
                first = mb.sub(x=rows, y=np.int32(window - 1), name=f"mask/first{window}")
                inside = mb.greater_equal(x=key_pos, y=first, name=f"mask/inside{window}")
                masks[window] = mb.select(cond=inside, a=causal, b=fp16(MASK_MIN), name=f"mask{window}")
            return masks[window]

        def rope(x: Any, cos: Any, sin: Any, name: str) -> Any:  # x (heads, S, d), rotate-half
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

        hidden_size = spec.hidden_size
        scale = fp16(attention_scale(spec))

        def width(role: str, layer: int) -> int:  # a linear's input width
            return int(model.tensors[get_architecture(spec.arch).hf_tensor(role, layer)].shape[1])

        class MilOps(DecoderOps):
            def __init__(self) -> None:
                super().__init__(spec)
                self.embed_weight: tuple[Any, Any] = (None, None)

            def embed(self) -> Any:
                embed, embed_offsets = quantized_weight(self.tensor_name("embed", None))
                self.embed_weight = embed, embed_offsets
                hidden = mb.gather(x=embed, indices=input_ids, axis=0, name="embed")  # (1, S, hidden)
                if embed_offsets is not None:
                    blocks = mb.reshape(x=hidden, shape=[1, -1, hidden_size // int4_block, int4_block],
                                        name="embed/blocks")
                    shift = mb.mul(x=mb.gather(x=embed_offsets, indices=input_ids, axis=0, name="embed/offsets"),
                                   y=fp16(1.0 / int4_block), name="embed/offset_means")  # stored x block: Int4Weight
                    blocks = mb.add(x=blocks, y=mb.expand_dims(x=shift, axes=[-1]), name="embed/shifted")
                    hidden = mb.reshape(x=blocks, shape=[1, -1, hidden_size], name="embed/rows")
                if spec.tie_embeddings and rotation is not None:
                    hidden = rotate(hidden, "embed/unrotate", inverse=True)  # the table holds rows of W R
                if residual_scale != 1.0:
                    hidden = mb.mul(x=hidden, y=fp16(1.0 / residual_scale), name="embed/residual_scale")
                return hidden

            def scale(self, x: Any, factor: float) -> Any:
                return mb.mul(x=x, y=fp16(factor), name="embed/scaled")

            def norm(self, x: Any, role: str, layer: int | None) -> Any:
                return rms_norm(x, self.tensor_name(role, layer))

            def project(self, x: Any, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[Any]:
                outs = []
                for role in roles:
                    prefix = self.tensor_name(role, layer).removesuffix(".weight")
                    if bias:
                        self.tensor_name(f"{role}_bias", layer)
                    outs.append(linear(x, prefix, width(role, layer), bias))
                return outs

            def head_norm(self, x: Any, role: str, layer: int, n_heads: int) -> Any:
                name = self.tensor_name(role, layer)
                base = name.removesuffix(".weight")
                heads = mb.reshape(x=x, shape=[1, -1, n_heads, d], name=f"{base}/heads")
                return mb.reshape(x=rms_norm(heads, name), shape=[1, -1, n_heads * d], name=f"{base}/flat")

            def attention(self, q: Any, k: Any, v: Any, layer: int) -> Any:
                i, a = layer, f"model.layers.{layer}.self_attn"
                cos, sin = rope_rows(layer)
                q = rope(heads(q, nh, f"{a}/q"), cos, sin, f"{a}/q_rope")
                k = rope(heads(k, nkv, f"{a}/k"), cos, sin, f"{a}/k_rope")
                v = heads(v, nkv, f"{a}/v")
                begin = mb.concat(values=[np.array([i, 0], np.int32), position, np.array([0], np.int32)], axis=0,
                                  name=f"{a}/begin")
                stop = mb.concat(values=[np.array([i + 1, nkv], np.int32), mb.expand_dims(x=end, axes=[0]),
                                         np.array([d], np.int32)], axis=0, name=f"{a}/end")
                for state, new, kind in ((key_cache, k, "key"), (value_cache, v, "value")):
                    current = mb.read_state(input=state, name=f"{a}/{kind}_read")
                    updated = mb.slice_update(x=current, update=mb.expand_dims(x=new, axes=[0]), begin=begin,
                                              end=stop, name=f"{a}/{kind}_update")
                    mb.coreml_update_state(state=state, value=updated, name=f"{a}/{kind}_write")
                keys = mb.slice_by_index(x=mb.read_state(input=key_cache, name=f"{a}/keys_read"),
                                         begin=[i, 0, 0, 0], end=[i + 1, nkv, max_seq, d],
                                         squeeze_mask=[True, False, False, False], name=f"{a}/keys")  # (kv, T, d)
                values = mb.slice_by_index(x=mb.read_state(input=value_cache, name=f"{a}/values_read"),
                                           begin=[i, 0, 0, 0], end=[i + 1, nkv, max_seq, d],
                                           squeeze_mask=[True, False, False, False], name=f"{a}/values")
                # GQA: the `group` query heads of a KV head become extra rows of one matmul against it.
                qg = mb.reshape(x=mb.mul(x=q, y=scale), shape=[nkv, -1, d], name=f"{a}/q_groups")  # (kv, g*S, d)
                scores = mb.matmul(x=qg, y=keys, transpose_y=True, name=f"{a}/scores")  # (kv, g*S, T)
                scores = mb.reshape(x=scores, shape=[nkv, group, -1, max_seq], name=f"{a}/scores4")
                probs = mb.softmax(x=mb.add(x=scores, y=mask_of(spec.window(layer) or 0),
                                          name=f"{a}/masked"), axis=-1, name=f"{a}/probs")
                ctx = mb.matmul(x=mb.reshape(x=probs, shape=[nkv, -1, max_seq], name=f"{a}/probs3"), y=values,
                                name=f"{a}/context")  # (kv, g*S, d)
                ctx = mb.transpose(x=mb.reshape(x=ctx, shape=[nh, -1, d], name=f"{a}/ctx_heads"), perm=[1, 0, 2],
                                   name=f"{a}/ctx_t")  # (S, nh, d)
                return mb.reshape(x=ctx, shape=[1, -1, nh * d], name=f"{a}/ctx")

            def gated_act(self, gate: Any, up: Any, layer: int) -> Any:
                m = f"model.layers.{layer}.mlp"
                if spec.activation == "gelu_tanh":
                    act = mb.gelu(x=gate, mode="TANH_APPROXIMATION", name=f"{m}/gelu")
                else:
                    act = mb.silu(x=gate, name=f"{m}/silu")
                return mb.mul(x=act, y=up, name=f"{m}/gated")

            def add(self, x: Any, y: Any, layer: int, what: str) -> Any:
                return mb.add(x=x, y=y, name=f"model.layers.{layer}/{what}_residual")

            def logits(self, x: Any) -> Any:
                if spec.tie_embeddings:
                    self.tensor_name("embed", None)
                    head, head_offsets = self.embed_weight
                else:
                    head, head_offsets = quantized_weight(self.tensor_name("output", None))
                if rotation is not None:
                    x = rotate(x, "head/rotate", inverse=False)
                return project(x, head, head_offsets, hidden_size, "logits")

        ops = MilOps()
        logits = run_decoder(ops)
        used.update(ops.used)
        return logits

    check_consumed(model.tensors, used, "coreml")
    return main, weight_names, int4_kinds


def quantize_int8(mlmodel: Any, names: list[str]) -> Any:
    import coremltools.optimize.coreml as cto

    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=0)
    # By name: the RoPE tables and norms stay fp16 whatever their size.
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs={mil_name(n): config for n in names}))


def count_weight_ops(package: Path) -> dict[str, int]:
    """How the weight of every linear and of the embedding lookup is produced in the saved program (from its
    spec), as "op type:stored dtype" (e.g. "constexpr_blockwise_shift_scale:int4"); the int4 form's block-offset
    matrices (Int4Weight) are counted apart, under "offsets ..."."""
    from coremltools.converters.mil.mil import types

    from ondevice.runners.coreml_interpreter import load_program

    program = load_program(package)
    producers = {op.outputs[0].name: op for op in program.functions["main"].operations}
    counts: dict[str, int] = {}
    for op in program.functions["main"].operations:
        if op.op_type == "linear" or (op.op_type == "gather" and "embed_tokens" in op.inputs["x"].name):
            source = op.inputs["weight" if op.op_type == "linear" else "x"].name
            producer = producers.get(source)
            kind = "const" if producer is None else producer.op_type
            if producer is not None and "data" in producer.inputs:
                kind += ":" + types.builtin_to_string(producer.inputs["data"].dtype)
            if source.endswith("_offsets"):
                kind = f"offsets {kind}"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def make_manifest(model: CanonicalModel, quant: str, block: int | None, max_seq: int, names: list[str],
                  package: Path, int4_kinds: dict[str, str] | None = None,
                  fp16_range: dict[str, Any] | None = None) -> dict[str, Any]:
    spec, special = model.spec, model.special
    layers = dict.fromkeys(names, {"fp16": "fp16", "int8": "int8-per-channel"}.get(quant, quant))
    layers |= {name: f"int4-block{block}-{kind}" for name, kind in (int4_kinds or {}).items()}
    extra: dict[str, Any] = {"fp16_range": fp16_range} if fp16_range else {}
    if int4_kinds:
        extra["int4_form"] = (f"scale * (code - 8) in int4 blocks of {block} (fp16 scale) plus per-block offsets, "
                              "int8 with an fp16 scale per row, applied to the input's block means")
        if "gptq" in int4_kinds.values():
            extra["output_rotation"] = "diag(signs) @ blockdiag(Hadamard); signs from numpy default_rng(0)"
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
        **extra,
    }


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    options = options_as(CoreMLOptions, options)
    ct = require_coremltools()
    start = time.perf_counter()
    quant, spec = options.quant, model.spec
    block = options.block_size
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
    max_seq = options.max_seq_len or min(spec.context_length, DEFAULT_MAX_SEQ)
    out = Path(out)
    for path in (out, manifest_path(out), tokenizer_path(out)):
        check_output_path(path, options.force)

    windows = calibration_windows(model, RANGE_TOKENS)
    residual_largest = residual_range(model, windows)
    residual_scale = residual_scale_for(residual_largest)
    with progress_bar(len(model.tensors), f"coreml {quant}", options.progress) as bar:
        program, names, int4_kinds = build_program(model, max_seq, bar, int4_block=block if quant == "int4" else None,
                                                   calibrate=options.calibrate, residual_scale=residual_scale)
    ranges = program_ranges(program, [w[:max_seq] for w in windows[:CHECK_WINDOWS]])
    headroom = check_headroom(ranges)
    fp16_range = {"residual_max": round(residual_largest, 1), "residual_scale": residual_scale,
                  "min_headroom": round(headroom, 2), "largest_op": max(ranges, key=ranges.get)}
    inputs = [ct.TensorType(name="input_ids", shape=(1, ct.RangeDim(1, max_seq, default=1)), dtype=np.int32),
              ct.TensorType(name="position", shape=(1,), dtype=np.int32)]
    mlmodel = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, inputs=inputs,
                         compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    del program
    if quant == "int8" and names:
        mlmodel = quantize_int8(mlmodel, names)
    mlmodel.short_description = f"{spec.arch} decoder ({spec.name}), {quant}, stateful KV cache of {max_seq}"

    write_text_atomic(tokenizer_path(out), model.tokenizer_json, force=options.force)
    manifest = make_manifest(model, quant, block, max_seq, names, out, int4_kinds, fp16_range=fp16_range)
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
             f"manifest {manifest_path(out).name}",
             f"fp16 range: residual stream up to {residual_largest:,.0f} carried / {residual_scale:g}; every op "
             f"{headroom:.1f}x or more below fp16's maximum on the calibration text"]
    return ConvertResult(target="coreml", quant=quant, output=str(out), size_bytes=size,
                         seconds=time.perf_counter() - start, tensor_types=count_types(types), notes=notes,
                         peak_rss_mib=peak_rss_mib())
