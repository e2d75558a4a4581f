"""`--to mlx`: folders that mlx_lm.load runs, checked in mlx itself (its CPU backend) against transformers.

Tolerances (logits of the tiny models have a standard deviation of ~0.85):
- f16: max |mlx - transformers| <= 0.03 (mlx computes in float16 here); bf16: <= 0.15.
- int4/int8: the same f16 tolerance against transformers run with the dequantized weights (so the test checks
  that mlx reads our codes, scales and biases as we wrote them); the quantization error itself is bounded by the
  mx.quantize bit-identity tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from ondevice.converters import mlx as mlx_target  # noqa: E402

from ondevice.errors import OutputExistsError, UnsupportedError  # noqa: E402
from ondevice.formats.safetensors import SafetensorsFile  # noqa: E402
from ondevice.sources import open_source  # noqa: E402

TOKENS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]
F16_TOL = 0.03
BF16_TOL = 0.15


def convert(src: Path, out: Path, quant: str, group_size: int | None = None, force: bool = False):
    model = open_source(src)
    try:
        return mlx_target.convert(model, out, mlx_target.MLXOptions(quant=quant, force=force, progress=False,
                                                                   group_size=group_size))
    finally:
        model.close()


def runner(folder: Path, compute_dtype: str | None = None):
    from ondevice.runners.mlx_runner import MLXRunner

    return MLXRunner(folder, compute_dtype=compute_dtype)


def hf_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def load_dequantized_into(model, folder: Path) -> None:
    """Replace the transformers model's weights with what the MLX folder stores (dequantized, f16-rounded)."""
    import torch

    config = json.loads((folder / "config.json").read_text())
    bits = config["quantization"]["bits"]
    st = SafetensorsFile(folder / "model.safetensors")
    try:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in params.items():
                module = name.removesuffix(".weight")
                if f"{module}.scales" in st.tensors:
                    w = mlx_target.affine_dequantize(st.raw(f"{module}.weight"), st.raw(f"{module}.scales"),
                                                     st.raw(f"{module}.biases"), bits)
                elif name in st.tensors:
                    w = st.load_f32(name)
                else:  # tied output layer: the embedding
                    continue
                param.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    finally:
        st.close()


# ---------------------------------------------------------------------------------------------- bit identity
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_affine_quantize_is_bit_identical_to_mx_quantize(bits, group, dtype):
    rng = np.random.default_rng(bits * 1000 + group)
    w = (rng.standard_normal((48, 512)) * 0.05).astype(dtype)
    w[0, :group] = 0.0  # a constant group (zero range)
    w[1, :group] = np.abs(w[1, :group])  # all positive: the max is the edge
    w[2, :group] = -np.abs(w[2, :group])  # all negative: the min is the edge
    w[3, :group] = np.linspace(-1, 1, group)  # codes landing on exact halves
    w[4] *= 100.0  # a large-magnitude row
    packed, scales, biases = mlx_target.affine_quantize(w, group, bits)
    ref_packed, ref_scales, ref_biases = (np.array(a) for a in mx.quantize(mx.array(w), group_size=group, bits=bits))
    assert packed.dtype == np.uint32 and packed.shape == ref_packed.shape
    np.testing.assert_array_equal(packed, ref_packed)
    assert scales.dtype == ref_scales.dtype and biases.dtype == ref_biases.dtype
    np.testing.assert_array_equal(scales.view(np.uint8), ref_scales.view(np.uint8))
    np.testing.assert_array_equal(biases.view(np.uint8), ref_biases.view(np.uint8))
    # and mlx reads them back as we do
    back = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=group,
                                  bits=bits).astype(mx.float32))
    np.testing.assert_allclose(mlx_target.affine_dequantize(packed, scales, biases, bits), back, rtol=1e-3,
                               atol=1e-3 * float(np.abs(w).max()))


