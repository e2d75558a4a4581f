"""--to coreml: the saved .mlpackage, read back and evaluated by the numpy MIL interpreter, matches transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from ondevice.converters.base import ConvertOptions  # noqa: E402

from ondevice.errors import UnsupportedError  # noqa: E402

TOKENS = [3, 17, 42, 5, 99, 12, 7, 64, 33, 21]


def transformers_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def convert(folder: Path, out: Path, quant: str, **extra: object) -> dict:
    from ondevice.converters import coreml

    from ondevice.sources import open_source

    options = ConvertOptions(quant=quant, progress=False)
    for key, value in extra.items():
        setattr(options, key, value)
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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp16_package_matches_transformers(tiny_models, tmp_path, arch):
    out = tmp_path / f"{arch}.mlpackage"
    convert(tiny_models[arch], out, "fp16")
    ref = transformers_logits(tiny_models[arch], TOKENS)
    # fp16 weights and state: within 2% of the logits' spread (measured 0.4%), prefill and token by token.
    for split in (None, 3):
        got = interpreted(out, TOKENS, split)
        assert np.abs(got - ref).max() < 0.02 * ref.std(), np.abs(got - ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["chat_template"] and manifest["max_seq_len"] == 256
    assert out.with_suffix(".tokenizer.json").is_file()


@pytest.mark.parametrize(("quant", "op", "bound"), [("int4", "constexpr_blockwise_shift_scale", 0.35),
                                                     ("int8", "constexpr_blockwise_shift_scale", 0.03)])
def test_quantized_package_every_linear_in_a_quantized_op(tiny_models, tmp_path, quant, op, bound):
    from ondevice.converters.coreml import count_weight_ops

    out = tmp_path / f"qwen2-{quant}.mlpackage"
    convert(tiny_models["qwen2"], out, quant)
    # 2 blocks x 7 linears + untied lm_head + embedding table, all fed by a dequantizing op in the saved spec.
    assert count_weight_ops(out) == {op: 16}
    ref = transformers_logits(tiny_models["qwen2"], TOKENS)
    got = interpreted(out, TOKENS)
    rel = np.sqrt(np.mean((got - ref) ** 2)) / ref.std()
    assert rel < bound, rel


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
    assert count_weight_ops(out) == {"constexpr_blockwise_shift_scale": 16}
    # The saved package's weights are the GGUF's, up to the fp16 rounding of the offset (< 1/64 of a code step).
    program = load_program(out)
    ops = {op.name: op for op in program.functions["main"].operations}
    source = open_source(str(gguf))
    try:
        # every weight the GGUF holds at 4 bits (the 14 linears and the embedding); its 8-bit output layer is
        # quantized in the same asymmetric form (Q4_1's rule), not symmetric
        held = sorted(n for n in layers if source.tensors[n].source_dtype == source_quant)
        assert sorted(copied) == held and len(held) == 15, layers
        assert layers["lm_head.weight"] == "int4-block32-asymmetric", layers
        for name in copied:
            op = ops[mil_name(name)]
            data = op.inputs["data"].val.astype(np.float32)
            scale, offset = (op.inputs[k].val.astype(np.float32) for k in ("scale", "offset"))
            saved = ((data.reshape(*scale.shape, 32) - offset[..., None]) * scale[..., None]).reshape(data.shape)
            step = np.repeat(np.abs(scale), 32, axis=1)
            assert (np.abs(saved - source.tensors[name].load()) <= step / 64 + 1e-7).all(), name
    finally:
        source.close()
    # Against the GGUF's own weights only the output layer's 4-bit rounding and fp16 arithmetic remain: RMS 0.08 of
    # the logit spread, worst logit 0.38 (with that layer symmetric int4: worst 0.68).
    exact = tmp_path / "exact-hf"
    assert cli(["convert", str(gguf), "--to", "hf", "-o", str(exact), "--no-progress"]) == 0
    ref = transformers_logits(exact, TOKENS)
    got = interpreted(out, TOKENS, split=4)
    assert np.sqrt(np.mean((got - ref) ** 2)) / ref.std() < 0.15 and np.abs(got - ref).max() / ref.std() < 0.5
