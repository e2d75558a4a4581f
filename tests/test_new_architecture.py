"""A new architecture is one file plus one registry line: tests/toy_architecture.py, registered here, converts
to every target, and each artifact, run in its own runtime, matches the numpy decoder (ondevice/reference.py, itself
checked against transformers for llama, llama3, qwen2, qwen3 in test_reference_matches_transformers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ondevice.cli import main as cli

TOKENS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "llama3", "qwen3", "gemma3"])
def test_reference_matches_transformers(tiny_models, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from ondevice.reference import reference_logits
    from ondevice.sources import open_source

    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([TOKENS])).logits[0].numpy()
    model = open_source(tiny_models[arch])
    try:
        assert np.abs(reference_logits(model, TOKENS) - want).max() < 1e-4
    finally:
        model.close()


def test_llama3_rope_scaling_changes_the_logits(tiny_models):
    """The llama3 fixture's scaling is not a no-op: dropping its factors moves the logits (so the rows that pass
    with them really test the scaling)."""
    import dataclasses

    from ondevice.reference import reference_logits
    from ondevice.sources import open_source

    model = open_source(tiny_models["llama3"])
    try:
        scaled = reference_logits(model, list(range(3, 200, 4)))
        model.spec = dataclasses.replace(model.spec, rope_freq_factors=None)
        assert np.abs(reference_logits(model, list(range(3, 200, 4))) - scaled).max() > 1e-2
    finally:
        model.close()


@pytest.fixture(scope="module")
def toy(tiny_models, tmp_path_factory) -> Path:
    """An HF folder of the toy architecture: the tiny qwen3 checkpoint plus q/k/v biases, renamed."""
    from safetensors.numpy import load_file, save_file
    from toy_architecture import ToyLM

    from ondevice.architectures import ARCHITECTURES, register_architecture

    if "toylm" not in ARCHITECTURES:
        register_architecture(ToyLM())  # the registry line
    folder = tmp_path_factory.mktemp("toy")
    src = tiny_models["qwen3"]
    for item in src.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    tensors = load_file(src / "model.safetensors")
    rng = np.random.default_rng(7)
    for name in list(tensors):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            rows = tensors[name].shape[0]
            tensors[name.replace(".weight", ".bias")] = (0.1 * rng.standard_normal(rows)).astype(np.float32)
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["ToyLMForCausalLM"], model_type="toylm")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def toy_reference(toy) -> np.ndarray:
    from ondevice.reference import reference_logits
    from ondevice.sources import open_source

    model = open_source(toy)
    try:
        assert model.spec.qkv_bias and model.spec.qk_norm
        return reference_logits(model, TOKENS)
    finally:
        model.close()


def convert(src: Path, out: Path, target: str, quant: str) -> Path:
    extra = ["--pre", "gpt-2"] if target == "gguf" else []  # the tiny tokenizer is no known family's
    assert cli(["convert", str(src), "--to", target, "--quant", quant, "-o", str(out), "--no-progress", *extra]) == 0
    return out


def test_toy_gguf_runs_in_the_runtime(toy, toy_reference, tmp_path):
    import ondevice

    path = convert(toy, tmp_path / "toy.gguf", "gguf", "f32")
    with ondevice.load(path, n_ctx=64, kv_cache="f32") as model:
        assert np.abs(model.logits(TOKENS) - toy_reference).max() < 1e-4


def test_toy_onnx(toy, toy_reference, tmp_path):
    from ondevice.runners.onnx_runner import ONNXRunner

    out = convert(toy, tmp_path / "onnx", "onnx", "f32")
    assert np.abs(ONNXRunner(out, threads=2).logits(TOKENS) - toy_reference).max() < 1e-4


@pytest.mark.slow  # a torch.export + XNNPACK lowering of its own: 20-50 s here
def test_toy_executorch(toy, toy_reference, tmp_path):
    from ondevice.runners.executorch_runner import ExecuTorchRunner

    out = convert(toy, tmp_path / "toy.pte", "executorch", "fp32")
    assert np.abs(ExecuTorchRunner(out).logits(TOKENS) - toy_reference).max() < 1e-4


def test_toy_coreml(toy, toy_reference, tmp_path):
    from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

    out = convert(toy, tmp_path / "toy.mlpackage", "coreml", "fp16")
    got = CoreMLInterpreterRunner(out).logits(TOKENS)
    assert np.abs(got - toy_reference).max() / toy_reference.std() < 0.02  # fp16 weights and state


def test_toy_hf_round_trip(toy, toy_reference, tmp_path):
    from ondevice.reference import reference_logits
    from ondevice.sources import open_source

    out = convert(toy, tmp_path / "hf", "hf", "f32")
    model = open_source(out)
    try:
        np.testing.assert_allclose(reference_logits(model, TOKENS), toy_reference, atol=1e-5)
    finally:
        model.close()


def test_toy_mlx_is_refused_by_name(toy, tmp_path, capsys):
    """mlx-lm has no model of this architecture, so an MLX folder of it would not load: refused, one line."""
    assert cli(["convert", str(toy), "--to", "mlx", "-o", str(tmp_path / "mlx"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert "toylm" in err and "mlx" in err and "\n" not in err
    assert not (tmp_path / "mlx").exists()


def test_a_spec_needing_more_than_a_target_expresses_is_refused_by_feature(tiny_models):
    """Each graph builder states what it expresses (every builder covers every feature today, so the refusal is
    checked on a narrowed list): a spec that needs more is refused in one line naming the features."""
    from ondevice.decoder import require_features
    from ondevice.errors import UnsupportedError
    from ondevice.sources import open_source

    spec = open_source(str(tiny_models["gemma3"])).spec
    with pytest.raises(UnsupportedError) as info:
        require_features(spec, "coreml", ("qk_norm", "norm_offset", "post_norms", "gelu_tanh", "embed_scale"))
    message = str(info.value)
    assert message.startswith("coreml: gemma3 needs") and "sliding-window attention" in message
    assert "a RoPE base of its own" in message and "\n" not in message
