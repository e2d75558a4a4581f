"""Target MLX (`--to mlx`): a folder that mlx_lm.load runs unchanged on Apple silicon (and on mlx's CPU backend).

Layout (mlx-lm's own): config.json = the Hugging Face config plus a "quantization" entry {group_size, bits, mode},
model.safetensors (metadata {"format": "mlx"}) with HF tensor names, tokenizer files and the chat template.
A quantized layer `<path>` is stored as `<path>.weight` (uint32, 32/bits codes per word, lowest bits first),
`<path>.scales` and `<path>.biases` (one each per group of `group_size` inputs, float16); a weight is
`scale * code + bias`. The codes, scales and biases are bit-identical to `mx.quantize` on the float16 weight,
which is what `mlx_lm.convert --dtype float16 -q` stores, except for int4 in groups of 32 from a source that
already stores the weight as Q4_0/Q4_1: that grid is the same affine form and is copied exactly (lossless). Linear layers and the embedding are quantized; a layer
whose input width the group size does not divide stays float16 (as mlx_lm.convert does) and is reported. With
tied embeddings the quantized embedding also serves as the output layer (mlx-lm's `as_linear`).
"""

from __future__ import annotations

import importlib.util
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
    awq_folded,
    awq_target_options,
    check_calibration_chunks,
    check_method,
    count_types,
    hf_model_config,
    options_as,
    peak_rss_mib,
    progress_bar,
    write_json,
    write_tokenizer_files,
)

from ondevice.architectures import get_architecture
from ondevice.errors import UnsupportedError
from ondevice.formats.atomic import atomic_output
from ondevice.formats.safetensors import PlannedSafeTensor, f32_to_bf16, write_safetensors
from ondevice.model import CanonicalModel, LazyTensor
from ondevice.quant import AFFINE_4BIT_TYPES
from ondevice.quant.affine import source_affine_grid


@dataclass
class MLXOptions(ConvertOptions):
    group_size: int | None = None  # affine group; None = 64 where every width allows, else 32
    method: str | None = None  # "awq": scales searched on the calibration text, folded in before mlx's rounding
    calibration_chunks: int | None = None  # chunks of 512 tokens of the calibration text (default: all, 24)


METHODS = ("awq",)


TARGET = Target(
    name="mlx",
    quants=("f16", "bf16", "int4", "int8"),
    default_quant="int4",
    generic={"4bit": "int4", "8bit": "int8"},
    output_is_dir=True,
    suffix="",
    description="an MLX folder (safetensors + config) that mlx_lm.load runs; int4/int8 in mlx's affine groups",
    options=MLXOptions,
    cli_options=(
        TargetOption("--group-size", "group_size", "affine group: 32, 64 or 128 (default 64 where every "
                     "width allows it)"),
        *awq_target_options("mlx's own rounding", "mlx-lm"),
    ),
)

GROUP_SIZES = (32, 64, 128)
QUANT_BITS = {"int4": 4, "int8": 8}
DEFAULT_GROUP = 64  # mlx's default; 32 where the width is not a multiple of 64
ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # quantize big matrices in row chunks to bound the float32 temporaries


