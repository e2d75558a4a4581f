"""Calibrated quantization beyond the imatrix, layer by layer: AWQ's channel scales and GPTQ's codes on each
tensor's own grid.

For every block matrix, in the order the forward pass reaches it:
1. H = E[x x^T] of its input over the calibration chunks, x computed by the model *as quantized so far* (the
   earlier matrices already replaced by their quantized values), so later layers correct what earlier ones broke;
2. with awq, a per-input-channel scale (awq_scale) folded exactly into the norm before the matrix, or into the rows
   of the matrix that produces its input (v for o, up for down);
3. the type's own quantizer with importance diag(H) (what `--imatrix` does, with these inputs) fixes every block's
   scales and mins: the bytes' layout and the file size are exactly `--imatrix`'s;
4. with gptq, GPTQ re-chooses the codes on those fixed grids (ondevice.quant.grids), minimizing tr((W - Q) H (W - Q)^T),
   the layer's output error, instead of each weight's own error.
The quantized matrix then computes the layer's output for the next layers.

    tensors = calibrated_tensors(model, types, chunks, awq=True)   # GGUF name -> bytes, for the tensors it changed
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ondevice.architectures import get_architecture
from ondevice.architectures.base import permute_for_gguf, unpermute_from_gguf
from ondevice.model import CanonicalModel
from ondevice.quant.base import QuantType
from ondevice.quant.gptq import BlockOpener, damped_hessian, gptq_codes, prepare_hessian, refit_scales
from ondevice.quant.grids import SCALE_RATIOS, has_grid, stored_grid, with_codes, with_scales

# Fraction of H's mean diagonal added to it, per input. Chosen on a split of the calibration text (H from chunks
# 0-15, output error measured on chunks 16-23; SmolLM2 q4_0, layers 3/15/27): less damping overfits the few
# thousand calibration tokens (GPTQ's error on the unseen chunks then exceeds plain rounding's, down_proj worst),
# more gives back the gain. down_proj's input is 2.7x wider than the others', so H has 7x the entries to estimate
# from the same tokens: it needs 10x the damping.
DAMP = 0.1
DAMP_DOWN = 1.0

# The matrices that read one RMSNorm's output, and that norm: an input-channel scale s folds exactly into them
# (W diag(s), the norm's weight / s), which is how AWQ's scales reach a GGUF without a new tensor.
NORM_BEFORE = {("q", "k", "v"): "attn_norm", ("gate", "up"): "ffn_norm"}
# AWQ's exponents tried: s = (mean |x| per channel)^alpha.
AWQ_ALPHAS = tuple(np.round(np.arange(0.0, 1.01, 0.1), 2))
FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass
class GptqReport:
    """Per tensor, the output error tr((W - Q) H (W - Q)^T) / tr(W H W^T) of the importance-weighted rounding
    alone and after GPTQ: how much the error feedback bought, measured on the calibration inputs."""

    rounding_error: dict[str, float] = field(default_factory=dict)
    gptq_error: dict[str, float] = field(default_factory=dict)

    def mean_ratio(self) -> float:
        ratios = [self.gptq_error[k] / self.rounding_error[k] for k in self.gptq_error if self.rounding_error[k] > 0]
        return float(np.mean(ratios)) if ratios else 1.0


def output_energy(m: np.ndarray, hessian: np.ndarray) -> float:
    """tr(M H M^T): the summed squared output of M on inputs with second moment H (in H's dtype)."""
    return float(((m @ hessian) * m).sum())


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): the relative squared error of the layer's output on inputs with
    second moment H."""
    wide = weight.astype(np.float64)
    base = output_energy(wide, hessian)
    return output_energy(wide - approx, hessian) / base if base > 0 else 0.0


def awq_scale(qtypes: list[QuantType], weights: list[np.ndarray], magnitude: np.ndarray,
              hessian: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-input-channel scale s, its alpha) for matrices that read the same input x: of s = magnitude^alpha
    (magnitude: mean |x| per channel), normalized to a geometric mean of 1, the one whose importance-weighted
    rounding of W diag(s) (then divided by s) has the least summed output error under H = E[x x^T] (AWQ, Lin et
    al. 2023, on each type's own quantizer). alpha = 0 is s = 1, the plain imatrix rounding, so the search never
    does worse on these inputs. Channels of equal magnitude get equal scales (how a shared scale is asked for)."""
    magnitude = np.maximum(np.asarray(magnitude, np.float64), 1e-8)
    importance = np.diag(hessian)
    h32 = hessian.astype(np.float32)  # only compares candidates: float32 halves the cost of the N x K x K products
    bases = [output_energy(weight, h32) for weight in weights]
    best, best_alpha, best_error = np.ones(len(magnitude)), 0.0, np.inf
    for alpha in AWQ_ALPHAS:
        scale = magnitude ** alpha
        scale /= np.exp(np.log(scale).mean())
        error = 0.0
        for qtype, weight, base in zip(qtypes, weights, bases, strict=True):
            scaled = (weight * scale).astype(np.float32)
            data = qtype.quantize(scaled, importance=(importance / scale**2).astype(np.float32))
            diff = weight - qtype.dequantize(data, weight.shape[1]) / scale.astype(np.float32)
            error += output_energy(diff, h32) / base if base > 0 else 0.0
        if error < best_error:
            best, best_alpha, best_error = scale, float(alpha), error
    return best.astype(np.float32), best_alpha


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


