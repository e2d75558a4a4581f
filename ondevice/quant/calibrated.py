"""Calibrated GGUF quantization beyond the imatrix: GPTQ on each tensor's own GGUF grid, layer by layer.

For every block matrix, in the order the forward pass reaches it:
1. H = E[x x^T] of its input over the calibration chunks, x computed by the model *as quantized so far* (the
   earlier matrices already replaced by their quantized values), so later layers correct what earlier ones broke;
2. the type's own quantizer with importance diag(H) (what `--imatrix` does, with these inputs) fixes every block's
   scales and mins: the bytes' layout, the scales, the file size are exactly `--imatrix`'s;
3. GPTQ re-chooses the codes on those fixed grids (ondevice.quant.grids), minimizing tr((W - Q) H (W - Q)^T),
   the layer's output error, instead of each weight's own error.
The quantized matrix then computes the layer's output for the next layers.

    tensors = gptq_tensors(model, types, chunks)   # GGUF name -> uint8 rows, for the tensors it quantized
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.architectures.base import permute_for_gguf, unpermute_from_gguf
from ondevice.model import CanonicalModel
from ondevice.quant.base import QuantType
from ondevice.quant.gptq import damped_hessian, gptq_codes, prepare_hessian, refit_scales
from ondevice.quant.grids import SCALE_RATIOS, has_grid, stored_grid, with_codes, with_scales

# Fraction of H's mean diagonal added to it, per input. Chosen on a split of the calibration text (H from chunks
# 0-15, output error measured on chunks 16-23; SmolLM2 q4_0, layers 3/15/27): less damping overfits the few
# thousand calibration tokens (GPTQ's error on the unseen chunks then exceeds plain rounding's, down_proj worst),
# more gives back the gain. down_proj's input is 2.7x wider than the others', so H has 7x the entries to estimate
# from the same tokens: it needs 10x the damping.
DAMP = 0.1
DAMP_DOWN = 1.0


@dataclass
class GptqReport:
    """Per tensor, the output error tr((W - Q) H (W - Q)^T) / tr(W H W^T) of the importance-weighted rounding
    alone and after GPTQ: how much the error feedback bought, measured on the calibration inputs."""

    rounding_error: dict[str, float] = field(default_factory=dict)
    gptq_error: dict[str, float] = field(default_factory=dict)

    def mean_ratio(self) -> float:
        ratios = [self.gptq_error[k] / self.rounding_error[k] for k in self.gptq_error if self.rounding_error[k] > 0]
        return float(np.mean(ratios)) if ratios else 1.0


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): the relative squared error of the layer's output on inputs with
    second moment H."""
    wide = weight.astype(np.float64)
    diff = wide - approx
    base = float(((wide @ hessian) * wide).sum())
    return float(((diff @ hessian) * diff).sum()) / base if base > 0 else 0.0


def gptq_matrix(qtype: QuantType, weight: np.ndarray, hessian: np.ndarray, damp: float = DAMP,
                prepared=None, refits: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(GPTQ's bytes, the importance-weighted rounding's bytes) of `weight` (float32 (N, K)) as `qtype`, on
    inputs of second moment `hessian` (K, K). With refits = 0 both have the same scales and only the codes differ;
    each refit (types with one fp16 scale per block, grids.SCALE_RATIOS) then re-fits the scales to the codes
    under the damped H and runs GPTQ again on them."""
    importance = np.diag(hessian).astype(np.float32)
    base = qtype.quantize(weight, importance=importance)
    prepared = prepared or prepare_hessian(hessian, damp)
    grid = stored_grid(qtype, base, weight.shape[1])
    codes = gptq_codes(weight, prepared, grid)
    ratio = SCALE_RATIOS.get(qtype.name)
    data = base
    if ratio is not None and refits > 0:
        damped = damped_hessian(hessian, damp)
        for _ in range(refits):
            scale = refit_scales(weight, damped, grid, codes, ratio)
            scale = np.where(np.isfinite(scale) & (np.abs(scale) < 6e4), scale, grid.scale)  # fp16's range
            data = with_scales(qtype, base, scale)
            grid = stored_grid(qtype, data, weight.shape[1])
            codes = gptq_codes(weight, prepared, grid)
    return with_codes(qtype, data, codes), base


def gptq_tensors(model: CanonicalModel, types: Mapping[str, QuantType], chunks: list[list[int]], *,
                 damp: float = DAMP, damp_down: float = DAMP_DOWN, skip_first: bool = False, refits: int = 0,
                 report: GptqReport | None = None,
                 on_layer: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """GPTQ'd bytes of every block matrix whose type (`types`: HF name -> QuantType) has a grid, keyed by GGUF
    name (rows in GGUF order: q/k permuted as llama.cpp stores them)."""
    from ondevice.decoder import run_decoder
    from ondevice.reference import FinalHiddenOps

    arch = get_architecture(model.spec.arch)
    spec = model.spec
    out: dict[str, np.ndarray] = {}

    class Sequential(FinalHiddenOps):
        def project(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[np.ndarray]:
            if on_layer is not None and "down" in roles:
                on_layer(layer)
            names = [self.tensor_name(role, layer) for role in roles]
            if not any(has_grid(types[name]) for name in names if name in types):
                return super().project(x, roles, layer, bias)
            fit = np.delete(x, self.bounds[:-1], axis=0) if skip_first else x  # without each chunk's BOS
            hessian = (fit.T @ fit).astype(np.float64) / len(fit)
            damping = damp_down if "down" in roles else damp
            prepared = prepare_hessian(hessian, damping)
            results = []
            for role, name in zip(roles, names, strict=True):
                qtype = types.get(name)
                if qtype is None or not has_grid(qtype):
                    results.append(super().project(x, (role,), layer, bias)[0])
                    continue
                weight = model.tensors[name].load().astype(np.float32)
                heads = arch.qk_heads(spec, name)
                if heads:
                    weight = permute_for_gguf(weight, heads)
                data, base = gptq_matrix(qtype, weight, hessian, damping, prepared, refits)
                gguf_name = arch.gguf_name(name)
                out[gguf_name] = data
                quantized = qtype.dequantize(data, weight.shape[1])
                if report is not None:
                    report.rounding_error[gguf_name] = output_error(weight, qtype.dequantize(base, weight.shape[1]),
                                                                    hessian)
                    report.gptq_error[gguf_name] = output_error(weight, quantized, hessian)
                if heads:
                    quantized = unpermute_from_gguf(quantized, heads)
                y = x @ quantized.T
                results.append(y + self.load(f"{role}_bias", layer) if bias else y)
            return results

    run_decoder(Sequential(model, chunks))
    return out
