"""Activations for quantizers that minimize a layer's output error (ondevice.quant.gptq): the canonical model's
forward pass in float32 numpy over a bundled calibration text, which is not the text `ondevice eval` measures on.

The pass runs layer by layer over every calibration token at once, so only one layer's weights are in memory at a
time (the canonical tensors are lazy): ondevice/reference.py, the decoder every target builds, in numpy.

    hessian = output_layer_hessian(model)   # (hidden, hidden) float64: E[h h^T] of the final norm's output
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ondevice.model import CanonicalModel
from ondevice.reference import final_hidden_states

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration_text.txt"
WINDOW = 256  # tokens per window, each opened by the BOS when the tokenizer adds one
MAX_TOKENS = 16384


def calibration_windows(model: CanonicalModel, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(model.tokenizer_json)
    body = tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False).ids
    body = [t for t in body[:max_tokens] if 0 <= t < model.spec.vocab_size]
    prefix = [model.special.bos_id] if model.special.add_bos and model.special.bos_id is not None else []
    step = WINDOW - len(prefix)
    return [prefix + body[i:i + step] for i in range(0, len(body), step) if len(body[i:i + step]) >= 2]


def output_layer_hessian(model: CanonicalModel, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """E[h h^T] over the calibration tokens of the output layer's input h: (hidden, hidden) float64."""
    hidden = final_hidden_states(model, calibration_windows(model, max_tokens)).astype(np.float64)
    return hidden.T @ hidden / len(hidden)
