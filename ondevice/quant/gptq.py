"""GPTQ (Frantar et al., 2022) onto an asymmetric 4-bit grid in blocks along the input: weight = scale * code + bias,
code in 0..15, one (scale, bias) per block, the same form as Q4_1.

Plain rounding minimizes each weight's own error; GPTQ minimizes the error of the layer's output on calibration
inputs, E||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T) with H = E[x x^T]: columns are rounded one at a time (most
important first, "act-order") and each rounding error is pushed onto the columns not yet rounded, weighted by the
inverse Hessian. Block parameters are fixed up front from the original weights ("static groups"), so the blocks
stay contiguous runs of the input, as the targets' blockwise formats need.

    codes, scale, bias = gptq_affine_4bit(weight, hessian, block=32)   # weight (N, K) float32, hessian (K, K)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ondevice.quant.affine import LEVELS, affine_block_params
from ondevice.quant.grids import Grid

LAZY_COLUMNS = 64  # columns updated together before the rest of the matrix is touched (one matmul per batch)


def gptq_affine_4bit(weight: np.ndarray, hessian: np.ndarray, block: int = 32, damp: float = 0.1,
                     params: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 codes (N, K), float32 scale (N, K / block), float32 bias (N, K / block)) minimizing the output error
    on inputs with second moment `hessian`. `damp` (fraction of the mean diagonal added to it) keeps H invertible
    and pulls the solution toward plain rounding, which generalizes beyond the calibration text. `params`: the
    blocks' (scale, bias) to use instead of affine_block_params' (e.g. rounded to what the target stores)."""
    rows, cols = weight.shape
    if cols % block or hessian.shape != (cols, cols):
        raise ValueError(f"gptq: weight {weight.shape}, block {block}, hessian {hessian.shape} do not fit")
    scale, bias = params if params is not None else affine_block_params(weight, block)
    grid = Grid(scale, bias, block, np.arange(LEVELS + 1, dtype=np.float32))
    return gptq_codes(weight, prepare_hessian(hessian, damp), grid), scale, bias


@dataclass
class PreparedHessian:
    """H damped, its column order (largest diagonal first, "act-order") and the upper Cholesky factor of H^-1 in
    that order: row j holds how column j's rounding error spreads onto the later columns. One per layer input,
    shared by the matrices that read it (q/k/v, gate/up)."""

    order: np.ndarray
    inverse_factor: np.ndarray


def prepare_hessian(hessian: np.ndarray, damp: float, act_order: bool = True, shrink: float = 0.0) -> PreparedHessian:
    """`shrink`: weight of diag(H) in (1 - shrink) H + shrink diag(H), pulling the estimate toward the diagonal
    objective of importance-weighted rounding (what an imatrix minimizes) rather than toward plain rounding: a
    calibration text of a few thousand tokens estimates H's off-diagonal part poorly, and GPTQ then overfits it."""
    h = damped_hessian(hessian, damp, shrink)
    cols = len(h)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    h = h[np.ix_(order, order)]
    return PreparedHessian(order, np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32))


def damped_hessian(hessian: np.ndarray, damp: float, shrink: float = 0.0) -> np.ndarray:
    """float64 H as GPTQ minimizes against it (prepare_hessian's `damp` and `shrink`)."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # inputs that never fire: their weights do not matter, round them plainly
    h[dead, dead] = 1.0
    if shrink:
        h = (1.0 - shrink) * h + shrink * np.diag(np.diag(h))
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return h


def refit_scales(weight: np.ndarray, hessian: np.ndarray, grid: Grid, codes: np.ndarray,
                 bias_ratio: float) -> np.ndarray:
    """float32 block scales (N, K / group) minimizing tr((W - Q) H (W - Q)^T) with the codes fixed, on a grid
    whose bias is `bias_ratio` times its scale (Q = scale * (levels[code] + bias_ratio): Q4_0, Q5_0, Q8_0,
    IQ4_NL). GPTQ chose the codes for the scales plain quantization picked; with the codes known, each row's
    scales are the solution of a small linear system (one unknown per block) under the layer's full H."""
    rows, cols = weight.shape
    g = grid.group
    nb = cols // g
    unit = (grid.levels[codes] + np.float32(bias_ratio)).astype(np.float64)  # Q / scale, per weight
    rhs = (unit * (weight.astype(np.float64) @ hessian)).reshape(rows, nb, g).sum(-1)
    system = np.empty((rows, nb, nb))
    for c in range(nb):
        # column c of each row's system: sum over block c's weights j of H[i, j] * unit[j], block-summed over i
        spread = unit[:, c * g:(c + 1) * g] @ hessian[:, c * g:(c + 1) * g].T
        system[:, :, c] = (unit * spread).reshape(rows, nb, g).sum(-1)
    # a block whose codes all decode to 0 leaves its scale free: a tiny pull toward the old scale keeps it
    diag = np.einsum("rbb->rb", system)
    ridge = 1e-9 * (diag.mean(axis=1, keepdims=True) + 1e-30)
    system[:, np.arange(nb), np.arange(nb)] += ridge
    rhs += ridge * grid.scale
    return np.linalg.solve(system, rhs[..., None])[..., 0].astype(np.float32)


