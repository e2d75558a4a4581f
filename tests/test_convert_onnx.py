"""`--to onnx`: decoder graphs run in onnxruntime (and onnxruntime-genai) against transformers.

Tolerances (logits of the tiny models have a standard deviation of ~0.85):
- f32: max |onnxruntime - transformers| <= 1e-4 (measured ~2e-6); f16: the same against transformers with the
  weights rounded to float16 (onnxruntime computes in float32 from the half-stored weights).
- int4/int8 with accuracy_level 0 (float activations): <= 1e-3 against transformers running the dequantized
  weights, which checks that MatMulNBits/GatherBlockQuantized read our bytes as written. With the default
  accuracy_level 4 (int8 activations inside the kernel) the error against the float model stays under
  0.25 (int8) and 2.5 (int4) logit standard deviations on these random tiny models.
- int8 keeps q|k|v and the last two blocks in f16 by default (FLOAT_LAYERS); float_layers=False quantizes all,
  which the byte-level checks use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ondevice.converters import onnx as onnx_target  # noqa: E402
from ondevice.converters.onnx_graph import dequantize_blocks, quantize_blocks  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from ondevice.errors import OutputExistsError, UnsupportedError  # noqa: E402
from ondevice.sources import open_source  # noqa: E402

TOKENS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]
ARCHS = ["llama", "llama-untied", "qwen2", "llama3", "qwen3", "gemma3"]
CHAT_CHECKS = [  # prompt, words one of which a coherent reply contains
    ("Explain what a CPU does in one sentence.", ("CPU", "computer", "processor", "Processing")),
    ("Give me three tips for staying healthy.", ("diet", "exercise", "water", "sleep", "healthy")),
]


def convert(src: Path, out: Path, quant: str, force: bool = False, **options):
    model = open_source(src)
    try:
        return onnx_target.convert(model, out, onnx_target.ONNXOptions(quant=quant, force=force, progress=False,
                                                                       **options))
    finally:
        model.close()


def runner(folder: Path):
    from ondevice.runners.onnx_runner import ONNXRunner

    return ONNXRunner(folder, threads=2)


def hf_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def initializers(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def stored_weight(inits: dict[str, np.ndarray], prefix: str, bits: int, k: int) -> np.ndarray:
    """(N, K) float32 weight of a quantized layer as the folder stores it."""
    zero = inits.get(f"{prefix}.weight_zero_points")
    return dequantize_blocks(inits[f"{prefix}.weight_q{bits}"], inits[f"{prefix}.weight_scales"], zero, bits, k)


def load_stored_weights_into(model, folder: Path, bits: int) -> None:
    """Give the transformers model exactly the weights the ONNX folder holds (fused q|k|v and gate|up split)."""
    import torch

    config = model.config
    inits = initializers(folder)
    d = config.hidden_size
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_rows, kv_rows = config.num_attention_heads * head, config.num_key_value_heads * head
    ffn = config.intermediate_size
    table = "lm_head" if config.tie_word_embeddings else "model.embed_tokens"
    with torch.no_grad():
        def put(param, value):
            param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

        put(model.model.embed_tokens.weight, stored_weight(inits, table, bits, d))
        for i, layer in enumerate(model.model.layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            qkv = stored_weight(inits, f"{a}.qkv_proj", bits, d)
            put(layer.self_attn.q_proj.weight, qkv[:q_rows])
            put(layer.self_attn.k_proj.weight, qkv[q_rows:q_rows + kv_rows])
            put(layer.self_attn.v_proj.weight, qkv[q_rows + kv_rows:])
            put(layer.self_attn.o_proj.weight, stored_weight(inits, f"{a}.o_proj", bits, q_rows))
            gate_up = stored_weight(inits, f"{m}.gate_up_proj", bits, d)
            put(layer.mlp.gate_proj.weight, gate_up[:ffn])
            put(layer.mlp.up_proj.weight, gate_up[ffn:])
            put(layer.mlp.down_proj.weight, stored_weight(inits, f"{m}.down_proj", bits, ffn))
        if not config.tie_word_embeddings:
            put(model.lm_head.weight, stored_weight(inits, "lm_head", bits, d))


# ---------------------------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_quantizer_is_byte_identical_to_onnxruntime(bits, symmetric, block):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rng = np.random.default_rng(bits + block)
    n, k = 40, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, :block] = 0.0
    w[1, :block] = np.abs(w[1, :block])
    w[2, :block] = -np.abs(w[2, :block])
    w[3, :block] = np.linspace(-1, 1, block)  # values on exact halves of the code grid
    w[4] *= 30.0
    w[5, :block] = np.where(np.arange(block) % 2, 0.5, -0.5)  # min and max of equal magnitude
    packed, scales, zero_points = quantize_blocks(w, block, bits, symmetric)
    blocks = k // block
    ref_packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    ref_scales = np.zeros((n, blocks), np.float32)
    ref_zero = np.zeros((n, (blocks + 1) // 2 if bits == 4 else blocks), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(ref_packed, np.ascontiguousarray(w.T), ref_scales, ref_zero, block, n, k, symmetric)
    np.testing.assert_array_equal(packed, ref_packed)
    np.testing.assert_array_equal(scales.view(np.uint32), ref_scales.view(np.uint32))
    if symmetric:
        assert zero_points is None
    else:
        np.testing.assert_array_equal(zero_points, ref_zero)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_reads_our_layout(bits, symmetric):
    """A single MatMulNBits node (float activations) computes x @ dequantize_blocks(...)^T."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(7)
    n, k, block = 24, 96, 32
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    packed, scales, zero_points = quantize_blocks(w, block, bits, symmetric)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    names = ["x", "B", "S"]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    expected = x @ dequantize_blocks(packed, scales, zero_points, bits, k).T
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    # within one step (symmetric blocks clip one end of the range by up to a step)
    assert np.abs(dequantize_blocks(packed, scales, zero_points, bits, k) - w).max() <= np.abs(scales).max() * 1.001


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_f32_matches_transformers_and_caches(tiny_models, tmp_path, arch):
    src = tiny_models[arch]
    out = tmp_path / "f32"
    result = convert(src, out, "f32")
    onnx.checker.check_model(str(out / "model.onnx"))
    ref = hf_logits(hf_model(src), TOKENS)
    run = runner(out)
    got = run.logits(TOKENS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4
    # the KV cache: the same logits fed in three pieces
    run.reset()
    pieces = np.concatenate([run.forward(TOKENS[:5]), run.forward(TOKENS[5:6]), run.forward(TOKENS[6:])])
    np.testing.assert_allclose(pieces, got, atol=1e-5)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert result.tensor_types == {"f32": layers * 4 + 2}  # qkv, o, gate_up, down per layer + embedding + output


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_f16_and_greedy_continuations(tiny_models, tmp_path, arch):
    import torch

    src = tiny_models[arch]
    convert(src, tmp_path / "f16", "f16")
    rounded = hf_model(src)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if not name.endswith(".bias"):  # biases stay float32 in f16 artifacts
                param.copy_(param.half().float())
    np.testing.assert_allclose(runner(tmp_path / "f16").logits(TOKENS), hf_logits(rounded, TOKENS), atol=1e-4)
    prompt = TOKENS[:8]
    with torch.no_grad():
        expected = hf_model(src).generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                          do_sample=False)[0, len(prompt):].tolist()
    convert(src, tmp_path / "f32", "f32")
    assert runner(tmp_path / "f32").greedy(prompt, 32) == expected
    assert runner(tmp_path / "f16").greedy(prompt, 32) == expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant,bits", [("int4", 4), ("int8", 8)])
