"""ondevice's runtime against the oracles: transformers (tiny models) and llama.cpp (SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ondevice
from ondevice.cli import main as cli
from ondevice.errors import OndeviceError

EVAL_TEXT = Path(ondevice.__file__).parent / "data" / "eval_text.txt"

TOKENS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
    "What is 12 times 13?",
    "Give me a name for a friendly robot.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


def to_gguf(src: Path, out: Path, quant: str, *extra: str) -> Path:
    if not out.exists():
        assert cli(["convert", str(src), "--to", "gguf", "--quant", quant, "-o", str(out), "--no-progress",
                    *extra]) == 0
    return out


@pytest.fixture(scope="module")
def smol_variants(smollm2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smol")
    out = {"q4_1": smollm2}
    for quant in ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "iq4_xs"):
        out[quant] = to_gguf(smollm2, root / f"smol-{quant}.gguf", quant)
    return out


def hf_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "llama3", "qwen3", "gemma3"])
def test_tiny_f32_logits_match_transformers(tiny_models, tmp_path, arch):
    path = to_gguf(tiny_models[arch], tmp_path / "m.gguf", "f32", "--pre", "gpt-2")
    ref = hf_logits(tiny_models[arch], TOKENS)
    with ondevice.load(path, n_ctx=64, kv_cache="f32") as model:  # f16 would round K/V: ~1e-3, not 1e-4
        got = model.logits(TOKENS)
        assert np.abs(got - ref).max() < 1e-4
        # Incremental decoding through the KV cache gives the same last-position logits.
        model.reset()
        model._eval(TOKENS[:5])
        for token in TOKENS[5:]:
            step = model._step(token)
        assert np.abs(step - ref[-1]).max() < 1e-4


def llama_cpp_model(path: Path, n_ctx: int = 512, logits_all: bool = False):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=logits_all, verbose=False)


def test_tokenizer_matches_llama_cpp(smollm2):
    text = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\ndef f(x):\n    return x**2  # 😀 "
            "café naïve Ünïcödé 東京 1234567 \t\t  spaces   \n\n<|im_end|>\n<|im_start|>assistant\n")
    llm = llama_cpp_model(smollm2)
    try:
        want = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    with ondevice.load(smollm2, n_ctx=64) as model:
        assert model.tokenize(text) == want


# The oracle is transformers in float64 on the file's own weights, dequantized (`convert --to hf`): the exact
# evaluation that both runtimes approximate by quantizing activations to 8 bits (ondevice the same way as llama.cpp,
# but float sums in a different order, and an 8-bit rounding that flips amplifies through 30 layers). Measured on
# SmolLM2, RMS logit error / logit std per position, mean: Q4_1 ondevice 0.069, llama.cpp 0.069; Q4_K_M 0.119 and
# 0.109. llama.cpp moves by 0.04-0.09 between its own batched and token-by-token paths, so the two runtimes differ
# from each other by about sqrt(2) x their error (0.08-0.13). Tolerance: ondevice's error at most 1.25 x
# llama.cpp's + 0.01, the 95th percentile of positions at most 1.5 x llama.cpp's + 0.05 (not the single worst
# position: one flip in the shared chat prefix sets it, e.g. 0.37 or 0.24 for the same Q4_1 file on the AVX-512 and
# AVX2 paths, whose eval KL is 0.0054 and 0.0060); ondevice vs llama.cpp mean < 0.2 and top-1 agreement >= 90%.
@pytest.mark.parametrize("quant", ["q4_1", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "iq4_xs"])
def test_smollm2_logits_as_close_to_exact_as_llama_cpp(smol_variants, tmp_path, quant):
    path = smol_variants[quant]
    with ondevice.load(path, n_ctx=256) as model:
        # a chat prompt, then prose: 200 positions, so that one rounding flip early on (which 30 layers carry
        # along a shared prefix) does not decide the statistics
        tokens = model.prompt_tokens([{"role": "user", "content": PROMPTS[2]}])
        tokens = (tokens + model.tokenize(EVAL_TEXT.read_text(encoding="utf-8")[:2000]))[:200]
        ours = model.logits(tokens)
    assert_as_close_to_exact_as_llama_cpp(f"SmolLM2 {quant}", path, tokens, ours, tmp_path / "hf", n_ctx=256)


def logit_error(logits: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """RMS logit error per position over the reference's logit std."""
    return np.sqrt(((logits - ref) ** 2).mean(axis=-1)) / ref.std(axis=-1)


