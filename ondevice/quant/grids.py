"""The grid a quantized GGUF tensor's codes live on, with its block parameters fixed: what error-feedback quantizers
(ondevice.quant.gptq) need to choose the codes themselves while keeping the type's bytes and scales.

Every supported type stores, per group of `group` weights along a row, a scale and a bias, and per weight a code
that selects one of a fixed set of levels: weight = scale * levels[code] + bias. Q4_0 is (d, -8 d, 0..15), Q4_K
(d * sc, -dmin * m, 0..15) per 32-weight sub-block, Q6_K (d * sc, -32 d sc, 0..63) per 16, IQ4_NL (d, 0, ggml's
16 non-uniform levels) ...

    grid = stored_grid(qtype, data, n)       # data: uint8 (rows, row_nbytes(n)) from qtype.quantize(...)
    codes = grid.nearest_codes(values)       # uint8 (rows, n): the nearest level of each value
    data = with_codes(qtype, data, codes)    # the same scales, these codes: bytes of the same type and size
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ondevice.errors import UnsupportedError
from ondevice.quant.base import QuantType, fp16_to_f32
from ondevice.quant.iquants import IQ4_XS, KVALUES
from ondevice.quant.iquants import _pack_codes as _pack_iq4_codes
from ondevice.quant.kquants import Q4_K, Q5_K, Q6_K, _unpack_q4k_scales
from ondevice.quant.legacy import _high_bits_mask, _split_halves

F32 = np.float32


@dataclass
class Grid:
    """scale, bias: float32 (rows, n / group); levels: float32 (L,), indexed by the stored code."""

    scale: np.ndarray
    bias: np.ndarray
    group: int
    levels: np.ndarray

    def __post_init__(self) -> None:
        self.uniform = bool(np.array_equal(self.levels, np.arange(len(self.levels), dtype=F32)))
        order = np.argsort(self.levels, kind="stable")
        self._sorted, self._order = self.levels[order], order.astype(np.uint8)
        self._midpoints = (self._sorted[1:] + self._sorted[:-1]) / F32(2)

    def round(self, values: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes uint8, the values they decode to) of `values` on the grid of the given block parameters (same
        shape, or one column with its blocks' scale and bias). A zero scale decodes to the bias whatever the code."""
        usable = scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(usable, (values - bias) / np.where(usable, scale, F32(1)), F32(0))
        if self.uniform:
            codes = np.clip(np.rint(t), 0, len(self.levels) - 1).astype(np.uint8)
        else:
            codes = self._order[np.searchsorted(self._midpoints, t)]
        return codes, (scale * self.levels[codes] + bias).astype(F32)

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        return np.repeat(per_group, self.group, axis=1)

    def nearest_codes(self, values: np.ndarray) -> np.ndarray:
        return self.round(values, self.expand(self.scale), self.expand(self.bias))[0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return (self.expand(self.scale) * self.levels[codes] + self.expand(self.bias)).astype(F32)


def _header(blocks: np.ndarray, start: int) -> np.ndarray:
    return fp16_to_f32(blocks[:, start:start + 2])


def _grid_legacy(blocks: np.ndarray, rows: int, qtype: QuantType) -> Grid:
    d = _header(blocks, 0)
    if qtype.name in ("q4_1", "q5_1"):
        bias = _header(blocks, 2)
    else:
        bias = d * F32({"q4_0": -8, "q5_0": -16, "q8_0": -128}[qtype.name])
    count = {"q4_0": 16, "q4_1": 16, "q5_0": 32, "q5_1": 32, "q8_0": 256}[qtype.name]
    return Grid(d.reshape(rows, -1), bias.reshape(rows, -1), 32, np.arange(count, dtype=F32))


def _grid_k(blocks: np.ndarray, rows: int, qtype: QuantType) -> Grid:
    scales, mins = _unpack_q4k_scales(blocks[:, 4:16])
    scale = _header(blocks, 0)[:, None] * scales.astype(F32)
    bias = -_header(blocks, 2)[:, None] * mins.astype(F32)
    return Grid(scale.reshape(rows, -1), bias.reshape(rows, -1), 32, np.arange(qtype.nmax + 1, dtype=F32))


def _grid_q6_k(blocks: np.ndarray, rows: int, qtype: QuantType) -> Grid:
    scale = _header(blocks, 208)[:, None] * blocks[:, 192:208].view(np.int8).astype(F32)
    return Grid(scale.reshape(rows, -1), (scale * F32(-32)).reshape(rows, -1), 16, np.arange(64, dtype=F32))


def _grid_iq4_nl(blocks: np.ndarray, rows: int, qtype: QuantType) -> Grid:
    d = _header(blocks, 0).reshape(rows, -1)
    return Grid(d, np.zeros_like(d), 32, KVALUES.astype(F32))


def _grid_iq4_xs(blocks: np.ndarray, rows: int, qtype: QuantType) -> Grid:
    scale = IQ4_XS.block_scales(blocks).reshape(rows, -1)
    return Grid(scale, np.zeros_like(scale), 32, KVALUES.astype(F32))


def _pack_legacy(blocks: np.ndarray, codes: np.ndarray, qtype: QuantType) -> None:
    codes = codes.reshape(-1, 32)
    if qtype.name == "q8_0":
        blocks[:, 2:] = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        return
    head = 4 if qtype.name in ("q4_1", "q5_1") else 2
    if qtype.name in ("q5_0", "q5_1"):
        blocks[:, head:head + 4] = _high_bits_mask(codes)
        head += 4
    blocks[:, head:] = _split_halves(codes & 0x0F)


def _pack_k(blocks: np.ndarray, codes: np.ndarray, qtype: QuantType) -> None:
    blocks[:, 16:] = type(qtype)._pack_codes(codes.reshape(-1, 4, 2, 32))


def _pack_q6_k(blocks: np.ndarray, codes: np.ndarray, qtype: QuantType) -> None:
    blocks[:, :192] = Q6_K.pack_codes(codes.reshape(-1, 256))


def _pack_iq4_nl(blocks: np.ndarray, codes: np.ndarray, qtype: QuantType) -> None:
    blocks[:, 2:] = _pack_iq4_codes(codes.reshape(-1, 32))


def _pack_iq4_xs(blocks: np.ndarray, codes: np.ndarray, qtype: QuantType) -> None:
    blocks[:, 8:] = _pack_iq4_codes(codes.reshape(-1, 32)).reshape(len(blocks), 128)


_Reader = Callable[[np.ndarray, int, QuantType], Grid]
_Packer = Callable[[np.ndarray, np.ndarray, QuantType], None]
GRID_TYPES: dict[str, tuple[_Reader, _Packer]] = {
    **{name: (_grid_legacy, _pack_legacy) for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")},
    "q4_k": (_grid_k, _pack_k),
    "q5_k": (_grid_k, _pack_k),
    "q6_k": (_grid_q6_k, _pack_q6_k),
    "iq4_nl": (_grid_iq4_nl, _pack_iq4_nl),
    "iq4_xs": (_grid_iq4_xs, _pack_iq4_xs),
}
assert isinstance(Q4_K.nmax, int) and Q5_K.nmax == 31  # _grid_k's level counts


# Types whose block is (fp16 scale d at byte 0, codes) with weight = d * (levels[code] + ratio): their scales can be
# re-fitted to given codes (ondevice.quant.gptq.refit_scales) and written back (with_scales).
SCALE_RATIOS = {"q4_0": -8.0, "q5_0": -16.0, "q8_0": -128.0, "iq4_nl": 0.0}


def has_grid(qtype: QuantType) -> bool:
    return qtype.name in GRID_TYPES


def stored_grid(qtype: QuantType, data: np.ndarray, n: int) -> Grid:
    """The block parameters `data` (rows of `n` weights as `qtype`) stores, as a Grid."""
    if not has_grid(qtype):
        raise UnsupportedError(f"{qtype.name} has no code grid for error-feedback quantization")
    rows = qtype.checked_rows(data, n)
    return GRID_TYPES[qtype.name][0](rows.reshape(-1, qtype.type_size), len(rows), qtype)


def with_codes(qtype: QuantType, data: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """A copy of `data` with its codes replaced by `codes` (uint8 (rows, n), stored code values)."""
    n = codes.shape[-1]
    out = qtype.checked_rows(data, n).copy()
    GRID_TYPES[qtype.name][1](out.reshape(-1, qtype.type_size), codes.astype(np.uint8), qtype)
    return out.reshape(np.shape(data))


def with_scales(qtype: QuantType, data: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A copy of `data` (a SCALE_RATIOS type) with its blocks' scales replaced by `scale` (float32 (rows, n / 32)),
    rounded to the fp16 the block stores."""
    if qtype.name not in SCALE_RATIOS:
        raise UnsupportedError(f"{qtype.name} does not store one fp16 scale per block")
    out = np.array(data, dtype=np.uint8, copy=True)
    blocks = out.reshape(-1, qtype.type_size)
    blocks[:, 0:2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    return out
