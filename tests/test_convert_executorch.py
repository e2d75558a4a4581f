"""--to executorch: the .pte runs in executorch.runtime and matches transformers' forward pass (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch")
pytest.importorskip("torchao")


from ondevice.errors import UnsupportedError  # noqa: E402

TOKENS = [3, 17, 42, 5, 99, 12, 7, 64, 33, 21]


def transformers_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def transformers_greedy(folder: Path, tokens: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(tokens):].tolist()


def export(folder: Path, out: Path, quant: str, **extra: object) -> dict:
    from ondevice.converters import executorch

    from ondevice.sources import open_source

    options = executorch.ExecuTorchOptions(quant=quant, progress=False, **extra)
    model = open_source(str(folder))
    try:
        return executorch.convert(model, out, options).to_json()
    finally:
        model.close()


@pytest.fixture(scope="module")
def llama_fp32(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("et") / "llama-fp32.pte"
    export(tiny_models["llama"], out, "fp32")
    return out


@pytest.fixture(scope="module")
def qwen2_8da4w(tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("et") / "qwen2-8da4w.pte"
    return out, export(tiny_models["qwen2"], out, "8da4w")


def test_fp32_pte_matches_transformers_prefill_and_decode(tiny_models, llama_fp32):
    from ondevice.runners.executorch_runner import ExecuTorchRunner

    ref = transformers_logits(tiny_models["llama"], TOKENS)
    runner = ExecuTorchRunner(llama_fp32)
    prefill = runner.logits(TOKENS)
    np.testing.assert_allclose(prefill, ref, atol=1e-4, rtol=1e-4)
    # Prefill part, then one token at a time through the static cache.
    runner.reset()
    steps = [runner.forward(TOKENS[:4])] + [runner.forward([t]) for t in TOKENS[4:]]
    np.testing.assert_allclose(np.concatenate(steps), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # a torch.export + XNNPACK lowering of its own: 20-50 s here
@pytest.mark.parametrize("arch", ["llama3", "qwen3", "gemma3"])
def test_fp32_pte_of_each_architecture_matches_transformers(tiny_models, tmp_path, arch):
    """The breadth row: every architecture's decoder features (llama3 RoPE scaling, qwen3 q/k norm and head dim,
    gemma3's sliding windows, sandwich norms and GELU) built by the one decoder in torch, run by ExecuTorch."""
    from ondevice.runners.executorch_runner import ExecuTorchRunner

    out = tmp_path / f"{arch}.pte"
    export(tiny_models[arch], out, "fp32", max_seq_len=64)
    runner = ExecuTorchRunner(out)
    ref = transformers_logits(tiny_models[arch], TOKENS)
    np.testing.assert_allclose(runner.logits(TOKENS), ref, atol=1e-4, rtol=1e-4)
    # token by token too: gemma3's window of 4 then masks cache rows at every start > 0
    runner.reset()
    steps = [runner.forward(TOKENS[:3])] + [runner.forward([t]) for t in TOKENS[3:]]
    np.testing.assert_allclose(np.concatenate(steps), ref, atol=1e-4, rtol=1e-4)


def test_fp32_pte_greedy_matches_transformers(tiny_models, llama_fp32):
    from ondevice.runners.executorch_runner import ExecuTorchRunner

    runner = ExecuTorchRunner(llama_fp32)
    assert runner.greedy(TOKENS, 12) == transformers_greedy(tiny_models["llama"], TOKENS, 12)
    # Transformer-like entry point for ondevice's generate loop: last-token logits by default.
    last = runner.transformer.forward(np.asarray(TOKENS), 0)
    assert last.shape == (runner.vocab_size,)


def test_manifest_beside_pte(tiny_models, llama_fp32):
    manifest = json.loads(llama_fp32.with_suffix(".json").read_text())
    assert manifest["program"] == llama_fp32.name
    assert manifest["chat_template"] and "<|im_start|>" in manifest["chat_template"]
    assert manifest["special"]["eos_ids"]
    assert llama_fp32.with_suffix(".tokenizer.json").is_file()
    assert not list(llama_fp32.parent.glob("*.partial"))


@pytest.mark.slow  # a torch.export + XNNPACK lowering of its own: 20-50 s here
def test_8da4w_every_linear_quantized_and_close(tiny_models, qwen2_8da4w):
    from ondevice.runners.executorch_runner import ExecuTorchRunner

    out, result = qwen2_8da4w
    manifest = json.loads(out.with_suffix(".json").read_text())
    layers = manifest["layers"]
    n_linear = 2 * 7 + 1  # 7 per block, 2 blocks, plus lm_head
    assert sum(1 for scheme in layers.values() if scheme == "8da4w-g32-asym") == n_linear
    assert layers["embed_tokens"] == "int8-per-row"
    ref = transformers_logits(tiny_models["qwen2"], TOKENS)
    got = ExecuTorchRunner(out).logits(TOKENS)
    # int4 weights of a width-64 random model: RMS logit error under 35% of the logits' spread (measured ~0.2).
    rel = np.sqrt(np.mean((got - ref) ** 2)) / ref.std()
    assert rel < 0.35, rel
    assert result["size_bytes"] == out.stat().st_size