def assert_as_close_to_exact_as_llama_cpp(label: str, path: Path, tokens: list[int], ours: np.ndarray,
                                          hf_folder: Path, n_ctx: int = 128) -> None:
    """The rule above: ondevice's logits of `tokens` against llama.cpp's and the float64 oracle's (the file's
    weights dequantized to an f32 HF folder, run by transformers in float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = llama_cpp_model(path, n_ctx=n_ctx, logits_all=True)
    try:
        llm.eval(tokens)
        theirs = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    assert cli(["convert", str(path), "--to", "hf", "--quant", "f32", "-o", str(hf_folder), "--no-progress"]) == 0
    exact_model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float64).eval()
    with torch.no_grad():
        exact = exact_model(torch.tensor([tokens])).logits[0].numpy()
    ours_err, theirs_err, between = logit_error(ours, exact), logit_error(theirs, exact), logit_error(ours, theirs)
    ours_p95, theirs_p95 = np.percentile(ours_err, 95), np.percentile(theirs_err, 95)
    print(f"\n{label}: error vs exact ondevice {ours_err.mean():.4f} (p95 {ours_p95:.4f}, max {ours_err.max():.4f}), "
          f"llama.cpp {theirs_err.mean():.4f} (p95 {theirs_p95:.4f}, max {theirs_err.max():.4f}); "
          f"between {between.mean():.4f}")
    assert ours_err.mean() <= 1.25 * theirs_err.mean() + 0.01
    assert ours_p95 <= 1.5 * theirs_p95 + 0.05
    assert between.mean() < 0.2
    # Top-1 agreement with llama.cpp >= 90%, or, where llama.cpp's own error splits the two (SmolLM2 iq4_xs: 87.5%
    # between the runtimes, top-1 vs exact ondevice 95%, llama.cpp 92.5%), ondevice's top-1 at least as often exact.
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    exact_top1 = exact.argmax(-1)
    assert top1 >= 0.9 or (ours.argmax(-1) == exact_top1).mean() >= (theirs.argmax(-1) == exact_top1).mean(), top1


GEMMA_TEXT = ("Gemma's café in 東京 sells crème brûlée 😀 for 4.50€.\n\n    def f(x):\n\treturn x ** 2  # "
              "tabs\tand   runs of spaces\nThe capital of France is")


@pytest.mark.slow
def test_gemma3_270m_logits_as_close_to_exact_as_llama_cpp(gemma_path, tmp_path):
    """The real Gemma 3 270M (Q4_K_M) by the SmolLM2 rule above: same token ids as llama.cpp on a mixed text,
    logits vs transformers float64 on the file's own weights as close as llama.cpp's (measured: mean error
    ondevice 0.065, llama.cpp 0.068; worst position 0.18 and 0.17)."""
    with ondevice.load(gemma_path, n_ctx=128) as model:
        tokens = model.tokenize(GEMMA_TEXT)
        ours = model.logits(tokens)
    llm = llama_cpp_model(gemma_path, n_ctx=128)
    try:
        assert llm.tokenize(GEMMA_TEXT.encode(), add_bos=True, special=True) == tokens
    finally:
        llm.close()
    assert_as_close_to_exact_as_llama_cpp("Gemma 3 270M", gemma_path, tokens, ours, tmp_path / "hf")


def _greedy_llama_cpp(llm, tokens: list[int], n: int, eos: set[int]) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token in eos or len(out) >= n:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("quant", ["q4_1", "q8_0", "q4_0", "q4_k_m"])
def test_greedy_replies_identical_to_llama_cpp(smol_variants, quant):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = smol_variants[quant]
    llm = llama_cpp_model(path)
    report = []
    try:
        with ondevice.load(path, n_ctx=512) as model:
            eos = model.codec.eos_ids
            for prompt in PROMPTS:
                tokens = model.prompt_tokens([{"role": "user", "content": prompt}])
                list(model.generate([{"role": "user", "content": prompt}], max_tokens=64, temperature=0,
                                    repeat_penalty=1.0))  # plain argmax, as llama.cpp's run here
                ours = [t for t in model.last_stats.tokens if t not in eos]
                theirs = _greedy_llama_cpp(llm, tokens, 64, eos)
                if ours != theirs:
                    # A divergence is acceptable only at a near-tie of the top two logits in the reference.
                    at = next(i for i, (a, b) in enumerate(zip(ours + [-1], theirs + [-1], strict=False)) if a != b)
                    seq = tokens + theirs[:at]
                    logits = model.logits(seq)[-1]
                    llm.reset()
                    llm.eval(seq)
                    reference = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                      shape=(llm.n_vocab(),)).copy()
                    ours_choice = ours[at] if at < len(ours) else int(np.argmax(logits))
                    theirs_choice = theirs[at] if at < len(theirs) else int(np.argmax(reference))
                    # the margin each runtime gave its own choice over the other's, relative to the logits' spread
                    our_margin = float(logits[ours_choice] - logits[theirs_choice]) / float(logits.std())
                    their_margin = float(reference[theirs_choice] - reference[ours_choice]) / float(reference.std())
                    spread = float(np.sqrt(np.mean((logits - reference) ** 2)) / logits.std())
                    report.append((prompt, at, round(our_margin, 3), round(their_margin, 3), round(spread, 3)))
                    assert max(our_margin, their_margin) < 0.2, f"{prompt!r}: diverged at {at} without a tie"
    finally:
        llm.close()
    # Divergences are allowed only at near-ties: in BOTH runtimes the margin between the two candidates is under
    # 20% of the logits' std, about twice the RMS difference between the runtimes' logits at such positions (3-18%
    # of the std against an AVX-512 build of llama.cpp, whose kernels round differently from an AVX2 build's ~8%).
    # Printed for the record: (prompt, position, our margin, llama.cpp's margin, RMS difference), in stds.
    print(f"{quant}: {len(report)} of {len(PROMPTS)} replies diverged, each at a near-tie: {report}")


def test_streaming_is_utf8_safe_and_stops(smollm2):
    with ondevice.load(smollm2, n_ctx=256) as model:
        messages = [{"role": "user", "content": "Write three emoji and the word café."}]
        pieces = list(model.generate(messages, max_tokens=40, temperature=0))
        ids = [t for t in model.last_stats.tokens if t not in model.codec.eos_ids]
        assert "".join(pieces) == model.detokenize(ids)
        if "\ufffd" not in "".join(pieces):  # the model may itself emit invalid bytes; never split a character
            assert all("\ufffd" not in p for p in pieces)
        full = "".join(pieces)
        if len(full) > 10:
            stop = full[5:9]
            cut = "".join(model.generate(messages, max_tokens=40, temperature=0, stop=[stop]))
            assert cut == full[: full.find(stop)]
            assert model.last_stats.finish_reason == "stop"


def test_stream_decoder_never_splits_a_character(smollm2):
    from ondevice.runtime.text import StreamDecoder

    with ondevice.load(smollm2, n_ctx=64) as model:
        text = "😀 東京 café ١٢٣ 🚀🚀"
        ids = model.tokenize(text)
        decoder = StreamDecoder(model.codec)
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text
        assert len([p for p in pieces if p]) > 3  # it did stream, not buffer everything


def test_kv_cache_reuse_across_turns(smollm2):
    """A follow-up turn evaluates only the new tokens, and its logits match a fresh evaluation of the whole text.

    (The greedy text itself may differ at a near-tie: the cached path computed the old tokens with the batched
    prefill kernels and the new ones separately, which rounds differently from one batched pass.)"""
    with ondevice.load(smollm2, n_ctx=512) as model:
        messages = [{"role": "user", "content": "Name a color."}]
        reply = model.chat(messages, max_tokens=16, temperature=0)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And another one?"}]
        tokens = model.prompt_tokens(messages)
        cached_logits, cached = model._eval(tokens)
        assert cached > 10
        fresh_logits = model.logits(tokens)[-1]
    rms = np.sqrt(((cached_logits - fresh_logits) ** 2).mean()) / fresh_logits.std()
    assert rms < 0.05 and cached_logits.argmax() == fresh_logits.argmax()


def test_context_overflow_is_a_clear_error(smollm2):
    with ondevice.load(smollm2, n_ctx=32) as model:
        with pytest.raises(OndeviceError, match="context window"):
            list(model.generate("word " * 100, max_tokens=4))
        # Generation that reaches the window stops with finish_reason "context", never garbage.
        list(model.generate("Hello", max_tokens=100, temperature=0))
        assert model.last_stats.finish_reason in ("context", "stop")


def test_cli_run_json(smollm2, capsys):
    assert cli(["run", str(smollm2), "-p", "Say hi.", "-n", "8", "--temp", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["generated_tokens"] >= 1 and data["text"]
    assert data["peak_rss_mib"] > 0


def test_load_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(OndeviceError):
        ondevice.load(bad)


def test_generate_with_json_schema_always_validates(smollm2):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    with ondevice.load(smollm2, n_ctx=512) as model:
        for seed in range(3):
            text = "".join(model.generate([{"role": "user", "content": "Invent a person."}], json_schema=schema,
                                          max_tokens=60, temperature=1.0, seed=seed))
            jsonschema.validate(json.loads(text), schema)