def assert_folder_matches_mx_quantize(folder: Path, source: Path) -> int:
    """Every quantized layer in the folder equals mx.quantize of the source weight cast to float16."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config["quantization"]
    model = open_source(source)
    st = SafetensorsFile(folder / "model.safetensors")
    checked = 0
    try:
        for name, tensor in model.tensors.items():
            module = name.removesuffix(".weight")
            if f"{module}.scales" not in st.tensors:
                continue
            entry = quantization.get(module) or quantization
            w16 = mx.array(tensor.load().astype(np.float16))
            ref = mx.quantize(w16, group_size=entry["group_size"], bits=entry["bits"])
            for suffix, expected in zip(("weight", "scales", "biases"), ref, strict=True):
                np.testing.assert_array_equal(st.raw(f"{module}.{suffix}"), np.array(expected),
                                              err_msg=f"{module}.{suffix}")
            checked += 1
    finally:
        st.close()
        model.close()
    return checked


# ---------------------------------------------------------------------------------------------- tiny models
def compute_dtype(arch: str) -> str | None:
    """mlx computes in the weights' dtype: gemma3's six sandwich-normed layers drift by 0.1 in float16, so its rows
    check the artifact with float32 arithmetic (1.3e-5 from transformers on the same f16 weights)."""
    return "float32" if arch == "gemma3" else None


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "llama3", "qwen3"])
def test_tiny_float_artifacts_match_transformers(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    reference = hf_model(src)
    ref = hf_logits(reference, TOKENS)
    for quant, tol in (("f16", F16_TOL), ("bf16", BF16_TOL)):
        out = tmp_path / quant
        result = convert(src, out, quant)
        assert result.tensor_types == {quant: len(open_source(src).tensors)}
        got = runner(out, compute_dtype(arch)).logits(TOKENS)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= tol, quant
        assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("quant", ["f16", "bf16"])
def test_tiny_gemma3_float_artifacts_run_as_written(tiny_models, tmp_path, quant):
    """gemma3 (6 sandwich-normed layers, scaled embeddings) is checked against transformers holding the very weights
    the folder stores, with float32 arithmetic in mlx (compute_dtype): weight rounding alone moves its logits by
    0.04 (f16) and 0.4 (bf16), more than the other rows' bounds, which measure the rounding, not the artifact."""
    import torch

    src = tiny_models["gemma3"]
    out = tmp_path / quant
    convert(src, out, quant)
    reference = hf_model(src)
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[quant]
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(dtype).float())
    got = runner(out, "float32").logits(TOKENS)
    assert np.abs(got - hf_logits(reference, TOKENS)).max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2"])
def test_tiny_f16_greedy_continuation_is_identical(tiny_models, tmp_path, arch):
    import torch

    src = tiny_models[arch]
    convert(src, tmp_path / "m", "f16")
    prompt = TOKENS[:8]
    with torch.no_grad():
        expected = hf_model(src).generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                          do_sample=False)[0, len(prompt):].tolist()
    assert runner(tmp_path / "m").greedy(prompt, 32) == expected


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "llama3", "qwen3", "gemma3"])
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_tiny_quantized_artifacts_run_as_written(tiny_models, tmp_path, arch, quant):
    src = tiny_models[arch]
    out = tmp_path / quant
    result = convert(src, out, quant)
    assert not result.fallbacks
    assert result.notes and "group 64" in result.notes[0]
    assert assert_folder_matches_mx_quantize(out, src) == result.tensor_types[f"{quant}-g64"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4 if quant == "int4" else 8, "mode": "affine"}
    reference = hf_model(src)
    load_dequantized_into(reference, out)
    got = runner(out, compute_dtype(arch)).logits(TOKENS)
    assert np.abs(got - hf_logits(reference, TOKENS)).max() <= F16_TOL
    if arch == "gemma3":  # random 6-layer weights with 8x-scaled embeddings: no meaningful quantization bound
        return
    # quantization error stays small against the original float model too (int8 much smaller than int4)
    ref = hf_logits(hf_model(src), TOKENS)
    bound = {"int4": 2.5, "int8": 0.15}[quant]
    assert np.abs(got - ref).max() / ref.std() < bound


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_tensors_identical_to_mlx_lm_convert(tiny_models, tmp_path, arch, bits):
    """The same safetensors tensors, byte for byte, as `mlx_lm.convert --dtype float16 -q --q-bits B`."""
    from mlx_lm import convert as mlx_lm_convert

    src = tiny_models[arch]
    theirs = tmp_path / "theirs"
    mlx_lm_convert(str(src), str(theirs), quantize=True, q_group_size=64, q_bits=bits, dtype="float16")
    ours = tmp_path / "ours"
    convert(src, ours, f"int{bits}")
    a, b = SafetensorsFile(ours / "model.safetensors"), SafetensorsFile(theirs / "model.safetensors")
    try:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert a.tensors[name].dtype == b.tensors[name].dtype, name
            np.testing.assert_array_equal(a.raw(name), b.raw(name), err_msg=name)
        assert a.metadata == b.metadata == {"format": "mlx"}
    finally:
        a.close()
        b.close()
    config, their_config = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    assert config["quantization"] == their_config["quantization"]