@pytest.mark.slow  # a torch.export + XNNPACK lowering of its own: 20-50 s here
def test_8da4w_awq_runs_in_executorch(tiny_models, qwen2_8da4w, tmp_path):
    """--method awq: the module is built from the folded norms, matrices and v biases (the folding is exact in float:
    tests/test_quant_calibrated.py), rounded on the same Q4_1 grid; executorch runs it as close to the float model as
    plain 8da4w (random weights have no outlier channels for the scales to win on)."""
    from ondevice.runners.executorch_runner import ExecuTorchRunner

    out = tmp_path / "awq.pte"
    result = export(tiny_models["qwen2"], out, "8da4w", method="awq", calibration_chunks=1)
    assert any(note.startswith("awq: scales folded") for note in result["notes"])
    ref = transformers_logits(tiny_models["qwen2"], TOKENS)
    rms = {name: float(np.sqrt(np.mean((ExecuTorchRunner(path).logits(TOKENS) - ref) ** 2)))
           for name, path in (("awq", out), ("plain", qwen2_8da4w[0]))}
    assert rms["awq"] < 1.25 * rms["plain"], rms


def test_awq_options_are_one_line_errors(tiny_models, tmp_path):
    for extra, message in (({"method": "gptq"}, "choose one of awq"),
                           ({"method": "awq", "group_size": 64}, "8da4w in groups of 32"),
                           ({"calibration_chunks": 2}, "needs --method awq")):
        with pytest.raises(UnsupportedError, match=message):
            export(tiny_models["llama"], tmp_path / "x.pte", "8da4w", **extra)
    with pytest.raises(UnsupportedError, match="8da4w in groups of 32"):
        export(tiny_models["llama"], tmp_path / "x.pte", "int8", method="awq")
    assert not list(tmp_path.iterdir())


def test_group_size_that_does_not_divide_is_refused(tiny_models, tmp_path):
    with pytest.raises(UnsupportedError, match="does not divide"):
        export(tiny_models["llama"], tmp_path / "x.pte", "8da4w", group_size=128)
    assert not list(tmp_path.iterdir())


def test_ondevice_load_runs_pte_in_the_generate_loop(tiny_models, llama_fp32):
    """`ondevice.load("model.pte")` gives the same API as the native runtime, logits and all."""
    import ondevice

    tokens = [5, 17, 42, 99, 3, 250, 7]
    ref = transformers_logits(tiny_models["llama"], tokens)
    with ondevice.load(llama_fp32, n_ctx=64) as model:
        assert np.abs(model.logits(tokens) - ref).max() < 1e-4
        pieces = list(model.generate("hello", max_tokens=8, temperature=0))
        assert model.last_stats.generated_tokens >= 1 and isinstance("".join(pieces), str)


def test_bench_measures_pte_with_the_executorch_backend(llama_fp32, tmp_path, capsys):
    from ondevice.cli import main as cli

    assert cli(["bench", str(llama_fp32), "--backend", "executorch", "--prompt", "16", "--gen", "8", "--threads", "1",
                "--repeat", "1", "--warmup", "0", "--db", str(tmp_path / "b.db"), "--json"]) == 0
    measurement = json.loads(capsys.readouterr().out)["measurements"][0]
    assert measurement["status"] == "ok" and measurement["artifact_kind"] == "pte"
    assert measurement["decode_tok_s"] > 0 and measurement["prefill_tok_s"] > 0


@pytest.mark.slow  # a torch.export + XNNPACK lowering of its own: 20-50 s here
def test_8da4w_from_a_q4_1_gguf_keeps_its_asymmetric_grid(tiny_models, tmp_path):
    """Q4_1's d * code + m as 8da4w's symmetric int4 d * (code - 8) plus a float offset per block: on the GGUF's
    own weights only the int8 activations and the output layer (Q8_0 in the file) are left as error."""
    from ondevice.converters.executorch import AsymmetricInt4

    from ondevice.cli import main as cli
    from ondevice.runners.executorch_runner import ExecuTorchRunner
    from ondevice.sources import open_source

    gguf = tmp_path / "q4_1.gguf"
    assert cli(["convert", str(tiny_models["qwen2"]), "--to", "gguf", "--quant", "q4_1", "-o", str(gguf),
                "--pre", "gpt-2", "--no-progress"]) == 0
    source = open_source(str(gguf))
    try:  # the split is exact on the file's own grid
        weight = source.tensors["model.layers.0.mlp.down_proj.weight"].load()
        symmetric, offsets = AsymmetricInt4.split(weight)
        rebuilt = (symmetric.reshape(*offsets.shape, 32) + offsets[..., None]).reshape(weight.shape)
        assert np.abs(rebuilt - weight).max() <= 1e-6 * np.abs(weight).max()
        blocks = symmetric.reshape(*offsets.shape, 32)  # codes -8..7 times one scale: -8 d is the block's minimum
        scale = -blocks.min(-1, keepdims=True) / 8
        assert np.array_equal(blocks / scale, np.round(blocks / scale)) and (np.abs(blocks / scale) <= 8).all()
    finally:
        source.close()
    exact = tmp_path / "exact-hf"
    assert cli(["convert", str(gguf), "--to", "hf", "-o", str(exact), "--no-progress"]) == 0
    out = tmp_path / "m.pte"
    export(gguf, out, "8da4w")
    assert set(json.loads(out.with_suffix(".json").read_text())["layers"].values()) == {"8da4w-g32-asym",
                                                                                        "int8-per-row"}
    ref = transformers_logits(exact, TOKENS)
    got = ExecuTorchRunner(out).logits(TOKENS)
    # measured 0.075 (symmetric int4 in groups of 64 on the same file: 0.25; int8 weights: 0.023)
    assert np.sqrt(np.mean((got - ref) ** 2)) / ref.std() < 0.15