def test_tiny_quantized_runs_as_written(tiny_models, tmp_path, arch, quant, bits):
    src = tiny_models[arch]
    exact = tmp_path / "exact"
    convert(src, exact, quant, accuracy_level=0, float_layers=False)
    reference = hf_model(src)
    load_stored_weights_into(reference, exact, bits)
    got = runner(exact).logits(TOKENS)
    assert np.abs(got - hf_logits(reference, TOKENS)).max() <= 1e-3
    # the default kernel path (int8 activations) stays close to the float model
    out = tmp_path / "default"
    result = convert(src, out, quant)
    block = 32 if quant == "int4" else 16
    # int8 keeps qkv of every block and all 4 linear layers of the last two blocks in f16
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    kept = layers + 3 * min(2, layers)
    assert result.tensor_types == ({f"{quant}-b{block}": 4 * layers + 2} if quant == "int4"
                                   else {"int8-b16": 4 * layers + 2 - kept, "f16": kept})
    assert f"block {block}" in result.notes[0]
    if arch == "gemma3":  # random 6-layer weights with 8x-scaled embeddings: no meaningful quantization bound
        return
    ref = hf_logits(hf_model(src), TOKENS)
    assert np.abs(runner(out).logits(TOKENS) - ref).max() / ref.std() < {"int4": 2.5, "int8": 0.25}[quant]


