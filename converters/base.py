"""What every target writer shares: its description, the options it takes and the result it reports."""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ondevice.errors import UnsupportedError
from ondevice.model import CanonicalModel, LazyTensor


@dataclass
class ConvertOptions:
    """What every target takes; a target with more declares a subclass (Target.options) and its flags."""

    quant: str
    force: bool = False
    pre_tokenizer: str | None = None  # override llama.cpp pre-tokenizer detection
    progress: bool = True


@dataclass(frozen=True)
class TargetOption:
    """A `convert` flag of one target: `--FLAG` sets the options field `field` (None when not given)."""

    flag: str
    field: str
    help: str
    type: type | None = int  # None: a switch that stores `switch_value` (e.g. --no-calibrate stores False)
    metavar: str = "N"
    switch_value: bool = False


def options_as(cls: type[ConvertOptions], options: ConvertOptions) -> ConvertOptions:
    """`options` as the target's own options class (a plain ConvertOptions gets the target's defaults)."""
    if isinstance(options, cls):
        return options
    return cls(**{f.name: getattr(options, f.name) for f in fields(ConvertOptions)})


@dataclass(frozen=True)
class Target:
    name: str
    quants: tuple[str, ...]  # the schemes this target writes
    default_quant: str
    generic: dict[str, str]  # "4bit"/"8bit" -> the target's recommended scheme
    output_is_dir: bool
    suffix: str  # default output suffix ("" for folders)
    description: str
    options: type[ConvertOptions] = ConvertOptions  # the options class convert() reads
    cli_options: tuple[TargetOption, ...] = ()  # its flags beyond the common ones

    def resolve_quant(self, quant: str | None) -> tuple[str, str | None]:
        """(scheme, note): the scheme to write and, for a generic name, a note saying what it mapped to."""
        if quant is None:
            return self.default_quant, None
        key = quant.lower()
        if key in self.generic:
            scheme = self.generic[key]
            return scheme, f"--quant {quant} means {scheme} for {self.name}"
        if key not in self.quants:
            choices = ", ".join(list(self.quants) + list(self.generic))
            raise UnsupportedError(f"--quant {quant} is not available for --to {self.name}; choose from {choices}")
        return key, None


@dataclass
class ConvertResult:
    target: str
    quant: str
    output: str
    size_bytes: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # tensors that could not take the requested type
    notes: list[str] = field(default_factory=list)
    peak_rss_mib: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far.

    On Linux VmHWM is this process's own peak; ru_maxrss can carry a parent's peak over into a child.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled or None, file=sys.stderr,
                leave=False, dynamic_ncols=True)


CALIBRATION_CTX = 512  # tokens per calibration chunk, llama-imatrix's default


def check_method(method: str | None, methods: tuple[str, ...], target: str) -> None:
    """--method names one of the target's calibration methods."""
    if method is not None and method not in methods:
        raise UnsupportedError(f"--method {method!r}: choose one of {', '.join(methods)} for --to {target}")


def check_calibration_chunks(chunks: int | None, calibrating: bool, needs: str) -> None:
    """--calib-chunks comes with a calibration (`needs` says which options make one) and asks for >= 1 chunk."""
    if chunks is None:
        return
    if not calibrating:
        raise UnsupportedError(f"--calib-chunks needs {needs}")
    if chunks < 1:
        raise UnsupportedError(f"--calib-chunks {chunks}: give at least 1 chunk")


def layerwise_pass(model: CanonicalModel, types: dict, chunks: int | None, label: str, progress: bool,
                   **flags: Any) -> tuple[dict, int]:
    """ondevice.quant.calibrated's layer-by-layer pass over the bundled calibration text, a progress bar per layer:
    (its tensors, the number of chunks used). `flags` are calibrated_tensors' (awq, gptq, folded=, report=...)."""
    from ondevice.quant.calibrated import calibrated_tensors
    from ondevice.quant.imatrix import bundled_calibration_text, chunk_tokens

    token_chunks = chunk_tokens(model, bundled_calibration_text(), CALIBRATION_CTX, chunks)
    with progress_bar(model.spec.n_layers, f"{label} {len(token_chunks)}x{CALIBRATION_CTX} tokens", progress) as bar:
        bar.unit = "layer"
        tensors = calibrated_tensors(model, types, token_chunks, on_layer=lambda _layer: bar.update(1), **flags)
    return tensors, len(token_chunks)


