"""HF -> GGUF conversion checked in llama.cpp (llama-cpp-python) against transformers' forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ondevice.cli import main as cli

TOKENS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]


def convert(src: Path, out: Path, quant: str, *extra: str) -> dict:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli(["convert", str(src), "--to", "gguf", "--quant", quant, "-o", str(out), "--json", *extra])
    assert code == 0
    return json.loads(buf.getvalue())


def transformers_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # f32 KV cache: llama.cpp defaults to f16, which alone costs ~2e-3 of logit precision.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, type_k=0,
                          type_v=0)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "llama3", "qwen3", "gemma3"])
def test_tiny_f32_gguf_matches_transformers(tiny_models, tmp_path, arch):
    out = tmp_path / "model.gguf"
    result = convert(tiny_models[arch], out, "f32", "--pre", "gpt-2")
    assert result["tensor_types"] == {"f32": result["tensor_types"]["f32"]}
    ref = transformers_logits(tiny_models[arch], TOKENS)
    got = llama_cpp_logits(out, TOKENS)
    assert got.shape == ref.shape
    # llama.cpp computes GELU from a table of fp16 inputs and outputs: measured 9.6e-3 on gemma3 (2.6e-4 against
    # the numpy decoder with that rounding emulated), 1e-4-ish elsewhere
    assert np.abs(got - ref).max() < (2e-2 if arch == "gemma3" else 1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# Bounds on the RMS logit error relative to the logits' spread, for a tiny random model (width 64, the worst case
# for block quantization); measured here: f16 0.001, q8_0 0.023, q5 0.13-0.14, q4_k_m 0.13, q4 0.26-0.28.
@pytest.mark.parametrize("quant,bound", [("f16", 0.005), ("q8_0", 0.05), ("q4_0", 0.4), ("q4_1", 0.4), ("q5_0", 0.25),
                                         ("q5_1", 0.25), ("q4_k_m", 0.25)])
def test_tiny_quantized_gguf_loads_and_tracks_reference(tiny_models, tmp_path, quant, bound):
    out = tmp_path / f"model-{quant}.gguf"
    convert(tiny_models["qwen2"], out, quant, "--pre", "gpt-2")
    ref = transformers_logits(tiny_models["qwen2"], TOKENS)
    got = llama_cpp_logits(out, TOKENS)
    rel_rms = np.sqrt(np.mean((got - ref) ** 2)) / ref.std()
    assert rel_rms < bound


def test_gguf_to_hf_loads_in_transformers(tiny_models, tmp_path):
    gguf = tmp_path / "m.gguf"
    convert(tiny_models["llama"], gguf, "f32", "--pre", "gpt-2")
    hf = tmp_path / "hf"
    assert cli(["convert", str(gguf), "--to", "hf", "-o", str(hf), "--no-progress"]) == 0
    ref = transformers_logits(tiny_models["llama"], TOKENS)
    got = transformers_logits(hf, TOKENS)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    from tokenizers import Tokenizer

    a = Tokenizer.from_file(str(tiny_models["llama"] / "tokenizer.json"))
    b = Tokenizer.from_file(str(hf / "tokenizer.json"))
    text = "Hello wörld! <|im_start|>user\nhi<|im_end|> 12345 code()"
    assert a.encode(text).ids == b.encode(text).ids
    assert (hf / "chat_template.jinja").read_text() == json.loads(
        (tiny_models["llama"] / "tokenizer_config.json").read_text())["chat_template"]
