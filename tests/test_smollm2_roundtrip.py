"""SmolLM2: GGUF -> HF -> GGUF reproduces the original file's tensors byte for byte and talks identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ondevice.cli import main as cli
from ondevice.formats.gguf import GGUFFile

MIXED_TEXT = (
    "<|im_start|>user\nfn main() { println!(\"héllo wörld\"); } // café, naïve, Ünïcödé 😀🚀 東京 ١٢٣ 3.14159e-10"
    "\n\n\t  indented   spaces<|im_end|>\n<|im_start|>assistant\n"
)
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Give me two tips for better sleep.",
    "What is 7 plus 15?",
    "Describe a cat in one sentence.",
]


@pytest.fixture(scope="module")
def round_trip(smollm2, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("roundtrip")
    hf = root / "smol-hf"
    assert cli(["convert", str(smollm2), "--to", "hf", "-o", str(hf), "--no-progress"]) == 0
    again = root / "smol-again.gguf"
    assert cli(["convert", str(hf), "--to", "gguf", "--quant", "q4_1", "-o", str(again), "--no-progress"]) == 0
    return hf, again


def test_every_tensor_byte_identical(smollm2, round_trip):
    _, again = round_trip
    with GGUFFile(smollm2) as a, GGUFFile(again) as b:
        assert set(a.tensors) == set(b.tensors)
        for name, info in a.tensors.items():
            other = b.tensors[name]
            assert (info.shape, info.ggml_type) == (other.shape, other.ggml_type), name
            assert np.array_equal(a.tensor_data(name), b.tensor_data(name)), name
        assert b.get("tokenizer.ggml.pre") == a.get("tokenizer.ggml.pre") == "smollm"
        assert b.get("tokenizer.chat_template") == a.get("tokenizer.chat_template")
        assert b.get("tokenizer.ggml.tokens") == a.get("tokenizer.ggml.tokens")
        assert b.get("tokenizer.ggml.merges") == a.get("tokenizer.ggml.merges")
        assert list(b.get("tokenizer.ggml.token_type")) == list(a.get("tokenizer.ggml.token_type"))


def test_hf_folder_detects_smollm_pre_tokenizer(round_trip):
    from tokenizers import Tokenizer

    from ondevice.tokenizer import detect_pre_tokenizer

    hf, _ = round_trip
    assert detect_pre_tokenizer(Tokenizer.from_file(str(hf / "tokenizer.json"))) == "smollm"


def test_llama_cpp_tokenizes_and_talks_identically(smollm2, round_trip):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, again = round_trip
    results = []
    for path in (smollm2, again):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)
        try:
            ids = llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=True)
            replies = []
            for prompt in CHAT_PROMPTS:
                out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=64,
                                                 temperature=0.0, top_k=1, seed=0)
                replies.append(out["choices"][0]["message"]["content"])
        finally:
            llm.close()
        results.append((ids, replies))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert all(len(r) > 5 for r in results[0][1])