def awq_target_options(rounding: str, runtime: str) -> tuple[TargetOption, TargetOption]:
    """--method awq and --calib-chunks for a target that quantizes by itself (`rounding`: whose rounding the
    search uses; `runtime`: what loads the folded artifact unchanged)."""
    return (TargetOption("--method", "method", f"awq: per-channel scales chosen on the bundled calibration text "
                         f"(each layer's output error under {rounding}), folded into the norms and the v/up rows, so "
                         f"{runtime} loads the artifact unchanged", type=str, metavar="{awq}"),
            TargetOption("--calib-chunks", "calibration_chunks", "calibrate on the first N chunks of 512 tokens of "
                         "the bundled calibration text (default: all 24)", type=int))


class _SpilledArrays(dict):
    """name -> .npy path: each float32 array set is written at once to a temporary folder, so a pass that produces
    every folded tensor of a model holds none of them in memory. The folder goes when this object does."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="ondevice-awq-"))
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        path = self.folder / f"{len(self)}.npy"
        np.save(path, np.ascontiguousarray(array, dtype=np.float32))
        super().__setitem__(name, path)


def awq_folded(model: CanonicalModel, types: dict, chunks: int | None, progress: bool) -> dict[str, LazyTensor]:
    """AWQ for a target that quantizes by itself (MLX, ONNX, ExecuTorch): the scales are searched under the
    target's own rounding (`types`: HF name -> an object with name/quantize/dequantize whose quantize() returns the
    rounded floats, or a float QuantType for what it keeps in float), and the tensors they change (norms, matrices,
    biases) come back as float tensors, by HF name in the source's form, for the target to quantize in their place.
    They wait on disk (memory-mapped copy-on-write when loaded) in a temporary folder that goes when the last of
    them does."""
    folded = _SpilledArrays()
    layerwise_pass(model, types, chunks, "awq", progress, awq=True, awq_pairs=True, gptq=False, folded=folded)
    return {name: LazyTensor(name, model.tensors[name].shape, "F32",
                             lambda path=path, keep=folded: np.load(path, mmap_mode="c"))
            for name, path in dict.items(folded)}


def count_types(types: list[str]) -> dict[str, int]:
    return dict(Counter(types).most_common())


def default_output(source: str, target: Target, quant: str) -> Path:
    stem = Path(source.rstrip("/")).name
    for ext in (".gguf", ".safetensors"):
        stem = stem.removesuffix(ext)
    return Path(f"{stem}-{quant}{target.suffix}")


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def hf_model_config(model: CanonicalModel, torch_dtype: str) -> dict[str, Any]:
    """The Hugging Face config.json of the model (transformers and mlx-lm build their module tree from it)."""
    from ondevice.architectures import get_architecture

    config = get_architecture(model.spec.arch).hf_config(model.spec)
    config["torch_dtype"] = torch_dtype
    if model.special.bos_id is not None:
        config["bos_token_id"] = model.special.bos_id
    if model.special.eos_id is not None:
        config["eos_token_id"] = model.special.eos_id
    return config


def write_tokenizer_files(model: CanonicalModel, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja, generation_config.json:
    what transformers' AutoTokenizer, mlx-lm and onnxruntime-genai read beside the weights."""
    from ondevice.tokenizer import tokenizer_config_json

    special = model.special
    (folder / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
    write_json(folder / "tokenizer_config.json",
               tokenizer_config_json(model.tokenizer_json, special, model.chat_template, model.spec.context_length))
    if model.chat_template:
        (folder / "chat_template.jinja").write_text(model.chat_template, encoding="utf-8")
    generation = dict(model.generation_config)
    generation.setdefault("bos_token_id", special.bos_id)
    eos = special.eos_ids or ([special.eos_id] if special.eos_id is not None else [])
    if eos:
        generation.setdefault("eos_token_id", eos[0] if len(eos) == 1 else eos)
    write_json(folder / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