# ---------------------------------------------------------------------------------------------------- quantization
def affine_quantize(w: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mx.quantize(w, group_size, bits) in "affine" mode, bit for bit (mlx's CPU kernel, in float32 arithmetic).

    Per group: the end (min or max) of larger magnitude is made exactly representable (bias = that end, scale
    adjusted so it falls on a code), codes = clip(rint((w - bias) / scale), 0, 2^bits - 1). Returns
    (uint32 codes packed lowest-first, scales, biases); scales and biases are cast to w's dtype after the codes
    are computed with their float32 values, as mlx does.
    """
    rows, width = w.shape
    n_bins = np.float32((1 << bits) - 1)
    x = w.astype(np.float32, copy=False).reshape(rows, width // group_size, group_size)
    w_max = x.max(axis=-1, keepdims=True)
    w_min = x.min(axis=-1, keepdims=True)
    min_is_edge = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(min_is_edge, scale, -scale)
    edge = np.where(min_is_edge, w_min, w_max)
    q0 = np.rint(edge / scale)
    on_code = q0 != 0
    scale = np.where(on_code, edge / np.where(on_code, q0, np.float32(1)), scale)
    bias = np.where(on_code, edge, np.float32(0))
    codes = np.clip(np.rint((x - bias) / scale), 0, n_bins).astype(np.uint32)
    return _pack_codes(codes.reshape(rows, width), bits), _cast_like(scale[..., 0], w), _cast_like(bias[..., 0], w)


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, width) -> uint32 words (rows, width * bits / 32), lowest bits first."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    return np.bitwise_or.reduce(codes.astype(np.uint32).reshape(codes.shape[0], -1, per_word) << shifts, axis=-1)


def _cast_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    return values.astype(like.dtype) if like.dtype != np.float32 else values.astype(np.float32)


def affine_dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """The float32 weight an (codes, scales, biases) triple stands for (for tests and inspection)."""
    rows = packed.shape[0]
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    codes = codes.reshape(rows, scales.shape[1], -1).astype(np.float32)
    return (codes * scales[..., None].astype(np.float32) + biases[..., None].astype(np.float32)).reshape(rows, -1)


def _quantize_rows(w16: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """affine_quantize over row chunks (groups never span rows, so chunking changes nothing)."""
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // w16.shape[1])
    parts = [affine_quantize(w16[i:i + step], group_size, bits) for i in range(0, w16.shape[0], step)]
    packed, scales, biases = (np.concatenate([p[k] for p in parts]) for k in range(3))
    return packed, scales, biases


# ---------------------------------------------------------------------------------------------------- planning
@dataclass
class LayerPlan:
    module: str  # mlx module path ("model.layers.0.self_attn.q_proj")
    tensor: LazyTensor
    group_size: int | None  # None: stays float16


def choose_group(width: int, requested: int | None) -> int | None:
    """The group size for a layer of this input width, or None when the layer must stay float16."""
    if requested is not None:
        return requested if width % requested == 0 else None
    for group in (DEFAULT_GROUP, 32):
        if width % group == 0:
            return group
    return None


def plan_layers(model: CanonicalModel, requested: int | None) -> list[LayerPlan]:
    """Every 2-D weight (linear layers, embedding, output) with its group size."""
    plans = []
    for name, tensor in model.tensors.items():
        if len(tensor.shape) == 2 and name.endswith(".weight"):
            plans.append(LayerPlan(name.removesuffix(".weight"), tensor, choose_group(tensor.shape[1], requested)))
    return plans


def check_group_size(group_size: int | None, quant: str, plans: list[LayerPlan]) -> None:
    if group_size is None:
        return
    if quant not in QUANT_BITS:
        raise UnsupportedError(f"--group-size applies to int4/int8 only, not --quant {quant}")
    if group_size not in GROUP_SIZES:
        raise UnsupportedError(f"--group-size {group_size} is not supported by mlx; choose 32, 64 or 128")
    if plans and all(p.group_size is None for p in plans):
        widths = sorted({p.tensor.shape[1] for p in plans})
        raise UnsupportedError(f"--group-size {group_size} divides none of this model's layer widths "
                               f"({', '.join(map(str, widths))}); choose a group size that does, e.g. 32")


# ---------------------------------------------------------------------------------------------------- calibration
class _MlxRounding:
    """mlx's affine rounding of one layer as ondevice.quant.calibrated's pass uses a quantizer: quantize() returns
    the rounded float32 weights (mlx_lm.convert's cast to float16, then mx.quantize), dequantize() them as they are;
    mx.quantize takes no importance weights."""

    def __init__(self, group_size: int, bits: int) -> None:
        self.name, self.group_size, self.bits = f"mlx_int{bits}_g{group_size}", group_size, bits

    def quantize(self, x: np.ndarray, *, name: str | None = None, importance: np.ndarray | None = None) -> np.ndarray:
        return affine_dequantize(*_quantize_rows(x.astype(np.float16), self.group_size, self.bits), self.bits)

    def dequantize(self, data: np.ndarray, n: int) -> np.ndarray:
        return data


def awq_types(model: CanonicalModel, plans: list[LayerPlan], bits: int) -> dict:
    """What AWQ's search rounds each tensor with: mlx's rounding for the quantized layers, float for the rest."""
    from ondevice.quant import get_quant_type

    f32 = get_quant_type("f32")
    types = {name: f32 for name in model.tensors}
    types.update({p.tensor.name: _MlxRounding(p.group_size, bits) for p in plans if p.group_size is not None})
    return types


# ---------------------------------------------------------------------------------------------------- writing
def _float_tensor(name: str, tensor: LazyTensor, dtype: str) -> PlannedSafeTensor:
    if dtype == "BF16":
        return PlannedSafeTensor(name, "BF16", tensor.shape, lambda: f32_to_bf16(tensor.load()))
    return PlannedSafeTensor(name, "F16", tensor.shape, lambda: tensor.load().astype(np.float16))


class _QuantizedLayer:
    """Quantizes one layer on first use and hands out its three tensors (weight, scales, biases) in turn."""

    def __init__(self, tensor: LazyTensor, group_size: int, bits: int) -> None:
        self.tensor, self.group_size, self.bits = tensor, group_size, bits
        self.parts: dict[str, np.ndarray] = {}

    def part(self, which: str) -> np.ndarray:
        if not self.parts:
            grid = source_grid(self.tensor, self.group_size, self.bits)
            if grid is None:
                w16 = self.tensor.load().astype(np.float16)  # mlx_lm.convert casts to the model dtype first
                grid = _quantize_rows(w16, self.group_size, self.bits)
            self.parts = dict(zip(("weight", "scales", "biases"), grid, strict=True))
        return self.parts.pop(which)  # each part is written once; drop it as soon as it is


def keeps_source_grid(tensor: LazyTensor, group_size: int, bits: int) -> bool:
    """Whether the source stores this weight on a grid mlx can hold as is (Q4_0/Q4_1: 4 bits in blocks of 32)."""
    return bits == 4 and group_size == 32 and tensor.raw is not None and tensor.source_dtype in AFFINE_4BIT_TYPES


def source_grid(tensor: LazyTensor, group_size: int, bits: int) -> tuple[np.ndarray, ...] | None:
    """The source's own 4-bit grid in mlx's layout (packed codes, fp16 scales, fp16 biases), or None.

    Q4_1's weight = d * code + m is mlx's affine scale * code + bias with the same fp16 numbers (Q4_0: bias -8 d),
    so the copy is exact, where mx.quantize would put the weights on a second grid and double their error."""
    grid = source_affine_grid(tensor, group_size) if keeps_source_grid(tensor, group_size, bits) else None
    if grid is None:
        return None
    codes, scale, bias = grid
    scales, biases = scale.astype(np.float16), bias.astype(np.float16)
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
        return None
    return _pack_codes(codes, 4), scales, biases


def mlx_lm_knows(model_type: str) -> bool | None:
    """Whether the installed mlx-lm has a model of this type (None: mlx-lm is not installed here)."""
    try:
        return importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None
    except (ImportError, ValueError):
        return None if importlib.util.find_spec("mlx_lm") is None else False


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    options = options_as(MLXOptions, options)
    start = time.perf_counter()
    quant = options.quant
    model_type = get_architecture(model.spec.arch).hf_model_type
    known = mlx_lm_knows(model_type)
    if known is False:  # the folder would be written and then fail in mlx_lm.load
        raise UnsupportedError(f"mlx: mlx-lm has no model of type {model_type!r} (architecture {model.spec.arch}), "
                               "so it could not load this folder")
    requested = options.group_size  # None: 64 where the layer width allows, else 32
    plans = plan_layers(model, requested if quant in QUANT_BITS else None)
    check_group_size(requested, quant, plans)
    bits = QUANT_BITS.get(quant)
    check_method(options.method, METHODS, "mlx")
    if options.method is not None and bits is None:
        raise UnsupportedError(f"--quant {quant} keeps the weights in float: there is nothing to calibrate "
                               f"(--method {options.method} applies to int4/int8)")
    check_calibration_chunks(options.calibration_chunks, options.method is not None, "--method awq")
    folded = awq_folded(model, awq_types(model, plans, bits), options.calibration_chunks,
                        options.progress) if options.method == "awq" else {}

    planned: list[PlannedSafeTensor] = []
    types: list[str] = []
    fallbacks: list[str] = []
    notes: list[str] = []
    layer_entries: dict[str, Any] = {}
    plan_by_tensor = {id(p.tensor): p for p in plans}
    group_counts: dict[int, int] = {}
    offered_grid = 0  # layers stored as Q4_0/Q4_1 that --group-size 32 would copy instead of re-quantize
    for name, source in model.tensors.items():
        plan = plan_by_tensor.get(id(source))
        tensor = folded.get(name, source)
        if bits is None or plan is None:
            planned.append(_float_tensor(name, tensor, "BF16" if quant == "bf16" else "F16"))
            types.append(quant if bits is None else "f16")
            continue
        if plan.group_size is None:
            width = tensor.shape[1]
            why = (f"width {width} is not a multiple of --group-size {requested}" if requested
                   else f"width {width} is not a multiple of 32")
            fallbacks.append(f"{plan.module}: {quant} -> f16 ({why})")
            layer_entries[plan.module] = False
            planned.append(_float_tensor(name, tensor, "F16"))
            types.append("f16")
            continue
        group = plan.group_size
        group_counts[group] = group_counts.get(group, 0) + 1
        rows, width = tensor.shape
        layer = _QuantizedLayer(tensor, group, bits)
        planned.append(PlannedSafeTensor(f"{plan.module}.weight", "U32", (rows, width * bits // 32),
                                         lambda layer=layer: layer.part("weight")))
        planned.append(PlannedSafeTensor(f"{plan.module}.scales", "F16", (rows, width // group),
                                         lambda layer=layer: layer.part("scales")))
        planned.append(PlannedSafeTensor(f"{plan.module}.biases", "F16", (rows, width // group),
                                         lambda layer=layer: layer.part("biases")))
        copied = keeps_source_grid(tensor, group, bits)
        types.append(f"{quant}-g{group}" + ("-source-grid" if copied else ""))
        if bits == 4 and group != 32 and keeps_source_grid(tensor, 32, bits):
            offered_grid += 1

    config = hf_model_config(model, {"bf16": "bfloat16"}.get(quant, "float16"))
    if bits is not None:
        default_group = requested or max(group_counts, key=lambda g: (group_counts[g], g), default=DEFAULT_GROUP)
        quantization: dict[str, Any] = {"group_size": default_group, "bits": bits, "mode": "affine"}
        for plan in plans:
            if plan.group_size is not None and plan.group_size != default_group:
                layer_entries[plan.module] = {"group_size": plan.group_size, "bits": bits, "mode": "affine"}
        quantization.update(layer_entries)  # per-layer entries: mlx-lm honours them before its default
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # mlx-lm writes both; HF-side tools read the second
        if requested is None:
            used = ", ".join(f"group {g} for {n} layers" for g, n in sorted(group_counts.items(), reverse=True))
            notes.append(f"mlx {quant}: {used} (64 where the layer width allows it, else 32)")
        if offered_grid:
            notes.append(f"mlx {quant}: the source stores {offered_grid} of these weights as 4-bit blocks of 32; "
                         f"--group-size 32 keeps that grid exactly instead of re-quantizing onto a second one")

    if known is None:
        notes.append(f"mlx: mlx-lm is not installed here, so whether it runs model type {model_type!r} was not "
                     "checked")
    with atomic_output(out, force=options.force, directory=True) as tmp:
        with progress_bar(len(planned), f"mlx {quant}", options.progress) as bar:
            write_safetensors(tmp / "model.safetensors", planned, metadata={"format": "mlx"},
                              on_tensor=lambda _t: bar.update(1))
        write_json(tmp / "config.json", config)
        write_tokenizer_files(model, tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir())
    return ConvertResult(
        target="mlx", quant=quant, output=str(out), size_bytes=size, seconds=time.perf_counter() - start,
        tensor_types=count_types(types), fallbacks=fallbacks, notes=notes, peak_rss_mib=peak_rss_mib(),
    )
