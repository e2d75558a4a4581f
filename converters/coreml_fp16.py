"""fp16 range of the Core ML program: devices run it in fp16 (GPU, Neural Engine), where |x| > 65,504 is inf.

Small models park huge activations on their first token (an attention sink: SmolLM2-135M's residual stream
reaches ~25,000 there). The builder keeps every op in range by construction: RMSNorm divides a row by its
max |x| before squaring, and the residual stream is carried divided by a power of two (`residual_scale`, folded
exactly into the embedding output and the o/down projections, with the norms' eps scaled to match), chosen from
the float reference's residual range on the calibration text. After building, the program itself is run on the
calibration text (ondevice's interpreter, float32) and any fp16 op whose largest |value| leaves less than
HEADROOM x below fp16's maximum is refused by name: never a package that overflows on a phone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ondevice.decoder import run_decoder
from ondevice.errors import UnsupportedError
from ondevice.model import CanonicalModel
from ondevice.reference import FinalHiddenOps

FP16_MAX = 65504.0
HEADROOM = 4.0
CHECK_WINDOWS = 2  # calibration windows the range check runs (each opens at position 0, where the sink forms)


class _ResidualRangeOps(FinalHiddenOps):
    """The float reference up to the final norm, recording the largest |x| of the residual stream (embeddings
    and every residual)."""

    def __init__(self, model: CanonicalModel, windows: list[list[int]]) -> None:
        super().__init__(model, windows)
        self.largest = 0.0

    def _seen(self, x: np.ndarray) -> np.ndarray:
        self.largest = max(self.largest, float(np.abs(x).max()))
        return x

    def scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        return self._seen(super().scale(x, factor))

    def embed(self) -> np.ndarray:
        return self._seen(super().embed())

    def add(self, x: np.ndarray, y: np.ndarray, layer: int, what: str) -> np.ndarray:
        return self._seen(super().add(x, y, layer, what))


def residual_range(model: CanonicalModel, windows: list[list[int]]) -> float:
    """The residual stream's largest |x| over `windows` in the float reference."""
    ops = _ResidualRangeOps(model, windows)
    run_decoder(ops)
    return ops.largest


def residual_scale_for(largest: float) -> float:
    """The smallest power of two s with largest / s leaving HEADROOM x in fp16 (1 when it already does)."""
    need = largest * HEADROOM / FP16_MAX
    return float(2 ** math.ceil(math.log2(need))) if need > 1 else 1.0


def program_ranges(program: Any, windows: list[list[int]]) -> dict[str, float]:
    """Largest |value| of every float op of the built program over `windows`, each from an empty cache."""
    from ondevice.runners.coreml_interpreter import Interpreter

    interpreter = Interpreter(program)
    interpreter.ranges = {}
    for window in windows:
        interpreter.reset()
        interpreter.run({"input_ids": np.asarray([window], np.int32), "position": np.asarray([0], np.int32)})
    return {name: top for name, top in interpreter.ranges.items() if name in interpreter.fp16_results}


def check_headroom(ranges: dict[str, float]) -> float:
    """The smallest headroom (fp16 max / op max) of the program; refuses one below HEADROOM."""
    name, top = max(ranges.items(), key=lambda item: item[1])
    headroom = FP16_MAX / top if top > 0 else math.inf
    if headroom < HEADROOM:
        raise UnsupportedError(f"coreml: op {name} reaches |x| = {top:,.0f} on the calibration text, "
                               f"{headroom:.1f}x below fp16's 65,504 (needs {HEADROOM:.0f}x): it would overflow "
                               f"on a device that computes in fp16")
    return headroom
