"""GPTQ onto Q4_1's grid, and the calibration forward pass that feeds it."""

from __future__ import annotations

import numpy as np
import pytest

from ondevice.quant.affine import affine_block_params
from ondevice.quant.gptq import gptq_affine_4bit


def correlated_inputs(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Inputs with a few dominant, correlated channels, as the hidden states of language models have; the
    correlation (`mix`) is the same for every draw: calibration and held-out inputs share their distribution."""
    mix = np.random.default_rng(1).standard_normal((width, width)) * 0.3 + np.eye(width)
    x = rng.standard_normal((n, width)) @ mix
    x[:, :4] *= 12.0
    return x.astype(np.float32)


def dequantize(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    block = codes.shape[1] // scale.shape[1]
    return (codes.reshape(*scale.shape, block) * scale[..., None] + bias[..., None]).reshape(codes.shape)


def test_gptq_beats_rounding_on_the_output_and_keeps_the_grid():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 128)).astype(np.float32)
    calibration, held_out = correlated_inputs(rng, 2048, 128), correlated_inputs(rng, 2048, 128)
    hessian = calibration.T.astype(np.float64) @ calibration / len(calibration)
    codes, scale, bias = gptq_affine_4bit(weight, hessian, block=32)
    assert codes.dtype == np.uint8 and codes.max() <= 15 and codes.shape == weight.shape
    # static groups: the blocks' parameters are those of plain rounding; only the codes differ
    ref_scale, ref_bias = affine_block_params(weight, 32)
    np.testing.assert_array_equal(scale, ref_scale)
    np.testing.assert_array_equal(bias, ref_bias)
    rounded = np.clip(np.rint((weight.reshape(256, 4, 32) - bias[..., None]) / scale[..., None]), 0, 15)
    rounded = dequantize(rounded.reshape(weight.shape), scale, bias)

    def output_error(w: np.ndarray) -> float:
        return float(np.mean((held_out @ (w - weight).T) ** 2))

    # measured on inputs it was not calibrated on: 0.43 x the output error of rounding to the nearest code
    assert output_error(dequantize(codes, scale, bias)) < 0.6 * output_error(rounded)


def test_gptq_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        gptq_affine_4bit(np.zeros((4, 48), np.float32), np.eye(48), block=32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_calibration_forward_matches_transformers(tiny_models, arch):
    import torch
    from transformers import AutoModelForCausalLM

    from ondevice.quant.calibration import calibration_windows, final_hidden_states
    from ondevice.sources import open_source

    model = open_source(str(tiny_models[arch]))
    try:
        windows = calibration_windows(model, max_tokens=600)
        assert len(windows) == 3 and all(len(w) <= 256 for w in windows)
        ours = final_hidden_states(model, windows)
    finally:
        model.close()
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    with torch.no_grad():
        ref = np.concatenate([hf.model(torch.tensor([w])).last_hidden_state[0].numpy() for w in windows])
    assert np.abs(ours - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))
