"""--to coreml: the saved .mlpackage, read back and evaluated by the numpy MIL interpreter, matches transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")


from ondevice.errors import UnsupportedError  # noqa: E402

TOKENS = [3, 17, 42, 5, 99, 12, 7, 64, 33, 21]


def transformers_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def fp16_weight_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    """The float reference's logits on the model's weights rounded to fp16: what fp16 storage alone costs."""
    from ondevice.reference import reference_logits
    from ondevice.sources import open_source

    model = open_source(str(folder))
    rounded = {name: tensor.load().astype(np.float16).astype(np.float32) for name, tensor in model.tensors.items()}
    model.tensors = {name: RoundedTensor(rounded[name]) for name in model.tensors}
    return reference_logits(model, tokens)


class RoundedTensor:
    def __init__(self, values: np.ndarray) -> None:
        self.values, self.shape = values, values.shape

    def load(self) -> np.ndarray:
        return self.values


def convert(folder: Path, out: Path, quant: str, **extra: object) -> dict:
    from ondevice.converters import coreml

    from ondevice.sources import open_source

    options = coreml.CoreMLOptions(quant=quant, progress=False, **extra)
    model = open_source(str(folder))
    try:
        return coreml.convert(model, out, options).to_json()
    finally:
        model.close()


def interpreted(package: Path, tokens: list[int], split: int | None = None) -> np.ndarray:
    from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

    runner = CoreMLInterpreterRunner(package)
    if split is None:
        return runner.logits(tokens)
    runner.reset()
    return np.concatenate([runner.forward(tokens[:split])] + [runner.forward([t]) for t in tokens[split:]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3", "qwen3", "gemma3"])
def test_fp16_package_matches_transformers(tiny_models, tmp_path, arch):
    out = tmp_path / f"{arch}.mlpackage"
    convert(tiny_models[arch], out, "fp16")
    ref = transformers_logits(tiny_models[arch], TOKENS)
    # fp16 weights and state: within 2% of the logits' spread (measured 0.4%), prefill and token by token; or,
    # where rounding the weights alone moves the float logits further (gemma3's sandwich norms: 2.8%), within 1.5x
    # of that. A wrong mask, RoPE base or norm is off by 20-300% of the spread on these models.
    bound = max(0.02 * ref.std(), 1.5 * np.abs(fp16_weight_logits(tiny_models[arch], TOKENS) - ref).max())
    for split in (None, 3):
        got = interpreted(out, TOKENS, split)
        assert np.abs(got - ref).max() < bound, np.abs(got - ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["chat_template"] and manifest["max_seq_len"] == 256
    assert out.with_suffix(".tokenizer.json").is_file()


INT4_OPS = {"constexpr_blockwise_shift_scale:int4": 16, "offsets constexpr_blockwise_shift_scale:int8": 16}


@pytest.mark.parametrize(("quant", "ops", "bound"), [("int4", INT4_OPS, 0.35),
                                                     ("int8", {"constexpr_blockwise_shift_scale:int8": 16}, 0.03)])
def test_quantized_package_every_linear_in_a_quantized_op(tiny_models, tmp_path, quant, ops, bound):
    from ondevice.converters.coreml import count_weight_ops

    out = tmp_path / f"qwen2-{quant}.mlpackage"
    convert(tiny_models["qwen2"], out, quant)
    # 2 blocks x 7 linears + untied lm_head + embedding table, all fed by a dequantizing op in the saved spec; at
    # int4 each also has its int8 block offsets. Measured RMS error / logit spread: int4 0.24 (random weights), int8 0.01.
    assert count_weight_ops(out) == ops
    ref = transformers_logits(tiny_models["qwen2"], TOKENS)
    got = interpreted(out, TOKENS)
    rel = np.sqrt(np.mean((got - ref) ** 2)) / ref.std()
    assert rel < bound, rel
    if quant == "int4":
        layers = json.loads(out.with_suffix(".json").read_text())["layers"]
        assert layers["lm_head.weight"] == "int4-block32-gptq"
        assert {v for k, v in layers.items() if k != "lm_head.weight"} == {"int4-block32-asymmetric"}


def package_weights(package: Path) -> dict[str, np.ndarray]:
    """Every linear/embedding weight as the saved program computes it: int4 part + block offsets, and for a rotated
    output layer (rows of W R) times R^T, R read from the program's own sign and Hadamard consts."""
    from ondevice.runners.coreml_interpreter import load_program

    ops = {op.name: op for op in load_program(package).functions["main"].operations}
    weights = {}
    for name, op in ops.items():
        if op.op_type != "constexpr_blockwise_shift_scale" or name.endswith("_offsets"):
            continue
        codes, scale = (op.inputs[k].val.astype(np.float32) for k in ("data", "scale"))
        block = codes.shape[1] // scale.shape[1]
        offsets = ops.get(name + "_offsets")  # none when all offsets are 0
        shift = np.zeros(scale.shape, np.float32) if offsets is None else \
            offsets.inputs["data"].val.astype(np.float32) * offsets.inputs["scale"].val.astype(np.float32)
        weights[name] = ((codes.reshape(*scale.shape, block) * scale[..., None] + (shift / block)[..., None])
                         .reshape(codes.shape))
    signs = [op for n, op in ops.items() if n.endswith("_signs")]
    hadamard = [op for n, op in ops.items() if n.endswith("_hadamard")]
    if signs:
        s, h = signs[0].outputs[0].val.astype(np.float32), hadamard[0].outputs[0].val.astype(np.float32)
        rotation = np.diag(s) @ np.kron(np.eye(len(s) // len(h)), h)
        head = "model_embed_tokens_weight" if "lm_head_weight" not in weights else "lm_head_weight"
        weights[head] = weights[head] @ rotation.T
    return weights


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_package_computes_its_stored_weights(tiny_models, tmp_path, arch):
    """The int4 program (blocks + int8 offsets on the inputs' block means, GPTQ'd and rotated output layer; tied
    in llama, so the embedding lookup un-rotates) matches transformers run on the weights read back from the
    package, to fp16 arithmetic (2% of the logit spread, like fp16 packages)."""
    import torch
    from ondevice.converters.coreml import mil_name
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"{arch}.mlpackage"
    convert(tiny_models[arch], out, "int4")
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert "output_rotation" in manifest
    stored = package_weights(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    state = model.state_dict()
    with torch.no_grad():
        for name in manifest["layers"]:
            state[name].copy_(torch.from_numpy(stored[mil_name(name)]))
        ref = model(torch.tensor([TOKENS])).logits[0].numpy()
    got = interpreted(out, TOKENS, split=4)
    assert np.abs(got - ref).max() < 0.02 * ref.std(), np.abs(got - ref).max() / ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_int4_without_calibration_rounds_the_output_layer(tiny_models, tmp_path):
    out = tmp_path / "llama.mlpackage"
    convert(tiny_models["llama"], out, "int4", calibrate=False)
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert set(manifest["layers"].values()) == {"int4-block32-asymmetric"} and "output_rotation" not in manifest
    rel = np.sqrt(np.mean((interpreted(out, TOKENS) - transformers_logits(tiny_models["llama"], TOKENS)) ** 2))
    assert rel / transformers_logits(tiny_models["llama"], TOKENS).std() < 0.35


def test_block_size_that_does_not_divide_is_refused(tiny_models, tmp_path):
    with pytest.raises(UnsupportedError, match="does not divide"):
        convert(tiny_models["llama"], tmp_path / "x.mlpackage", "int4", block_size=128)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source_quant", ["q4_1", "q4_0"])
def test_int4_from_a_4bit_gguf_keeps_the_source_grid(tiny_models, tmp_path, source_quant):
    from ondevice.converters.coreml import count_weight_ops, mil_name

    from ondevice.cli import main as cli
    from ondevice.runners.coreml_interpreter import load_program
    from ondevice.sources import open_source

    gguf = tmp_path / f"qwen2-{source_quant}.gguf"
    assert cli(["convert", str(tiny_models["qwen2"]), "--to", "gguf", "--quant", source_quant, "-o", str(gguf),
                "--pre", "gpt-2", "--no-progress"]) == 0
    out = tmp_path / "m.mlpackage"
    convert(gguf, out, "int4")
    layers = json.loads(out.with_suffix(".json").read_text())["layers"]
    copied = [name for name, scheme in layers.items() if scheme == "int4-block32-source-grid"]
    # Q4_0's grid is symmetric: no offsets beside its weights (4.5 bits), only beside the GPTQ'd output layer.
    assert count_weight_ops(out) == (INT4_OPS if source_quant == "q4_1" else {
        "constexpr_blockwise_shift_scale:int4": 16, "offsets constexpr_blockwise_shift_scale:int8": 1})
    # The saved package's weights are the GGUF's: codes and scales as they are, the block offsets up to their int8
    # rounding (half a unit of the row's offset scale, spread over the block).
    program = load_program(out)
    ops = {op.name: op for op in program.functions["main"].operations}
    source = open_source(str(gguf))
    try:
        # every weight the GGUF holds at 4 bits (the 14 linears and the embedding); its 8-bit output layer is
        # quantized by GPTQ on the calibration text
        held = sorted(n for n in layers if source.tensors[n].source_dtype == source_quant)
        assert sorted(copied) == held and len(held) == 15, layers
        assert layers["lm_head.weight"] == "int4-block32-gptq", layers
        worst = 0.0
        for name in copied:
            codes = ops[mil_name(name)].inputs["data"].val.astype(np.float32)
            scale = ops[mil_name(name)].inputs["scale"].val.astype(np.float32)
            offset_op = ops.get(mil_name(name) + "_offsets")
            offsets = np.zeros(scale.shape, np.float32) if offset_op is None else \
                offset_op.inputs["data"].val.astype(np.float32)
            unit = np.zeros((len(scale), 1), np.float32) if offset_op is None else \
                offset_op.inputs["scale"].val.astype(np.float32)
            saved = (codes.reshape(*scale.shape, 32) * scale[..., None]
                     + (offsets * unit / 32)[..., None]).reshape(codes.shape)
            error = np.abs(saved - source.tensors[name].load())
            assert (error <= np.repeat(unit, codes.shape[1], axis=1) / 64 + 1e-6).all(), name
            worst = max(worst, float((error / np.repeat(np.abs(scale), 32, axis=1)).max()))
        assert worst < 0.1, worst  # of a code step
    finally:
        source.close()
    # Against the GGUF's own weights only the output layer's 4-bit rounding and fp16 arithmetic remain.
    exact = tmp_path / "exact-hf"
    assert cli(["convert", str(gguf), "--to", "hf", "-o", str(exact), "--no-progress"]) == 0
    ref = transformers_logits(exact, TOKENS)
    got = interpreted(out, TOKENS, split=4)
    assert np.sqrt(np.mean((got - ref) ** 2)) / ref.std() < 0.15 and np.abs(got - ref).max() / ref.std() < 0.5


def test_smollm2_int4_meets_the_issue_bars(smollm2, tmp_path, capsys):
    """Issue 6's Core ML bars on the bundled SmolLM2 (Q4_1): size within 10% of the 4.5 bits/weight arithmetic,
    every linear weight and the embedding in a blockwise int4 op (counted from the saved spec), and interpreted
    logits agreeing with transformers f32 on the file's own weights at >= 90% top-1 on the bundled eval text
    (measured: 1.079 x, 90.8%, KL 0.028; ~4 min here)."""
    from ondevice.converters.coreml import count_weight_ops

    from ondevice.cli import main as cli

    out = tmp_path / "smol.mlpackage"
    convert(smollm2, out, "int4")
    manifest = json.loads(out.with_suffix(".json").read_text())
    spec = manifest["spec"]
    h, f, d, layers = spec["hidden_size"], spec["ffn_size"], spec["head_dim"], spec["n_layers"]
    per_layer = h * spec["n_heads"] * d + 2 * h * spec["n_kv_heads"] * d + spec["n_heads"] * d * h + 3 * h * f
    weights = layers * per_layer + spec["vocab_size"] * h  # tied: the table once
    fp16_values = (2 * layers + 1) * h + manifest["max_seq_len"] * d  # norms, RoPE cos/sin tables
    arithmetic = weights * 4.5 / 8 + 2 * fp16_values
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size <= 1.10 * arithmetic, size / arithmetic
    linears = 7 * layers + 1
    assert count_weight_ops(out) == {"constexpr_blockwise_shift_scale:int4": linears + 1,  # + the embedding gather
                                     "offsets constexpr_blockwise_shift_scale:int8": linears + 1}
    assert len(manifest["layers"]) == linears and all(s.startswith("int4-block32") for s in manifest["layers"].values())

    reference = tmp_path / "smol-hf"
    assert cli(["convert", str(smollm2), "--to", "hf", "--quant", "f32", "-o", str(reference), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["eval", str(out), "--ref", str(reference), "--backend", "coreml-interpreter", "--threads", "2",
                "--no-store", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    result = result[0] if isinstance(result, list) else result
    assert result["tokens"] == 1020 and result["top1_agreement"] >= 0.90 and result["kl_mean"] < 0.035, result
    # the same bar as a device computing in fp16 runs it (issue 20)
    assert manifest["fp16_range"]["residual_scale"] == 2 and manifest["fp16_range"]["min_headroom"] >= 4
    assert cli(["eval", str(out), "--ref", str(reference), "--backend", "coreml-fp16", "--threads", "2",
                "--no-store", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    result = result[0] if isinstance(result, list) else result
    assert result["top1_agreement"] >= 0.90 and result["kl_mean"] < 0.035, result


# ---- fp16 as the device computes it (issue 20)

def test_fp16_rounding_overflows_to_inf_and_every_mode_runs(tiny_models, tmp_path):
    from ondevice.runners.coreml_interpreter import PRECISIONS, to_fp16

    assert np.isinf(to_fp16(np.float32(70000.0))) and to_fp16(np.float32(1.0 + 2**-12)) == 1.0
    out = tmp_path / "llama.mlpackage"
    convert(tiny_models["llama"], out, "fp16")
    ref = transformers_logits(tiny_models["llama"], TOKENS)
    results = {}
    for precision in PRECISIONS:
        from ondevice.runners.coreml_interpreter import CoreMLInterpreterRunner

        results[precision] = CoreMLInterpreterRunner(out, precision=precision).logits(TOKENS)
        assert np.abs(results[precision] - ref).max() < 0.03 * ref.std(), precision
    # each mode rounds differently: they are not the same computation
    assert not np.array_equal(results["fp32"], results["fp16"])
    assert not np.array_equal(results["fp16"], results["fp16-accumulate"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_residual_scale_is_folded_exactly(tiny_models, arch):
    """The residual stream carried / 8 (o/down weights, or gemma3's post-norm weights, scaled; eps / 64) computes
    the same logits as unscaled, to fp16 rounding."""
    from ondevice.converters.coreml import build_program

    from ondevice.runners.coreml_interpreter import Interpreter
    from ondevice.sources import open_source

    model = open_source(str(tiny_models[arch]))
    logits = []
    for scale in (1.0, 8.0):
        program, _, _ = build_program(model, 64, residual_scale=scale)
        out = Interpreter(program).run({"input_ids": np.asarray([TOKENS], np.int32),
                                        "position": np.asarray([0], np.int32)})
        logits.append(np.asarray(next(iter(out.values())))[0])
    assert np.abs(logits[0] - logits[1]).max() < 0.01 * logits[0].std()


def test_residual_scale_and_headroom_rule():
    from ondevice.converters.coreml_fp16 import check_headroom, residual_scale_for

    assert residual_scale_for(27347.0) == 2.0 and residual_scale_for(16000.0) == 1.0
    assert residual_scale_for(100000.0) == 8.0
    assert check_headroom({"a": 100.0, "b": 8000.0}) == pytest.approx(65504 / 8000)
    with pytest.raises(UnsupportedError) as info:
        check_headroom({"a": 100.0, "model.layers.3.mlp/gated": 20000.0})
    assert "model.layers.3.mlp/gated" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("int4", [False, True], ids=["fp16", "int4"])
def test_smollm2_sink_token_overflowed_the_plain_norm_and_no_longer_does(smollm2, int4):
    """SmolLM2's first token carries |x| ~ 27,000 in the residual stream: the plain norm ((x/16)^2) is inf in fp16
    there and zeroes the token; the built program (max-abs prescale, residual stream / 2) keeps every op of every
    position 4x or more below fp16's maximum."""
    from ondevice.converters.coreml import build_program
    from ondevice.converters.coreml_fp16 import FP16_MAX, HEADROOM, residual_range, residual_scale_for

    from ondevice.quant.calibration import calibration_windows
    from ondevice.runners.coreml_interpreter import Interpreter
    from ondevice.sources import open_source

    model = open_source(str(smollm2))
    window = calibration_windows(model, 64)[0][:37]
    block = 32 if int4 else None

    def run(program: object) -> tuple[dict[str, float], dict[str, float]]:
        interpreter = Interpreter(program, precision="fp16")
        first, rest = {}, {}
        for tokens, start, ranges in ((window[:1], 0, first), (window[1:], 1, rest)):
            interpreter.ranges = ranges
            interpreter.run({"input_ids": np.asarray([tokens], np.int32), "position": np.asarray([start], np.int32)})
        return first, rest

    plain, _, _ = build_program(model, 64, int4_block=block, calibrate=False, overflow_safe_norms=False)
    first, rest = run(plain)
    overflowed = sorted(name for name, top in first.items() if name.endswith("layernorm/mean") and np.isinf(top))
    assert len(overflowed) >= 10, overflowed  # position 0: mean of squares inf -> rsqrt 0 in many layers
    assert not [name for name, top in rest.items() if name.endswith("layernorm/mean") and np.isinf(top)]

    scale = residual_scale_for(residual_range(model, [window]))
    assert scale >= 2
    safe, _, _ = build_program(model, 64, int4_block=block, calibrate=False, residual_scale=scale)
    for ranges in run(safe):
        name, top = max(ranges.items(), key=lambda item: item[1])
        assert top < FP16_MAX / HEADROOM, (name, top)
