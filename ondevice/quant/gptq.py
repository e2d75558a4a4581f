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

import numpy as np

from ondevice.quant.affine import affine_block_params, affine_round

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
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0  # inputs that never fire: their weights do not matter, round them plainly
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(cols)
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[np.ix_(order, order)]
    # Upper Cholesky factor of H^-1: row j holds how column j's error spreads onto the later columns.
    inverse_factor = np.linalg.cholesky(np.linalg.inv(h)).T
    work = weight[:, order].astype(np.float32)
    codes = np.empty((rows, cols), np.uint8)
    col_block = order // block
    for start in range(0, cols, LAZY_COLUMNS):
        stop = min(start + LAZY_COLUMNS, cols)
        batch = work[:, start:stop].copy()
        errors = np.empty_like(batch)
        factor = inverse_factor[start:stop, start:stop].astype(np.float32)
        for j in range(stop - start):
            s, b = scale[:, col_block[start + j]], bias[:, col_block[start + j]]
            column = batch[:, j]
            code = affine_round(column, s, b)
            codes[:, order[start + j]] = code
            error = (column - (code * s + b)) / factor[j, j]
            batch[:, j:] -= np.outer(error, factor[j, j:])
            errors[:, j] = error
        work[:, stop:] -= errors @ inverse_factor[start:stop, stop:].astype(np.float32)
    return codes, scale, bias
