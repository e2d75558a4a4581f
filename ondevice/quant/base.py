"""The QuantType interface shared by every GGML tensor type, plus the helpers the block formats use.

Every type turns float32 rows (numpy shape (..., n), rows on the last axis) into the exact bytes GGML stores
for that row, and back. Quantizers that claim byte-compatibility with llama.cpp reproduce its float32
arithmetic step by step (numpy float32 operations round after every operation, as SSE code does), so the
helpers here avoid anything that would silently widen to float64 or reorder a sum.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterator, Sequence

import numpy as np

from ondevice.errors import InvalidModelError, UnsupportedError

F32 = np.float32


class QuantType(ABC):
    """One GGML tensor type: its block geometry and its row quantizer/dequantizer."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int

    def row_nbytes(self, n: int) -> int:
        """Bytes taken by one row of `n` weights."""
        if n <= 0 or n % self.block_size:
            raise UnsupportedError(
                f"a row of {n} weights cannot be stored as {self.name}: the row width must be a positive "
                f"multiple of {self.block_size}; pick another type for this tensor"
            )
        return n // self.block_size * self.type_size

    def quantize(self, x: np.ndarray, *, name: str | None = None, importance: np.ndarray | None = None) -> np.ndarray:
        """float (..., n) -> uint8 (..., row_nbytes(n)). `name` (the tensor's) only improves error messages.

        `importance`: float32 (n,) per-column weights (an imatrix's sums / count). Types that take them
        (takes_importance) write what ggml_quantize_chunk(type, ..., imatrix) writes; the others ignore them."""
        x = np.asarray(x)
        if x.ndim == 0:
            raise UnsupportedError(f"cannot quantize a 0-d array to {self.name}: give rows of shape (..., n)")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise UnsupportedError(f"cannot quantize an array of dtype {x.dtype} to {self.name}")
        n = x.shape[-1]
        nbytes = self.row_nbytes(n)
        rows = np.ascontiguousarray(x.reshape(-1, n), dtype=np.float32)
        check_finite(rows, name)
        if importance is not None and self.takes_importance:
            out = self._quantize_rows_weighted(rows, checked_importance(importance, n, name))
        else:
            out = self._quantize_rows(rows)
        return out.reshape(*x.shape[:-1], nbytes)

    def dequantize(self, data: np.ndarray, n: int) -> np.ndarray:
        """uint8 (..., row_nbytes(n)) -> float32 (..., n)."""
        data = np.asarray(data)
        return self._dequantize_rows(self.checked_rows(data, n), n).reshape(*data.shape[:-1], n)

    def checked_rows(self, data: np.ndarray, n: int) -> np.ndarray:
        """Stored rows of `n` weights, validated -> contiguous uint8 (rows, row_nbytes(n))."""
        data = np.asarray(data)
        nbytes = self.row_nbytes(n)
        if data.dtype != np.uint8:
            raise InvalidModelError(f"{self.name} data must be raw bytes (uint8), got dtype {data.dtype}")
        if data.ndim == 0 or data.shape[-1] != nbytes:
            raise InvalidModelError(
                f"{self.name} data of shape {data.shape} does not hold rows of {n} weights "
                f"(expected a last axis of {nbytes} bytes); the file is truncated or its shape is wrong"
            )
        return np.ascontiguousarray(data).reshape(-1, nbytes)

    def affine_codes(self, data: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The stored 4-bit grid as (codes uint8 (rows, n) in 0..15, scale, bias float32 (rows, n / block_size)),
        with weight = scale * code + bias exactly; None for types that are not a 4-bit affine grid. Writers whose
        target format is affine 4-bit in the same blocks copy the grid instead of re-quantizing onto a second one."""
        return None

    # Subclasses with per-block formats implement _quantize_blocks/_dequantize_blocks; the row methods
    # split the work into bounded chunks of independent blocks.
    chunk_blocks: int = 32768
    # Types whose ggml quantizer weights its error by an importance vector implement _quantize_weighted.
    takes_importance: bool = False

    def _quantize_rows_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        n = rows.shape[1]
        out = np.empty((rows.shape[0], self.row_nbytes(n)), dtype=np.uint8)
        kernels = native_kernels() if self.native_weighted else None
        if kernels is not None and kernels.quantize_rows(out, rows, self.ggml_type, n, importance):
            return out
        per_chunk = max(1, self.chunk_blocks * self.block_size // n)
        for part in chunks(rows.shape[0], per_chunk):
            out[part] = self._quantize_weighted(rows[part], importance).reshape(len(out[part]), -1)
        return out

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        """float32 rows (r, n), finite, and importance (n,) -> uint8 (r * n / block_size, type_size)."""
        raise NotImplementedError

    # The C kernels quantize these types (kernels/quantize.c: the same bytes, threaded); numpy stays the
    # reference, and the path for the rest and for a scale overflow's error message.
    native: bool = False
    # ... and with importance weights too (od_quantize_rows_imatrix).
    native_weighted: bool = False

    def _quantize_rows(self, rows: np.ndarray) -> np.ndarray:
        n = rows.shape[1]
        out = np.empty((rows.shape[0], self.row_nbytes(n)), dtype=np.uint8)
        kernels = native_kernels() if self.native else None
        if kernels is not None and kernels.quantize_rows(out, rows, self.ggml_type, n):
            return out
        blocks_in = rows.reshape(-1, self.block_size)
        blocks_out = out.reshape(-1, self.type_size)
        for part in chunks(blocks_in.shape[0], self.chunk_blocks):
            blocks_out[part] = self._quantize_blocks(blocks_in[part])
        return out

    def _dequantize_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        out = np.empty((rows.shape[0], n), dtype=np.float32)
        blocks_in = rows.reshape(-1, self.type_size)
        blocks_out = out.reshape(-1, self.block_size)
        for part in chunks(blocks_in.shape[0], self.chunk_blocks):
            blocks_out[part] = self._dequantize_blocks(blocks_in[part])
        return out

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """float32 (nb, block_size), finite -> uint8 (nb, type_size)."""
        raise NotImplementedError

    def _dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 (nb, type_size) -> float32 (nb, block_size)."""
        raise NotImplementedError

    # Types are values: two objects naming the same GGML type are the same type.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantType):
            return NotImplemented
        return self.name == other.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<QuantType {self.name} (ggml {self.ggml_type}): {self.block_size} weights in {self.type_size} bytes>"


class WeightedSearchType(QuantType):
    """A type whose ggml quantizer is one search with optional per-weight importance (Q6_K, IQ4_NL, IQ4_XS):
    subclasses implement _from_search(blocks (nb, block_size), importance per weight (nb, block_size) or None)."""

    takes_importance = True

    def _quantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        return self._from_search(blocks, None)

    def _quantize_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        qw = np.broadcast_to(importance.reshape(1, -1), rows.shape).reshape(-1, self.block_size)
        return self._from_search(rows.reshape(-1, self.block_size), qw)

    def _from_search(self, blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError


def native_kernels():  # type: ignore[no-untyped-def]
    """ondevice._kernels when built (its quantize_rows), else None: the numpy quantizers then do the work."""
    try:
        from ondevice import _kernels
    except ImportError:
        return None
    return _kernels if hasattr(_kernels, "quantize_rows") and not _NUMPY_ONLY else None


# Test hook: force the numpy quantizers (tests compare the two paths).
_NUMPY_ONLY = False


def check_finite(rows: np.ndarray, name: str | None) -> None:
    """Refuse NaN/Inf weights: every GGML quantizer turns them into garbage scales without a warning."""
    # A float64 sum propagates NaN/Inf without allocating a mask the size of the tensor; locate only on failure.
    if np.isfinite(np.sum(rows, dtype=np.float64)):
        return
    bad = ~np.isfinite(rows)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        what = f"tensor {name!r}" if name else "the tensor"
        raise InvalidModelError(
            f"{what} has a non-finite weight ({rows[row, col]}) at row {row}, column {col}; "
            "the source checkpoint is corrupt or was saved after a diverged training step"
        )


def checked_importance(importance: np.ndarray, n: int, name: str | None) -> np.ndarray:
    """An importance vector for rows of n weights: float32 (n,), finite and >= 0."""
    what = f"tensor {name!r}" if name else "the tensor"
    weights = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if weights.size != n:
        raise InvalidModelError(f"importance weights of {weights.size} values for {what}, whose rows have {n}; "
                                "the imatrix was computed for another model")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise InvalidModelError(f"importance weights for {what} are negative or not finite; recompute the imatrix")
    return weights


def row_sigma2(rows: np.ndarray, factor: int = 1) -> np.ndarray:
    """ggml's per-row `sigma2 = factor * sum(x*x) / n` (the sum in index order): float32 (r,)."""
    squares = np.ascontiguousarray((rows * rows).T)
    return F32(factor) * sequential_sum(squares) / F32(rows.shape[1])


def fp16_bits(values: np.ndarray, what: str) -> np.ndarray:
    """float32 scales -> their fp16 bytes (round to nearest even, as GGML_FP32_TO_FP16 does), as uint8 (..., 2).

    A finite scale that overflows fp16 would decode as Inf: refuse instead of writing a broken block.
    """
    with np.errstate(over="ignore"):  # reported below
        half = values.astype("<f2")
    if not np.isfinite(half).all():
        raise UnsupportedError(
            f"weights are too large for the fp16 block scales of {what} (largest |scale| "
            f"{float(np.abs(values).max()):.4g} > 65504); store this tensor as f32 or bf16"
        )
    return half.reshape(*half.shape, 1).view(np.uint8)


def fp16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint8 (..., 2) little-endian fp16 -> float32 (...)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int(): round half to even on a float32 (the 1.5*2^23 trick) -> int32."""
    return np.rint(v).astype(np.int32)


def sequential_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in index order, like the C loops `acc += term[i]`.

    numpy reduces a non-innermost axis row by row (no pairwise summation), so with the element index on
    axis 0 the float32 rounding matches llama.cpp's sequential accumulation exactly (tests check this).
    """
    return np.add.reduce(terms, axis=0)


def chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def pack_nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Two arrays of 4-bit codes -> bytes with `low` in bits 0-3 and `high` in bits 4-7."""
    return (low.astype(np.uint8) & 0x0F) | (high.astype(np.uint8) << 4)


def shape_elements(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