@dataclass
class BlockOpener:
    """"Dynamic groups" for gptq_codes: a block's grid parameters are chosen when GPTQ first reaches one of its
    `unit` columns, from the block's weights as the error feedback has left them (none of its columns is rounded
    before), instead of being fixed up front. choose(block, current (N, unit)) -> (scale, bias), (N, unit / group)."""

    unit: int
    choose: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def gptq_codes(weight: np.ndarray, hessian: PreparedHessian, grid: Grid, opener: BlockOpener | None = None) -> np.ndarray:
    """uint8 codes (N, K) on `grid` (its block parameters fixed: "static groups", so blocks stay contiguous runs of
    the input whatever the column order; with `opener`, each block's are chosen when it is first reached)
    minimizing tr((W - Q) H (W - Q)^T)."""
    rows, cols = weight.shape
    if grid.scale.shape[0] != rows or grid.scale.shape[1] * grid.group != cols or \
            hessian.inverse_factor.shape != (cols, cols):
        raise ValueError(f"gptq: weight {weight.shape}, grid {grid.scale.shape} x {grid.group}, hessian "
                         f"{hessian.inverse_factor.shape} do not fit")
    order, inverse_factor = hessian.order, hessian.inverse_factor
    work = weight[:, order].astype(np.float32)
    codes = np.empty((rows, cols), np.uint8)
    col_group = order // grid.group
    scale, bias = np.ascontiguousarray(grid.scale.T), np.ascontiguousarray(grid.bias.T)  # a column's row at a time
    if opener is not None:
        position = np.empty(cols, np.int64)
        position[order] = np.arange(cols)
        opened = np.zeros(cols // opener.unit, bool)
        per_block = opener.unit // grid.group
    for start in range(0, cols, LAZY_COLUMNS):
        stop = min(start + LAZY_COLUMNS, cols)
        batch = work[:, start:stop].copy()
        errors = np.empty_like(batch)
        factor = inverse_factor[start:stop, start:stop]
        for j in range(stop - start):
            if opener is not None and not opened[u := order[start + j] // opener.unit]:
                # the block's weights now: in the batch as updated, beyond it less this batch's errors so far
                at = position[u * opener.unit:(u + 1) * opener.unit]
                inside = at < stop
                current = np.empty((rows, opener.unit), np.float32)
                current[:, inside] = batch[:, at[inside] - start]
                later = at[~inside]
                current[:, ~inside] = work[:, later] - errors[:, :j] @ inverse_factor[start:start + j, later]
                block_scale, block_bias = opener.choose(int(u), current)
                scale[u * per_block:(u + 1) * per_block] = block_scale.T
                bias[u * per_block:(u + 1) * per_block] = block_bias.T
                opened[u] = True
            g = col_group[start + j]
            column = batch[:, j]
            code, value = grid.round(column, scale[g], bias[g])
            codes[:, order[start + j]] = code
            error = (column - value) / factor[j, j]
            batch[:, j:] -= np.outer(error, factor[j, j:])
            errors[:, j] = error
        work[:, stop:] -= errors @ inverse_factor[start:stop, stop:]
    return codes
