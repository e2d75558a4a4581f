"""Target Hugging Face folder (`--to hf`): safetensors, config, tokenizer files and chat template that
transformers loads. Lets any GGUF be re-targeted or inspected with the HF ecosystem."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from ondevice.converters.base import (
    ConvertOptions,
    ConvertResult,
    Target,
    count_types,
    peak_rss_mib,
    progress_bar,
)

from ondevice.architectures import get_architecture
from ondevice.formats.atomic import atomic_output
from ondevice.formats.safetensors import PlannedSafeTensor, f32_to_bf16, write_safetensors
from ondevice.model import CanonicalModel

TARGET = Target(
    name="hf",
    quants=("f32", "f16", "bf16"),
    default_quant="f32",  # f32 keeps dequantized GGUF weights exact, so a round trip can be byte-identical
    generic={},
    output_is_dir=True,
    suffix="",
    description="a Hugging Face model folder (safetensors) that transformers loads",
)

_DTYPES = {"f32": ("F32", np.float32), "f16": ("F16", np.float16), "bf16": ("BF16", None)}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    from ondevice.tokenizer import tokenizer_config_json

    start = time.perf_counter()
    arch = get_architecture(model.spec.arch)
    st_dtype, np_dtype = _DTYPES[options.quant]

    def cast(x: np.ndarray) -> np.ndarray:
        return f32_to_bf16(x) if np_dtype is None else x.astype(np_dtype)

    planned = [PlannedSafeTensor(name, st_dtype, t.shape, lambda t=t: cast(t.load()))
               for name, t in model.tensors.items()]
    config = arch.hf_config(model.spec)
    config["torch_dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[options.quant]
    special = model.special
    if special.bos_id is not None:
        config["bos_token_id"] = special.bos_id
    if special.eos_id is not None:
        config["eos_token_id"] = special.eos_id
    generation = dict(model.generation_config)
    generation.setdefault("bos_token_id", special.bos_id)
    eos = special.eos_ids or ([special.eos_id] if special.eos_id is not None else [])
    generation.setdefault("eos_token_id", eos[0] if len(eos) == 1 else eos)

    with atomic_output(out, force=options.force, directory=True) as tmp:
        with progress_bar(len(planned), f"hf {options.quant}", options.progress) as bar:
            write_safetensors(tmp / "model.safetensors", planned, metadata={"format": "pt"},
                              on_tensor=lambda _t: bar.update(1))
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
        (tmp / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json",
                    tokenizer_config_json(model.tokenizer_json, special, model.chat_template,
                                          model.spec.context_length))
        if model.chat_template:
            (tmp / "chat_template.jinja").write_text(model.chat_template, encoding="utf-8")
        size = sum(p.stat().st_size for p in tmp.iterdir())
    return ConvertResult(
        target="hf", quant=options.quant, output=str(out), size_bytes=size, seconds=time.perf_counter() - start,
        tensor_types=count_types([options.quant] * len(planned)), peak_rss_mib=peak_rss_mib(),
    )