def test_group_fallbacks_are_reported_and_loadable(tmp_path):
    """Width 96 takes group 32 (not 64); width 80 takes neither and stays f16, said so, per layer in config."""
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    src = make_tiny_model(tmp_path / "odd", "llama", tie=True, seed=5, hidden=96, heads=4, kv_heads=2, ffn=80)
    out = tmp_path / "int4"
    result = convert(src, out, "int4")
    assert len(result.fallbacks) == 2 and all("down_proj" in f and "f16" in f for f in result.fallbacks)
    assert result.tensor_types == {"int4-g32": 13, "f16": 7}  # 6 linears x 2 layers + embedding; 5 norms, 2 downs
    assert "group 32 for 13 layers" in result.notes[0]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == 32
    assert config["quantization"]["model.layers.0.mlp.down_proj"] is False
    assert assert_folder_matches_mx_quantize(out, src) == 13
    reference = hf_model(src)
    load_dequantized_into(reference, out)
    np.testing.assert_allclose(runner(out).logits(TOKENS), hf_logits(reference, TOKENS), atol=F16_TOL)

    # an explicit group size is honoured where it divides, reported where not; one that divides nothing fails
    result = convert(src, tmp_path / "int8-g32", "int8", group_size=32)
    assert result.tensor_types == {"int8-g32": 13, "f16": 7} and len(result.fallbacks) == 2
    assert not result.notes  # nothing was chosen for the user
    with pytest.raises(UnsupportedError, match="divides none"):
        convert(src, tmp_path / "never", "int4", group_size=64)
    assert not (tmp_path / "never").exists()


def test_bad_input_fails_cleanly(tiny_models, tmp_path):
    src = tiny_models["llama"]
    with pytest.raises(UnsupportedError, match="choose 32, 64 or 128"):
        convert(src, tmp_path / "a", "int4", group_size=48)
    with pytest.raises(UnsupportedError, match="int4/int8 only"):
        convert(src, tmp_path / "b", "f16", group_size=64)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        convert(src, existing, "int4")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    convert(src, existing, "int4", force=True)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no partial folders left behind


def test_tokenizer_and_chat_template_travel(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    src = tiny_models["qwen2"]
    convert(src, tmp_path / "m", "int8")
    run = runner(tmp_path / "m")
    text = "Hello wörld! 12345 code() <|im_start|>"
    # mlx-lm tokenizes through transformers, which rebuilds some tokenizers by model type: compare like with like
    expected = AutoTokenizer.from_pretrained(src).encode(text, add_special_tokens=False)
    assert run.encode(text) == expected
    ids = run.chat_tokens([{"role": "user", "content": "hi"}])
    assert run.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tmp_path / "m" / "chat_template.jinja").exists()


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_smollm2_loads_in_mlx_lm_and_answers(smollm2, tmp_path, quant):
    out = tmp_path / quant
    result = convert(smollm2, out, quant)
    assert not result.fallbacks  # 576 and 1536 are multiples of 64
    assert assert_folder_matches_mx_quantize(out, smollm2) == 211
    run = runner(out, compute_dtype="float32")  # float16 compute crawls on mlx's x86 CPU backend
    prompt = run.chat_tokens([{"role": "user", "content": "Explain what a CPU does in one sentence."}])
    reply = run.decode(run.greedy(prompt, 24, stop_ids=run.eos_ids))
    assert "CPU" in reply and ("instructions" in reply or "computer" in reply), reply