@pytest.mark.parametrize("quant,bits", [("int4", 4), ("int8", 8)])
def test_widths_that_are_not_a_multiple_of_the_block_are_padded(tmp_path, quant, bits):
    """FFN width 80 with blocks of 32: down_proj's inputs are zero-padded to 96 (MatMulNBits handles K % block)."""
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    src = make_tiny_model(tmp_path / "odd", "llama", tie=True, seed=5, hidden=96, heads=3, kv_heads=1, ffn=80)
    out = tmp_path / quant
    convert(src, out, quant, block_size=32, accuracy_level=0, float_layers=False)
    assert initializers(out)["model.layers.0.mlp.down_proj.weight_scales"].shape == (96, 3)
    reference = hf_model(src)
    load_stored_weights_into(reference, out, bits)
    assert np.abs(runner(out).logits(TOKENS) - hf_logits(reference, TOKENS)).max() <= 1e-3


def test_folder_layout_and_onnxruntime_genai(tiny_models, tmp_path):
    src = tiny_models["llama"]
    out = tmp_path / "m"
    convert(src, out, "int4")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.onnx.data", "genai_config.json",
                                               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                               "generation_config.json"}
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama" and decoder["num_hidden_layers"] == 2
    assert decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()][:2] == ["input_ids", "attention_mask"]
    assert {o.name for o in session.get_outputs()} >= {"logits", "present.0.key", "present.1.value"}
    pytest.importorskip("onnxruntime_genai")
    from ondevice.runners.onnx_runner import GenAIRunner

    og_runner = GenAIRunner(out)
    prompt = TOKENS[:8]
    assert og_runner.greedy(prompt, 16) == runner(out).greedy(prompt, 16)
    assert og_runner.encode("Hello wörld! 12345") == runner(out).encode("Hello wörld! 12345")


def test_tokenizer_and_chat_template_travel(tiny_models, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    src = tiny_models["qwen2"]
    convert(src, tmp_path / "m", "int8")
    run = runner(tmp_path / "m")
    text = "Hello wörld! 12345 code() <|im_start|>"
    assert run.encode(text) == Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    rendered = AutoTokenizer.from_pretrained(src).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=False)
    assert run.decode(run.chat_tokens(messages)) == rendered


def test_bad_input_fails_cleanly(tiny_models, tmp_path):
    src = tiny_models["llama"]
    with pytest.raises(UnsupportedError, match="choose 16, 32, 64, 128 or 256"):
        convert(src, tmp_path / "a", "int4", block_size=48)
    with pytest.raises(UnsupportedError, match="int4/int8 only"):
        convert(src, tmp_path / "b", "f32", block_size=32)
    with pytest.raises(UnsupportedError, match="not a multiple of the block size"):
        convert(src, tmp_path / "c", "int4", block_size=128)  # width 64
    from tiny_models import make_tiny_model

    odd_heads = make_tiny_model(tmp_path / "src24", "llama", seed=6, hidden=96, heads=4, kv_heads=2)  # head_dim 24
    with pytest.raises(UnsupportedError, match="multiple of 16"):
        convert(odd_heads, tmp_path / "d", "f32")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        convert(src, existing, "int4")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "src24"]  # no partial folders left behind
    convert(src, existing, "int4", force=True)
    assert (existing / "model.onnx").exists() and not (existing / "keep.txt").exists()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])  # v biases; 1 + w norms (the others: test_quant_calibrated)
def test_awq_folds_exactly_and_runs_in_onnxruntime(tiny_models, tmp_path, monkeypatch, arch):
    """--method awq: the scales are folded into both sides (norms, matrices, v rows and biases with o columns, up
    rows with down columns; gemma3's 1 + w norms too), so with every layer at int8 and float activations
    onnxruntime's logits stay near the float model's; alpha 1 is forced (the strongest scales, which cost int8 up
    to ~1.7x plain's error here) so that an unfolded side (~9x) would show. The folding itself is exact in float:
    tests/test_quant_calibrated.py."""
    import ondevice.quant.calibrated as calibrated

    monkeypatch.setattr(calibrated, "AWQ_ALPHAS", (1.0,))
    src = tiny_models[arch]
    for name, method in (("awq", "awq"), ("plain", None)):
        convert(src, tmp_path / name, "int8", accuracy_level=0, float_layers=False, method=method,
                calibration_chunks=2 if method else None)
    ref = hf_logits(hf_model(src), TOKENS)
    rms = {name: float(np.sqrt(((runner(tmp_path / name).logits(TOKENS) - ref) ** 2).mean()))
           for name in ("awq", "plain")}
    assert rms["awq"] < 2.5 * rms["plain"], rms
    awq, plain = (initializers(tmp_path / name) for name in ("awq", "plain"))
    norm = "model.layers.0.input_layernorm.weight"
    assert not np.array_equal(awq[norm], plain[norm])


