"""A Llama-3.2-1B-shaped model with seeded random weights, the 1B-class speed fixture (issue 17).

    python benchmarks/make_1b_model.py [--work DIR] [--json]

Builds it from a transformers LlamaConfig (hidden 2048, FFN 8192, 16 layers, 32 heads, 8 KV heads, vocab 49152 so
SmolLM2's tokenizer fits; no download), writes it as a Hugging Face folder in bf16 with SmolLM2's tokenizer (taken
from the bundled SmolLM2 GGUF by `ondevice convert --to hf`), then converts it with `ondevice convert` to q4_0 and
q4_k_m GGUF. Every output is cached under --work and skipped when present.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SEED = 1234
CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
              rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
QUANTS = ("q4_0", "q4_k_m")


def convert(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "ondevice", "convert", *args], check=True)


def smollm2_tokenizer(work: Path) -> Path:
    """SmolLM2's tokenizer files, from the bundled GGUF converted to an HF folder once."""
    from ondevice.hub import DEFAULT_MODEL, pull

    folder = work / "smollm2-hf"
    if not (folder / "tokenizer.json").exists():
        convert([str(pull(DEFAULT_MODEL)), "--to", "hf", "--quant", "bf16", "-o", str(folder), "--no-progress"])
    return folder


def write_hf_model(folder: Path, tokenizer_folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(**CONFIG, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config)  # transformers' own init: normal(0, 0.02) linears, ones for norms
    model = model.to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True, max_shard_size="8GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).exists() and name != "generation_config.json":
            shutil.copy(tokenizer_folder / name, partial / name)
    partial.rename(folder)  # the folder appears whole or not at all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ondevice-1b"), help="cache folder for the outputs")
    parser.add_argument("--json", action="store_true", help="print the output paths and sizes as JSON")
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "llama-1b-random-hf-bf16"
    timings: dict[str, float] = {}
    if not (hf / "config.json").exists():
        t = time.perf_counter()
        write_hf_model(hf, smollm2_tokenizer(work))
        timings["hf"] = time.perf_counter() - t
    outputs = {"hf": str(hf)}
    for quant in QUANTS:
        out = work / f"llama-1b-random-{quant}.gguf"
        if not out.exists():
            t = time.perf_counter()
            convert([str(hf), "--to", "gguf", "--quant", quant, "-o", str(out), "--pre", "smollm", "--no-progress"])
            timings[quant] = time.perf_counter() - t
        outputs[quant] = str(out)
    sizes = {key: Path(path).stat().st_size for key, path in outputs.items() if key in QUANTS}
    if args.json:
        print(json.dumps({"outputs": outputs, "sizes": sizes, "seconds": timings}, indent=2))
    else:
        for key, path in outputs.items():
            size = f" ({sizes[key] / 1e6:.0f} MB)" if key in sizes else ""
            made = f", made in {timings[key]:.0f} s" if key in timings else ", cached"
            print(f"{key}: {path}{size}{made}")


if __name__ == "__main__":
    main()
