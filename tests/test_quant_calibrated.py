"""GPTQ on the GGUF types' own grids (ondevice.quant.grids, .gptq, .calibrated) and `convert --to gguf --method`:
the grids reproduce each type's bytes, GPTQ lowers a layer's output error against importance-weighted rounding
on inputs it did not see, and the converted file is a GGUF llama.cpp runs like ondevice's runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ondevice.quant import get_quant_type
from ondevice.quant.calibrated import awq_scale, gptq_dynamic_matrix, gptq_matrix, output_error
from ondevice.quant.gptq import damped_hessian, gptq_codes, prepare_hessian, refit_scales
from ondevice.quant.grids import GRID_TYPES, SCALE_RATIOS, stored_grid, with_codes, with_scales

ROOT = Path(__file__).resolve().parent.parent


def ondevice(*args: str) -> subprocess.CompletedProcess:
    if args[0] == "convert" and "gguf" in args and "--pre" not in args:
        args = (*args, "--pre", "gpt-2")  # the tiny models' tokenizer is no known family's
    return subprocess.run([sys.executable, "-m", "ondevice", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(GRID_TYPES))
def test_grid_reads_and_rewrites_each_types_bytes(name):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((6, 512)).astype(np.float32) * np.float32(0.02)
    importance = (rng.random(512) + 0.1).astype(np.float32)
    qtype = get_quant_type(name)
    for imp in (None, importance):
        data = qtype.quantize(weight, importance=imp)
        grid = stored_grid(qtype, data, 512)
        codes = grid.nearest_codes(qtype.dequantize(data, 512))
        assert np.array_equal(with_codes(qtype, data, codes), data)  # the grid is what the bytes decode to
        other = rng.integers(0, len(grid.levels), codes.shape).astype(np.uint8)
        rewritten = with_codes(qtype, data, other)
        assert rewritten.shape == data.shape
        np.testing.assert_array_equal(qtype.dequantize(rewritten, 512), grid.decode(other))


def correlated_inputs(rng: np.random.Generator, tokens: int, cols: int) -> np.ndarray:
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    scale = np.exp(rng.standard_normal(cols))  # a few loud channels, as in LLM activations
    return (rng.standard_normal((tokens, cols)) @ mix * scale).astype(np.float32)


def fit_and_held_out() -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """A weight and the second moments of two disjoint halves of correlated inputs (fit, held out)."""
    rng = np.random.default_rng(5)
    cols = 256
    weight = rng.standard_normal((48, cols)).astype(np.float32)
    x = correlated_inputs(rng, 8192, cols)
    fit, held_out = x[:4096], x[4096:]
    return cols, weight, (fit.T @ fit).astype(np.float64) / len(fit), \
        (held_out.T @ held_out).astype(np.float64) / len(held_out)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q4_k", "q6_k", "iq4_nl", "iq4_xs"])
def test_gptq_lowers_the_output_error_on_unseen_inputs(name):
    cols, weight, h_fit, h_new = fit_and_held_out()
    qtype = get_quant_type(name)
    gptq, rounded = gptq_matrix(qtype, weight, h_fit, damp=0.1)
    assert gptq.shape == rounded.shape and not np.array_equal(gptq, rounded)
    # the scales are the importance-weighted quantizer's; only codes moved
    grid_a, grid_b = stored_grid(qtype, gptq, cols), stored_grid(qtype, rounded, cols)
    assert np.array_equal(grid_a.scale, grid_b.scale) and np.array_equal(grid_a.bias, grid_b.bias)
    ours, theirs = qtype.dequantize(gptq, cols), qtype.dequantize(rounded, cols)
    ratio = output_error(weight, ours, h_new) / output_error(weight, theirs, h_new)
    assert ratio < 0.9, ratio


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "iq4_nl"])  # blocks of 32: 8 of them in a 256-wide row
def test_gptq_with_dynamic_blocks_lowers_the_output_error_on_unseen_inputs(name):
    """gptq_dynamic_matrix: each block's parameters chosen from the error-fed weights; its bytes are a valid file
    of the type (the codes are those the grid rounds to, as with_codes writes them) and beat plain rounding."""
    cols, weight, h_fit, h_new = fit_and_held_out()
    qtype = get_quant_type(name)
    dynamic, rounded = gptq_dynamic_matrix(qtype, weight, h_fit, damp=0.1)
    assert np.array_equal(rounded, qtype.quantize(weight, importance=np.diag(h_fit).astype(np.float32)))
    assert dynamic.shape == rounded.shape
    grid = stored_grid(qtype, dynamic, cols)
    assert not np.array_equal(grid.scale, stored_grid(qtype, rounded, cols).scale)  # the blocks were re-chosen
    ours, theirs = qtype.dequantize(dynamic, cols), qtype.dequantize(rounded, cols)
    ratio = output_error(weight, ours, h_new) / output_error(weight, theirs, h_new)
    assert ratio < 0.9, ratio


@pytest.mark.parametrize("name", sorted(SCALE_RATIOS))
def test_refit_scales_solve_the_least_squares_of_the_fixed_codes(name):
    """refit_scales against a direct least-squares solve of each row's scales (one column per block of the
    design matrix) under the damped H, and with_scales writes them as the block's fp16."""
    rng = np.random.default_rng(8)
    cols = 128
    weight = rng.standard_normal((5, cols)).astype(np.float32) * np.float32(0.03)
    x = correlated_inputs(rng, 2048, cols)
    hessian = damped_hessian((x.T @ x).astype(np.float64) / len(x), 0.1)
    qtype = get_quant_type(name)
    data = qtype.quantize(weight, importance=np.diag(hessian).astype(np.float32))
    grid = stored_grid(qtype, data, cols)
    codes = gptq_codes(weight, prepare_hessian(hessian, 0.0), grid)
    scale = refit_scales(weight, hessian, grid, codes, SCALE_RATIOS[name])
    root = np.linalg.cholesky(hessian)  # ||(w - q) L||^2 = (w - q) H (w - q)^T
    unit = grid.levels[codes] + SCALE_RATIOS[name]
    for r in range(len(weight)):
        design = np.zeros((cols, cols // 32))
        for b in range(cols // 32):
            design[32 * b:32 * b + 32, b] = unit[r, 32 * b:32 * b + 32]
        expected = np.linalg.lstsq(root.T @ design, root.T @ weight[r].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(scale[r], expected, rtol=1e-4, atol=1e-9)
    refitted = with_scales(qtype, data, scale)
    assert refitted.shape == data.shape
    np.testing.assert_array_equal(stored_grid(qtype, refitted, cols).scale,
                                  scale.astype(np.float16).astype(np.float32))

    def error(values):  # the objective the refit minimizes
        diff = weight.astype(np.float64) - values
        return float(((diff @ hessian) * diff).sum())

    assert error(qtype.dequantize(with_codes(qtype, refitted, codes), cols)) < \
        error(qtype.dequantize(with_codes(qtype, data, codes), cols))


@pytest.mark.parametrize("name", ["q4_0", "iq4_nl"])
def test_gptq_refits_lower_the_output_error_further(name):
    cols, weight, h_fit, h_new = fit_and_held_out()
    qtype = get_quant_type(name)
    errors = [output_error(weight, qtype.dequantize(gptq_matrix(qtype, weight, h_fit, 0.1, refits=refits)[0], cols),
                           h_new) for refits in (0, 2)]
    assert errors[1] < errors[0], errors


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "iq4_xs"])
def test_awq_scale_lowers_the_output_error_on_unseen_inputs(name):
    rng = np.random.default_rng(11)
    cols = 256
    x = correlated_inputs(rng, 8192, cols)
    fit, held_out = x[:4096], x[4096:]
    h_fit, h_new = (fit.T @ fit) / len(fit), (held_out.T @ held_out) / len(held_out)
    qtype = get_quant_type(name)
    weights = [rng.standard_normal((32, cols)).astype(np.float32) for _ in range(2)]
    scale, alpha = awq_scale([qtype, qtype], weights, np.abs(fit).mean(axis=0), h_fit)
    assert scale.shape == (cols,) and 0 < alpha <= 1
    assert abs(np.log(scale).mean()) < 1e-5  # normalized: geometric mean 1

    def error(s: np.ndarray) -> float:
        imp = (np.diag(h_fit) / s**2).astype(np.float32)
        return sum(output_error(w, qtype.dequantize(qtype.quantize(w * s, importance=imp), cols) / s, h_new)
                   for w in weights)

    assert error(scale) < 0.95 * error(np.ones(cols, np.float32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:  # a tiny llama of width 256: its rows take K-quants
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("gptq") / "llama", "llama", seed=13, hidden=256, ffn=512)


def test_gptq_quantizes_q_and_k_in_llama_cpp_row_order(tiny):
    from ondevice.architectures import get_architecture
    from ondevice.architectures.base import unpermute_from_gguf
    from ondevice.quant.calibrated import calibrated_tensors
    from ondevice.quant.imatrix import bundled_calibration_text, chunk_tokens
    from ondevice.sources import open_source

    model = open_source(tiny)
    arch = get_architecture(model.spec.arch)
    q4 = get_quant_type("q4_k")
    names = [n for n in model.tensors if n.endswith("_proj.weight")]
    tensors = calibrated_tensors(model, {n: q4 for n in names}, chunk_tokens(model, bundled_calibration_text(), 128, 2))
    assert sorted(tensors) == sorted(arch.gguf_name(n) for n in names)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        weight = model.tensors[name].load()
        back = unpermute_from_gguf(q4.dequantize(tensors[arch.gguf_name(name)], weight.shape[1]),
                                   arch.qk_heads(model.spec, name))
        assert np.abs(back - weight).mean() < 0.2 * np.abs(weight).mean()


def test_convert_method_gptq_loads_in_llama_cpp(tiny, tmp_path):
    from test_convert_gguf import TOKENS, llama_cpp_logits

    from ondevice import load
    from ondevice.formats.gguf import GGUFFile

    out, base = tmp_path / "gptq.gguf", tmp_path / "imatrix.gguf"
    run = ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_k_m", "--method", "gptq", "--calib-chunks", "2",
                   "-o", str(out), "--json")
    assert run.returncode == 0, run.stderr
    assert any(note.startswith("gptq: 14 tensors, 2x512") for note in json.loads(run.stdout)["notes"])
    assert ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_k_m", "--calibrate", "--method", "imatrix",
                    "--calib-chunks", "2", "-o", str(base)).returncode == 0
    with GGUFFile(out) as a, GGUFFile(base) as b:
        assert a.get("quantize.ondevice.method") == "gptq" and b.get("quantize.imatrix.file") == "calibrate"
        assert {n: (t.ggml_type, t.shape) for n, t in a.tensors.items()} == \
            {n: (t.ggml_type, t.shape) for n, t in b.tensors.items()}
        assert sum(bytes(a.tensor_data(n)) != bytes(b.tensor_data(n)) for n in a.tensors) >= 14
    theirs = llama_cpp_logits(out, TOKENS)
    with load(out, n_ctx=64, kv_cache="f32") as model:
        ours = model.logits(TOKENS)
    assert np.abs(ours - theirs).max() < 1e-2 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_calibrate_defaults_to_awq_and_awq_gptq_differs(tiny, tmp_path):
    from ondevice.formats.gguf import GGUFFile

    paths = {}
    for flags in ((), ("--method", "awq+gptq")):
        out = paths[flags] = tmp_path / f"{len(flags)}.gguf"
        run = ondevice("convert", str(tiny), "--to", "gguf", "--quant", "q4_k_m", "--calibrate", *flags,
                       "--calib-chunks", "2", "-o", str(out))
        assert run.returncode == 0, run.stderr
    with GGUFFile(paths[()]) as a, GGUFFile(paths[("--method", "awq+gptq")]) as b:
        assert a.get("quantize.ondevice.method") == "awq" and b.get("quantize.ondevice.method") == "awq+gptq"
        assert a.get("quantize.imatrix.file") is None
        # the same scales (norms equal), different codes
        assert bytes(a.tensor_data("blk.0.attn_norm.weight")) == bytes(b.tensor_data("blk.0.attn_norm.weight"))
        assert bytes(a.tensor_data("blk.0.attn_q.weight")) != bytes(b.tensor_data("blk.0.attn_q.weight"))


def test_convert_method_awq_folds_exactly_and_loads_in_llama_cpp(tiny, tmp_path, monkeypatch):
    """AWQ's scales are folded into both sides (norm and matrix, v rows and o columns, up rows and down columns),
    so at q8_0 llama.cpp's logits of the AWQ file are as near the float model's as plain q8_0's are. With alpha 1
    forced (the strongest scales; the search picks milder ones on this random model) an unfolded side shows: leaving
    v's rows unscaled gives ~9x plain q8_0's error."""
    from test_convert_gguf import TOKENS, llama_cpp_logits, transformers_logits

    import ondevice.quant.calibrated as calibrated
    from ondevice.cli import main
    from ondevice.formats.gguf import GGUFFile

    monkeypatch.setattr(calibrated, "AWQ_ALPHAS", (1.0,))
    out, plain = tmp_path / "awq.gguf", tmp_path / "plain.gguf"
    common = ["--to", "gguf", "--quant", "q8_0", "--pre", "gpt-2", "--no-progress"]
    assert main(["convert", str(tiny), *common, "--method", "awq", "--calib-chunks", "2", "-o", str(out)]) == 0
    assert main(["convert", str(tiny), *common, "-o", str(plain)]) == 0
    with GGUFFile(out) as a, GGUFFile(plain) as b:
        assert a.get("quantize.ondevice.method") == "awq"
        changed = {n for n in a.tensors if bytes(a.tensor_data(n)) != bytes(b.tensor_data(n))}
    layers = {f"blk.{i}.{role}.weight" for i in range(2) for role in
              ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert layers <= changed, sorted(layers - changed)
    reference = transformers_logits(tiny, TOKENS)
    rms = {path: float(np.sqrt(((llama_cpp_logits(path, TOKENS) - reference) ** 2).mean())) for path in (out, plain)}
    assert rms[out] < 1.5 * rms[plain], rms


@pytest.mark.parametrize("flags,message", [
    (("--method", "gptq", "--imatrix", "x.imatrix.gguf"), "--method gptq collects its own statistics"),
    (("--method", "imatrix"), "--method imatrix needs --imatrix FILE or --calibrate"),
    (("--method", "spinquant", "--calibrate"), "--method 'spinquant': choose one of imatrix, gptq, awq"),
    (("--method", "awq", "--imatrix", "x.imatrix.gguf"), "--method awq collects its own statistics"),
    (("--calib-chunks", "2"), "--calib-chunks needs --calibrate or --method gptq"),
    (("--calibrate", "--calib-chunks", "0"), "give at least 1 chunk"),
    (("--method", "gptq", "--quant", "f16"), "--quant f16 keeps the weights in float"),
])
def test_bad_method_combinations_are_one_line_errors(tiny, tmp_path, flags, message):
    args = ["convert", str(tiny), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), *flags]
    if "--quant" not in flags:
        args += ["--quant", "q4_0"]
    run = ondevice(*args)
    assert run.returncode == 1 and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def test_method_is_a_flag_of_the_targets_that_take_it(tiny, tmp_path):
    run = ondevice("convert", str(tiny), "--to", "hf", "--method", "awq", "-o", str(tmp_path / "m"))
    assert run.returncode == 1 and "--method does not apply to --to hf (it is for --to gguf, mlx, onnx, executorch)" \
        in run.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_awq_folded_tensors_leave_the_float_model_unchanged(tiny_models, arch, monkeypatch):
    """converters.base.awq_folded (what MLX and ONNX quantize in place of the source's tensors): the float model
    with the folded norms, matrices and biases computes the same logits as the source (biases: qwen2; q/k norms:
    qwen3; 1 + w norms: gemma3), to float32 rounding; alpha 1 forced (the strongest scales)."""
    import torch
    from ondevice.converters.base import awq_folded
    from transformers import AutoModelForCausalLM

    import ondevice.quant.calibrated as calibrated
    from ondevice.sources import open_source

    monkeypatch.setattr(calibrated, "AWQ_ALPHAS", (1.0,))
    src = tiny_models[arch]
    model = open_source(src)
    try:
        rounding = get_quant_type("q8_0")  # any rounding: the search needs one; the folded floats are exact
        types = {name: rounding if len(t.shape) == 2 and "layers." in name else get_quant_type("f32")
                 for name, t in model.tensors.items()}
        folded = awq_folded(model, types, 2, progress=False)
    finally:
        model.close()
    assert any("layernorm" in name for name in folded) and any("o_proj" in name for name in folded)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]])
    with torch.no_grad():
        before = hf(tokens).logits[0].numpy()
        state = hf.state_dict()
        for name, tensor in folded.items():
            state[name].copy_(torch.from_numpy(tensor.load()))
        after = hf(tokens).logits[0].numpy()
    assert np.abs(after - before).max() <= 1e-4 * max(1.0, float(np.abs(before).max())), arch