def gptq_dynamic_matrix(qtype: QuantType, weight: np.ndarray, hessian: np.ndarray, damp: float = DAMP,
                        prepared=None) -> tuple[np.ndarray, np.ndarray]:
    """(GPTQ's bytes, the importance-weighted rounding's bytes) of `weight` (float32 (N, K)) as `qtype`, as
    gptq_matrix, with "dynamic groups" (gptq.BlockOpener): columns in
    act-order as in gptq_matrix, but each stored block's parameters are chosen when GPTQ first reaches one of its
    columns, by the type's own importance-weighted quantizer on the block's weights as the error feedback has left
    them so far (gptq_matrix fixes them from the original weights)."""
    rows, cols = weight.shape
    unit = qtype.block_size  # the weights one stored block's parameters cover (32, or 256 for K-quants/IQ4_XS)
    if cols % unit or hessian.shape != (cols, cols):
        raise ValueError(f"gptq: weight {weight.shape}, {qtype.name} blocks of {unit}, hessian {hessian.shape}")
    importance = np.diag(hessian).astype(np.float32)
    base = qtype.quantize(weight, importance=importance)
    data = base.reshape(rows, cols // unit, qtype.type_size).copy()

    def choose(block: int, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = qtype.quantize(current, importance=importance[block * unit:(block + 1) * unit])
        data[:, block] = part.reshape(rows, qtype.type_size)
        grid = stored_grid(qtype, part, unit)
        return grid.scale, grid.bias

    # every block's parameters are replaced by choose() before use; the static grid gives the shapes and levels
    grid = stored_grid(qtype, data.reshape(rows, -1), cols)
    codes = gptq_codes(weight, prepared or prepare_hessian(hessian, damp), grid, BlockOpener(unit, choose))
    return with_codes(qtype, data.reshape(rows, -1), codes), base


def calibrated_tensors(model: CanonicalModel, types: Mapping[str, QuantType], chunks: list[list[int]], *,
                 damp: float = DAMP, damp_down: float = DAMP_DOWN, skip_first: bool = False, refits: int = 0,
                 dynamic: bool = False,
                 awq: bool = False, awq_pairs: bool = False, gptq: bool = True, report: GptqReport | None = None,
                 folded: dict[str, np.ndarray] | None = None,
                 on_layer: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """GPTQ'd bytes of every block matrix whose type (`types`: HF name -> QuantType) has a grid, keyed by GGUF
    name (rows in GGUF order: q/k permuted as llama.cpp stores them). awq: first scale the input channels of the
    matrices behind each RMSNorm by awq_scale (the norm's weight divided by it, returned too); gptq = False: the
    importance-weighted rounding instead of GPTQ's codes. awq_pairs: also scale v -> o and up -> down (pair_scales).
    folded: filled with the float tensors the scales changed, by HF name in the source's form (what a target
    without a GGUF grid quantizes itself: `types` then holds its quantizer, quantize() returning the rounded floats)."""
    from ondevice.decoder import run_decoder
    from ondevice.reference import FinalHiddenOps

    arch = get_architecture(model.spec.arch)
    spec = model.spec
    out: dict[str, np.ndarray] = {}

    def rounds(qtype: QuantType | None) -> bool:
        """Whether this pass quantizes a matrix of this type (GPTQ: the types with a grid; AWQ: every non-float
        one, so that later layers see it rounded); the others compute in float here."""
        if qtype is None or qtype.name in FLOAT_TYPES:
            return False
        return has_grid(qtype) or awq or awq_pairs

    # (role, layer) -> (AWQ scale of its input columns, its float weight already loaded by pair_scales)
    pending: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    class Sequential(FinalHiddenOps):
        def project(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[np.ndarray]:
            if on_layer is not None and "down" in roles:
                on_layer(layer)
            names = [self.tensor_name(role, layer) for role in roles]
            if not any(rounds(types.get(name)) for name in names):
                return super().project(x, roles, layer, bias)
            fit = np.delete(x, self.bounds[:-1], axis=0) if skip_first else x  # without each chunk's BOS
            hessian = (fit.T @ fit).astype(np.float64) / len(fit)
            damping = damp_down if "down" in roles else damp
            columns, loaded = {}, {}
            for role, name in zip(roles, names, strict=True):
                if (role, layer) in pending:
                    columns[role], loaded[name] = pending.pop((role, layer))
            rows = self.pair_scales(x, roles, layer, bias) if awq_pairs else {}
            if awq and roles in NORM_BEFORE:
                loaded = {name: model.tensors[name].load().astype(np.float32) for name in names}
                scale, x, hessian = self.fold_awq_scale(x, hessian, roles, names, loaded, layer)
                columns = {role: scale for role in roles}
            prepared = prepare_hessian(hessian, damping) if gptq else None
            results = []
            for role, name in zip(roles, names, strict=True):
                qtype = types.get(name)
                if not rounds(qtype):
                    results.append(super().project(x, (role,), layer, bias)[0])
                    continue
                weight = loaded[name] if name in loaded else model.tensors[name].load().astype(np.float32)
                if role in columns:
                    weight = weight * columns[role]
                if role in rows:
                    weight = weight / rows[role][:, None]
                if folded is not None and (role in columns or role in rows):
                    folded[name] = weight
                heads = arch.qk_heads(spec, name)
                if heads:
                    weight = permute_for_gguf(weight, heads)
                if gptq and has_grid(qtype) and dynamic:
                    data, base = gptq_dynamic_matrix(qtype, weight, hessian, damping, prepared)
                elif gptq and has_grid(qtype):
                    data, base = gptq_matrix(qtype, weight, hessian, damping, prepared, refits)
                else:  # the importance-weighted rounding (types without importance weights ignore it)
                    data = base = qtype.quantize(weight, importance=np.diag(hessian).astype(np.float32))
                gguf_name = arch.gguf_name(name)
                out[gguf_name] = data
                quantized = qtype.dequantize(data, weight.shape[1])
                if report is not None and has_grid(qtype):
                    report.rounding_error[gguf_name] = output_error(weight, qtype.dequantize(base, weight.shape[1]),
                                                                    hessian)
                    report.gptq_error[gguf_name] = output_error(weight, quantized, hessian)
                if heads:
                    quantized = unpermute_from_gguf(quantized, heads)
                y = x @ quantized.T
                results.append(y + self.scaled_bias(role, layer, rows.get(role)) if bias else y)
            return results

        def scaled_bias(self, role: str, layer: int, divisor: np.ndarray | None) -> np.ndarray:
            b = self.load(f"{role}_bias", layer)
            if divisor is None:
                return b
            b = (b / divisor).astype(np.float32)
            name = self.tensor_name(f"{role}_bias", layer)
            out[arch.gguf_name(name)] = types[name].quantize(b)
            if folded is not None:
                folded[name] = b
            return b

        def fold_awq_scale(self, x: np.ndarray, hessian: np.ndarray, roles: tuple[str, ...], names: list[str],
                           weights: dict[str, np.ndarray], layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """AWQ's scale s for the matrices `names` (float `weights`) behind one norm; records that norm's
            weight / s in `out` and returns (s, x / s, H of x / s): the matrices then quantize W diag(s) on that
            input."""
            scale, _alpha = awq_scale([types[name] for name in names], [weights[name] for name in names],
                                      np.abs(x).mean(axis=0), hessian)
            norm_name = self.tensor_name(NORM_BEFORE[roles], layer)
            norm = (self.norm_weight(NORM_BEFORE[roles], layer) / scale).astype(np.float32)  # the effective weight
            out[arch.gguf_name(norm_name)] = types[norm_name].quantize(norm)
            if folded is not None:
                folded[norm_name] = norm - np.float32(spec.norm_offset)
            inverse = (1.0 / scale).astype(np.float64)
            return scale, (x / scale).astype(np.float32), hessian * np.outer(inverse, inverse)

        def pair_scales(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool) -> dict[str, np.ndarray]:
            """AWQ scales of the matrices whose input is another matrix's output up to a per-channel product:
            o reads v through attention, down reads up through the gated activation. From this call's float
            outputs, s for the reader's input columns; returns the producer's row divisor, the reader's scale and
            weight wait in `pending`."""
            pairs = {("q", "k", "v"): ("v", "o"), ("gate", "up"): ("up", "down")}
            if roles not in pairs:
                return {}
            producer, reader = pairs[roles]
            outputs = dict(zip(roles, super().project(x, roles, layer, bias), strict=True))
            if roles == ("q", "k", "v"):
                q, k = outputs["q"], outputs["k"]
                if spec.qk_norm:
                    q = self.head_norm(q, "q_norm", layer, spec.n_heads)
                    k = self.head_norm(k, "k_norm", layer, spec.n_kv_heads)
                inputs = self.attention(q, k, outputs["v"], layer)
                # one scale per channel of a KV head, shared by the query heads that read it
                group = spec.n_heads // spec.n_kv_heads
                magnitude = np.abs(inputs).mean(axis=0).reshape(spec.n_kv_heads, group, spec.head_dim).mean(axis=1)
                magnitude = np.repeat(magnitude, group, axis=0).reshape(-1)
            else:
                inputs = self.gated_act(outputs["gate"], outputs["up"], layer)
                magnitude = np.abs(inputs).mean(axis=0)
            reader_name = self.tensor_name(reader, layer)
            hessian = (inputs.T @ inputs).astype(np.float64) / len(inputs)
            weight = model.tensors[reader_name].load().astype(np.float32)
            scale, _alpha = awq_scale([types[reader_name]], [weight], magnitude, hessian)
            pending[(reader, layer)] = scale, weight
            if roles == ("q", "k", "v"):
                return {producer: scale.reshape(spec.n_kv_heads, group, spec.head_dim)[:, 0].reshape(-1)}
            return {producer: scale}

    run_decoder(Sequential(model, chunks))
    return out