@pytest.mark.parametrize("source_quant", ["q4_1", "q4_0"])
def test_int4_g32_from_a_4bit_gguf_copies_the_grid(tiny_models, tmp_path, source_quant):
    from ondevice.cli import main as cli

    gguf = tmp_path / f"m-{source_quant}.gguf"
    assert cli(["convert", str(tiny_models["qwen2"]), "--to", "gguf", "--quant", source_quant, "-o", str(gguf),
                "--pre", "gpt-2", "--no-progress"]) == 0
    result = convert(gguf, tmp_path / "default", "int4")
    assert any("--group-size 32 keeps that grid" in note for note in result.notes), result.notes
    out = tmp_path / "g32"
    result = convert(gguf, out, "int4", group_size=32)
    source = open_source(gguf)
    try:
        held = {n for n, t in source.tensors.items() if t.source_dtype == source_quant}
        assert result.tensor_types["int4-g32-source-grid"] == len(held) == 15
        st = SafetensorsFile(out / "model.safetensors")
        for name in held:  # exact: the same fp16 scales and offsets, the same codes
            module = name.removesuffix(".weight")
            saved = mlx_target.affine_dequantize(*(st.raw(f"{module}.{k}") for k in ("weight", "scales", "biases")),
                                                 4)
            assert np.array_equal(saved, source.tensors[name].load()), name
        st.close()
    finally:
        source.close()
    exact = tmp_path / "exact-hf"
    assert cli(["convert", str(gguf), "--to", "hf", "-o", str(exact), "--no-progress"]) == 0
    reference = hf_model(exact)
    load_dequantized_into(reference, out)  # the one 8-bit tensor of the GGUF is re-quantized by mlx's rule
    assert np.abs(runner(out).logits(TOKENS) - hf_logits(reference, TOKENS)).max() <= F16_TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_folds_exactly_and_runs_in_mlx(tiny_models, tmp_path, monkeypatch, arch):
    """--method awq: the scales are folded into both sides (norms and matrices, v rows and biases with o columns,
    up rows with down columns), so at int8 mlx's logits stay as near the float model's as plain int8's; alpha 1
    is forced (the strongest scales) so that an unfolded side would show."""
    import ondevice.quant.calibrated as calibrated

    monkeypatch.setattr(calibrated, "AWQ_ALPHAS", (1.0,))
    src = tiny_models[arch]
    model = open_source(src)
    try:
        options = mlx_target.MLXOptions(quant="int8", progress=False, method="awq", calibration_chunks=2)
        mlx_target.convert(model, tmp_path / "awq", options)
    finally:
        model.close()
    convert(src, tmp_path / "plain", "int8")
    ref = hf_logits(hf_model(src), TOKENS)
    rms = {name: float(np.sqrt(((runner(tmp_path / name).logits(TOKENS) - ref) ** 2).mean()))
           for name in ("awq", "plain")}
    assert rms["awq"] < 1.5 * rms["plain"], rms
    a, b = (SafetensorsFile(tmp_path / name / "model.safetensors") for name in ("awq", "plain"))
    try:
        norm = "model.layers.0.input_layernorm.weight"
        assert not np.array_equal(a.load_f32(norm), b.load_f32(norm))
    finally:
        a.close()
        b.close()


def test_method_errors_are_one_line(tiny_models, tmp_path):
    src = tiny_models["llama"]
    model = open_source(src)
    try:
        for options, message in ((mlx_target.MLXOptions(quant="int4", method="gptq"), "choose one of awq"),
                                 (mlx_target.MLXOptions(quant="f16", method="awq"), "nothing to calibrate"),
                                 (mlx_target.MLXOptions(quant="int4", calibration_chunks=2), "needs --method awq")):
            with pytest.raises(UnsupportedError, match=message):
                mlx_target.convert(model, tmp_path / "x", options)
            assert not (tmp_path / "x").exists()
    finally:
        model.close()
