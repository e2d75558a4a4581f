"""Target Hugging Face folder (`--to hf`): safetensors, config, tokenizer files and chat template that
transformers loads. Lets any GGUF be re-targeted or inspected with the HF ecosystem."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ondevice.converters.base import (
    ConvertOptions,
    ConvertResult,
    Target,
    count_types,
    hf_model_config,
    peak_rss_mib,
    progress_bar,
    write_json,
    write_tokenizer_files,
)

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


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    start = time.perf_counter()
    st_dtype, np_dtype = _DTYPES[options.quant]

    def cast(x: np.ndarray) -> np.ndarray:
        return f32_to_bf16(x) if np_dtype is None else x.astype(np_dtype)

    planned = [PlannedSafeTensor(name, st_dtype, t.shape, lambda t=t: cast(t.load()))
               for name, t in model.tensors.items()]
    config = hf_model_config(model, {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[options.quant])

    with atomic_output(out, force=options.force, directory=True) as tmp:
        with progress_bar(len(planned), f"hf {options.quant}", options.progress) as bar:
            write_safetensors(tmp / "model.safetensors", planned, metadata={"format": "pt"},
                              on_tensor=lambda _t: bar.update(1))
        write_json(tmp / "config.json", config)
        write_tokenizer_files(model, tmp)
        size = sum(p.stat().st_size for p in tmp.iterdir())
    return ConvertResult(
        target="hf", quant=options.quant, output=str(out), size_bytes=size, seconds=time.perf_counter() - start,
        tensor_types=count_types([options.quant] * len(planned)), peak_rss_mib=peak_rss_mib(),
    )