def test_awq_errors_are_one_line(tiny_models, tmp_path):
    src = tiny_models["llama"]
    for options, message in (({"quant": "int4", "method": "gptq"}, "choose one of awq"),
                             ({"quant": "f16", "method": "awq"}, "nothing to calibrate"),
                             ({"quant": "int4", "calibration_chunks": 2}, "needs --method awq"),
                             ({"quant": "int4", "method": "awq", "calibration_chunks": 0}, "at least 1 chunk")):
        quant = options.pop("quant")
        with pytest.raises(UnsupportedError, match=message):
            convert(src, tmp_path / "x", quant, **options)
        assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.parametrize("quant,bits", [("int4", 4), ("int8", 8)])
def test_smollm2_runs_in_onnxruntime_and_answers(smollm2, tmp_path, quant, bits):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    out = tmp_path / quant
    result = convert(smollm2, out, quant)
    # int8: q|k|v of the 30 blocks and the other 3 layers of the last 2 blocks stay f16 (FLOAT_LAYERS)
    assert result.tensor_types == ({"int4-b32": 122} if bits == 4 else {"int8-b16": 86, "f16": 36})
    # every weight's bytes are what onnxruntime's own quantizer (the genai model builder's) makes of it
    inits = initializers(out)
    block, symmetric = onnx_target.DEFAULTS[quant]
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    model = open_source(smollm2)
    try:
        t = model.tensors
        layers = {"lm_head": t["model.embed_tokens.weight"]}  # tied: the output layer holds the table
        for i in range(model.spec.n_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            layers[f"{a}.qkv_proj"] = [t[f"{a}.{x}_proj.weight"] for x in "qkv"]
            layers[f"{a}.o_proj"] = t[f"{a}.o_proj.weight"]
            layers[f"{m}.gate_up_proj"] = [t[f"{m}.gate_proj.weight"], t[f"{m}.up_proj.weight"]]
            layers[f"{m}.down_proj"] = t[f"{m}.down_proj.weight"]
        for name, parts in layers.items():
            if f"{name}.weight" in inits:  # kept in f16
                w = np.concatenate([p.load() for p in parts]) if isinstance(parts, list) else parts.load()
                np.testing.assert_array_equal(inits[f"{name}.weight"], w.T.astype(np.float16), err_msg=name)
                continue
            w = np.concatenate([p.load() for p in parts]) if isinstance(parts, list) else parts.load()
            n, k = w.shape
            ref = np.zeros((n, k // block, block * bits // 8), np.uint8)
            scales = np.zeros((n, k // block), np.float32)
            zero = np.zeros((n, (k // block + 1) // 2 if bits == 4 else k // block), np.uint8)
            quantize(ref, np.ascontiguousarray(w.T), scales, zero, block, n, k, symmetric)
            np.testing.assert_array_equal(inits[f"{name}.weight_q{bits}"], ref, err_msg=name)
            np.testing.assert_array_equal(inits[f"{name}.weight_scales"], scales, err_msg=name)
            if not symmetric:
                np.testing.assert_array_equal(inits[f"{name}.weight_zero_points"], zero, err_msg=name)
    finally:
        model.close()
    del inits

    run = runner(out)
    for prompt, words in CHAT_CHECKS:
        reply = run.decode(run.greedy(run.chat_tokens([{"role": "user", "content": prompt}]), 48,
                                      stop_ids=run.eos_ids))
        assert any(word in reply for word in words), reply
    pytest.importorskip("onnxruntime_genai")
    from ondevice.runners.onnx_runner import GenAIRunner

    genai = GenAIRunner(out)
    prompt = run.chat_tokens([{"role": "user", "content": CHAT_CHECKS[0][0]}])
    # onnxruntime-genai stops after end-of-sequence (the reply here ends within 16 tokens), so ours does too
    assert genai.greedy(prompt, 16) == run.greedy(prompt, 16, stop_ids=run.eos_ids)
