"""Target GGUF (llama.cpp, PocketPal, ondevice's runtime): tensors streamed one at a time, atomic file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ondevice.converters.base import (
    CALIBRATION_CTX,
    ConvertOptions,
    ConvertResult,
    Target,
    TargetOption,
    check_calibration_chunks,
    count_types,
    layerwise_pass,
    options_as,
    peak_rss_mib,
    progress_bar,
)

from ondevice.architectures import get_architecture
from ondevice.architectures.base import ROPE_FREQS_GGUF, permute_for_gguf
from ondevice.formats.gguf import PlannedTensor, TypedValue, ValueType, write_gguf
from ondevice.model import CanonicalModel, LazyTensor
from ondevice.quant import QuantType
from ondevice.quant.recipes import RECIPES, choose_tensor_type


@dataclass
class GGUFOptions(ConvertOptions):
    imatrix: Path | None = None  # an importance matrix file (llama.cpp's GGUF or .dat form)
    calibrate: bool = False  # calibrate on the bundled text (METHODS; --method awq unless told)
    method: str | None = None  # see METHODS
    calibration_chunks: int | None = None  # chunks of 512 tokens of the calibration text (default: all, 24)


# How the calibration statistics are used. imatrix: llama-quantize --imatrix's importance-weighted rounding (same
# bytes). gptq: the same scales, codes chosen by GPTQ on each layer's inputs in the model as quantized so far
# (ondevice.quant.calibrated). awq (--calibrate's default): per-channel scales folded into the RMSNorms and the
# v / up rows, then the importance-weighted rounding, on those inputs too; awq+gptq: those scales, then GPTQ's
# codes. The layer-by-layer methods compute their own statistics, so they take no --imatrix file.
METHODS = ("imatrix", "gptq", "awq", "awq+gptq")
LAYERWISE_METHODS = {"gptq": {"gptq": True}, "awq": {"gptq": False, "awq": True, "awq_pairs": True},
                     "awq+gptq": {"gptq": True, "awq": True, "awq_pairs": True}}


TARGET = Target(
    name="gguf",
    quants=tuple(RECIPES),
    default_quant="q8_0",
    generic={"4bit": "q4_k_m", "8bit": "q8_0"},
    output_is_dir=False,
    suffix=".gguf",
    description="one .gguf file for llama.cpp, PocketPal and ondevice's runtime",
    options=GGUFOptions,
    cli_options=(
        TargetOption("--imatrix", "imatrix", "importance matrix (from `ondevice imatrix` or llama-imatrix, GGUF or "
                     ".dat) weighting the q4_0/q4_1/q5_0/q5_1/q3_k/q4_k/q5_k/q6_k/iq4_nl/iq4_xs tensors' rounding, as "
                     "llama-quantize --imatrix does", type=Path, metavar="FILE"),
        TargetOption("--calibrate", "calibrate", "calibrate on the bundled calibration text: --method awq unless "
                     "told (with --method imatrix: compute the importance matrix first, `ondevice imatrix` defaults, "
                     "and quantize with it as llama-quantize does)", type=None, switch_value=True),
        TargetOption("--method", "method", "how calibration is used: imatrix (llama-quantize --imatrix's rounding) "
                     "(the default), gptq (the same scales, codes chosen by GPTQ layer by layer on the calibration "
                     "text: lower KL, higher perplexity on SmolLM2), awq (--calibrate's default: per-channel scales "
                     "folded into the norms and the v/up rows, then the importance-weighted rounding) or awq+gptq "
                     "(those scales, then GPTQ's codes: the lowest KL at q4_k_m/q4_0)",
                     type=str, metavar="{" + ",".join(METHODS) + "}"),
        TargetOption("--calib-chunks", "calibration_chunks", "calibrate on the first N chunks of 512 tokens of the "
                     "bundled calibration text (default: all 24)", type=int),
    ),
)

# llama.cpp's llama_ftype, stored as general.file_type
FILE_TYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "bf16": 32,
}


def _spm_tokenizer_fields(vocab) -> dict[str, TypedValue]:
    """A SentencePiece-style source vocabulary written back key for key (scores and token types exactly), so that
    llama.cpp tokenizes the output as it did the source."""
    from ondevice.tokenizer import gguf_metadata_from_vocab

    fields: dict[str, TypedValue] = {}
    for key, value in gguf_metadata_from_vocab(vocab).items():
        if key == "tokenizer.ggml.scores":
            fields[key] = TypedValue(ValueType.ARRAY, np.asarray(value, np.float32), ValueType.FLOAT32)
        elif key == "tokenizer.ggml.token_type":
            fields[key] = TypedValue(ValueType.ARRAY, np.asarray(value, np.int32), ValueType.INT32)
        elif isinstance(value, bool):
            fields[key] = TypedValue(ValueType.BOOL, value)
        elif isinstance(value, int):
            fields[key] = TypedValue(ValueType.UINT32, value)
        elif isinstance(value, str):
            fields[key] = TypedValue(ValueType.STRING, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            fields[key] = TypedValue(ValueType.ARRAY, value, ValueType.STRING)
        # other carried-through keys of unknown type are left out rather than guessed
    fields["tokenizer.ggml.add_eos_token"] = TypedValue(ValueType.BOOL, bool(vocab.add_eos))  # as for BPE
    return fields


def tokenizer_fields(model: CanonicalModel, pre: str | None) -> dict[str, TypedValue]:
    from ondevice.tokenizer import vocab_from_hf

    s, u32 = ValueType.STRING, ValueType.UINT32
    if model.gguf_vocab is not None and model.gguf_vocab.model == "llama":
        vocab = model.gguf_vocab  # the source's own scores, exactly
    else:
        vocab = vocab_from_hf(model.tokenizer_json, model.special, pre=pre or model.pre_tokenizer)
    if vocab.model == "llama":
        fields = _spm_tokenizer_fields(vocab)
        if model.chat_template:
            fields["tokenizer.chat_template"] = TypedValue(s, model.chat_template)
        return fields
    fields = {
        "tokenizer.ggml.model": TypedValue(s, vocab.model),
        "tokenizer.ggml.pre": TypedValue(s, vocab.pre or "default"),
        "tokenizer.ggml.tokens": TypedValue(ValueType.ARRAY, vocab.tokens, s),
        "tokenizer.ggml.token_type": TypedValue(ValueType.ARRAY, np.asarray(vocab.token_types, np.int32),
                                                ValueType.INT32),
        "tokenizer.ggml.merges": TypedValue(ValueType.ARRAY, vocab.merges, s),
    }
    for key, value in (("bos_token_id", vocab.bos_id), ("eos_token_id", vocab.eos_id),
                       ("unknown_token_id", vocab.unk_id), ("padding_token_id", vocab.pad_id),
                       ("eot_token_id", vocab.eot_id)):
        if value is not None:
            fields[f"tokenizer.ggml.{key}"] = TypedValue(u32, value)
    fields["tokenizer.ggml.add_bos_token"] = TypedValue(ValueType.BOOL, vocab.add_bos)
    fields["tokenizer.ggml.add_eos_token"] = TypedValue(ValueType.BOOL, vocab.add_eos)
    if model.chat_template:
        fields["tokenizer.chat_template"] = TypedValue(s, model.chat_template)
    return fields


def _producer(tensor: LazyTensor, qtype: QuantType, heads: int | None, shift: float = 0.0,
              importance: np.ndarray | None = None):
    def produce() -> np.ndarray:
        if tensor.raw is not None and not shift and importance is None:
            src_type, rows = tensor.raw()
            if src_type.name == qtype.name:  # same type: copy the stored rows, no requantization
                return permute_for_gguf(rows, heads) if heads else np.asarray(rows)
        data = tensor.load()
        if heads:
            data = permute_for_gguf(data, heads)  # rows only: the importance of the input columns still applies
        if shift:
            data = data + np.float32(shift)
        return qtype.quantize(data, name=tensor.name, importance=importance)

    return produce


def calibration_method(options: GGUFOptions) -> str | None:
    """The method the options ask for (None: no calibration); bad combinations are one-line errors."""
    from ondevice.errors import UnsupportedError

    method = options.method
    if method is not None and method not in METHODS:
        raise UnsupportedError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if options.imatrix is not None and options.calibrate:
        raise UnsupportedError("--imatrix and --calibrate exclude each other: --calibrate computes its own "
                               "statistics on the bundled calibration text")
    check_calibration_chunks(options.calibration_chunks, options.calibrate or method in LAYERWISE_METHODS,
                             "--calibrate or --method gptq/awq/awq+gptq (a given --imatrix is used as is)")
    if method in LAYERWISE_METHODS and options.imatrix is not None:
        raise UnsupportedError(f"--method {method} collects its own statistics on the calibration text (the inputs "
                               "of the model as quantized so far); drop --imatrix, or use --method imatrix")
    if method == "imatrix" and options.imatrix is None and not options.calibrate:
        raise UnsupportedError("--method imatrix needs --imatrix FILE or --calibrate")
    if method is None:
        # --calibrate: awq, the lowest KL to the float model without gptq's perplexity cost (docs/BENCHMARKS.md 3.1.3)
        method = "awq" if options.calibrate else "imatrix" if options.imatrix is not None else None
    if method is not None and options.quant in ("f32", "f16", "bf16"):
        raise UnsupportedError(f"--quant {options.quant} keeps the weights in float: there is nothing to calibrate "
                               f"(--method {method}, --imatrix, --calibrate apply to the quantized recipes)")
    return method


def _stored(data: np.ndarray):
    return lambda: data


def _importance_matrix(model: CanonicalModel, options: GGUFOptions, method: str | None):
    """(imatrix or None, its description for the metadata and notes)."""
    from ondevice.quant.imatrix import Imatrix, calibrate

    if method != "imatrix":
        return None, ""
    if options.imatrix is not None:
        return Imatrix.load(options.imatrix), str(options.imatrix)
    return calibrate(model, chunks=options.calibration_chunks, progress=options.progress), "calibrate"


def _layerwise_tensors(model: CanonicalModel, choices: dict, method: str, options: GGUFOptions,
                       notes: list[str]) -> dict:
    """The tensors --method gptq / awq quantize layer by layer on the calibration text (GGUF name -> bytes)."""
    from ondevice.quant.calibrated import DAMP, DAMP_DOWN, GptqReport

    report = GptqReport() if method == "gptq" else None  # its output errors cost ~15% of an awq pass: gptq's note only
    tensors, n_chunks = layerwise_pass(model, {name: choice.qtype for name, choice in choices.items()},
                                       options.calibration_chunks, method, options.progress, report=report,
                                       **LAYERWISE_METHODS[method])
    if method == "gptq":
        notes.append(f"gptq: {len(tensors)} tensors, {n_chunks}x{CALIBRATION_CTX} calibration tokens, damp {DAMP} "
                     f"({DAMP_DOWN} for ffn_down); output error on the calibration inputs "
                     f"{report.mean_ratio():.2f}x the importance-weighted rounding's (mean)")
    else:
        notes.append(f"{method}: {len(tensors)} tensors (norms included), {n_chunks}x{CALIBRATION_CTX} calibration "
                     "tokens")
    return tensors


def _imatrix_fields(imatrix, source: str) -> dict[str, TypedValue]:
    """What llama-quantize records of the imatrix it used (quantize.imatrix.*)."""
    fields = {"quantize.imatrix.file": TypedValue(ValueType.STRING, source[:127]),
              "quantize.imatrix.entries_count": TypedValue(ValueType.UINT32, len(imatrix.sums))}
    if imatrix.datasets:
        fields["quantize.imatrix.dataset"] = TypedValue(ValueType.STRING, imatrix.datasets[0][:127])
    if imatrix.chunk_count > 0:
        fields["quantize.imatrix.chunks_count"] = TypedValue(ValueType.UINT32, int(imatrix.chunk_count))
    return fields


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    start = time.perf_counter()
    options = options_as(GGUFOptions, options)
    spec = model.spec
    arch = get_architecture(spec.arch)
    recipe = options.quant
    method = calibration_method(options)
    imatrix, imatrix_source = _importance_matrix(model, options, method)
    notes: list[str] = []
    fields: dict[str, TypedValue] = {
        "general.architecture": TypedValue(ValueType.STRING, spec.arch),
        "general.type": TypedValue(ValueType.STRING, "model"),
        "general.name": TypedValue(ValueType.STRING, str(model.metadata.get("general.name") or spec.name)),
        "general.file_type": TypedValue(ValueType.UINT32, FILE_TYPES[recipe]),
        "general.quantization_version": TypedValue(ValueType.UINT32, 2),
    }
    fields.update(arch.gguf_fields(spec))
    fields.update(tokenizer_fields(model, options.pre_tokenizer))

    has_imatrix = method is not None  # GPTQ's diag(H) is an importance matrix: llama.cpp's imatrix recipe choices
    choices = {hf_name: choose_tensor_type(recipe, arch.gguf_name(hf_name), tensor.shape, spec.n_layers,
                                           spec.tie_embeddings, spec.arch, has_imatrix,
                                           spec.n_heads // spec.n_kv_heads)
               for hf_name, tensor in model.tensors.items()}
    weighted = {arch.gguf_name(hf_name): model.tensors[hf_name].shape[-1] for hf_name, choice in choices.items()
                if choice.takes_importance}
    if imatrix is not None:
        fields.update(_imatrix_fields(imatrix, imatrix_source))
        # Entries the model has no tensor for are ignored; matrices with no entry (token_embd and the output
        # layer never have one) are quantized without weights, as llama-quantize does ("did not find weights").
        where = imatrix_source if imatrix_source != "calibrate" else "the calibrated imatrix"
        missing = imatrix.check_model(weighted, where)
        if missing:
            notes.append(f"imatrix: no entry for {len(missing)} of the {len(weighted)} importance-weighted tensors "
                         f"(e.g. {missing[0]}); they are quantized without it, as llama-quantize does")
        notes.append(f"imatrix: {len(weighted) - len(missing)} tensors quantized with importance weights "
                     f"({imatrix_source})")

    calibrated = _layerwise_tensors(model, choices, method, options, notes) if method in LAYERWISE_METHODS else {}
    if method in LAYERWISE_METHODS:
        fields["quantize.ondevice.method"] = TypedValue(ValueType.STRING, method)
    planned, types, fallbacks = [], [], []
    for hf_name, tensor in model.tensors.items():
        gguf_name = arch.gguf_name(hf_name)
        choice = choices[hf_name]
        qtype = choice.qtype
        if choice.fallback_from:
            fallbacks.append(f"{gguf_name}: {choice.fallback_from} -> {qtype.name} ({choice.reason})")
        types.append(qtype.name)
        importance = imatrix.importance(gguf_name) if imatrix is not None and gguf_name in weighted else None
        if gguf_name in calibrated:
            planned.append(PlannedTensor(gguf_name, tensor.shape, qtype.ggml_type,
                                         _stored(calibrated.pop(gguf_name))))
            continue
        planned.append(PlannedTensor(gguf_name, tensor.shape, qtype.ggml_type,
                                     _producer(tensor, qtype, arch.qk_heads(spec, hf_name),
                                               arch.gguf_norm_shift(spec, hf_name), importance)))

    if spec.rope_freq_factors is not None:  # llama.cpp reads RoPE scaling as this tensor of per-pair divisors
        factors = np.asarray(spec.rope_freq_factors, np.float32)
        planned.append(PlannedTensor(ROPE_FREQS_GGUF, factors.shape, 0, factors.tobytes))  # 0: GGML f32
        types.append("f32")

    with progress_bar(len(planned), f"gguf {recipe}", options.progress) as bar:
        size = write_gguf(out, fields, planned, force=options.force, on_tensor=lambda _t: bar.update(1))
    return ConvertResult(
        target="gguf", quant=recipe, output=str(out), size_bytes=size, seconds=time.perf_counter() - start,
        tensor_types=count_types(types), fallbacks=fallbacks, notes=notes, peak_rss_mib=peak_rss_mib(),
    )
