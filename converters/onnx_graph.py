"""ONNX graph building blocks for the ONNX target: a node/initializer builder that streams weights into an
external-data file, and the weight quantizers whose layouts onnxruntime's kernels read.

Weight layouts:
- int4: com.microsoft MatMulNBits. For a linear layer with weight W (N outputs, K inputs), blocks of `block`
  consecutive inputs of one output: B is uint8 (N, K/block, block/2) with element 2i in the low nibble of byte i;
  scales float32 (N, K/block); weight = (code - zero_point) * scale. Symmetric (no zero points, zero point 8)
  or asymmetric (uint8 zero points, two per byte, low nibble first). Byte-identical to onnxruntime's own RTN
  quantizer (quantize_matmul_4bits, which onnxruntime-genai's model builder uses).
- int8: the same op with bits=8, one code per byte (onnxruntime-genai's int8). The embedding is gathered from
  the same layout with standard ops (GatherBlockQuantized takes 4-bit data only).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INLINE_MAX_BYTES = 1024  # smaller initializers (shapes, scalars) stay inside model.onnx
LARGE_ALIGN = 1 << 16  # big tensors start on 64 KiB boundaries so runtimes can mmap them
SMALL_ALIGN = 64


class ExternalData:
    """Appends initializer bytes to one external-data file and returns TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self._fh = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_MAX_BYTES:
            return numpy_helper.from_array(array, name)
        align = LARGE_ALIGN if array.nbytes >= (1 << 20) else SMALL_ALIGN
        pad = -self.offset % align
        if pad:
            self._fh.write(b"\0" * pad)
            self.offset += pad
        self._fh.write(memoryview(array).cast("B"))
        proto = TensorProto()
        proto.name = name
        proto.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        proto.dims.extend(array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()


class GraphBuilder:
    """Collects nodes and initializers; every value gets a readable unique name."""

    def __init__(self, data: ExternalData) -> None:
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: dict[str, int] = {}
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def fresh(self, base: str) -> str:
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def node(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | int = 1, domain: str = "",
             **attrs: object) -> list[str]:
        """Add a node; returns its output names (given ones name graph outputs)."""
        node_name = self.fresh(name)
        if isinstance(outputs, int):
            outputs = [f"{node_name}/out{i}" for i in range(outputs)] if outputs > 1 else [f"{node_name}/out"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs

    def op(self, op_type: str, inputs: list[str], name: str, out: str | None = None, domain: str = "",
           **attrs: object) -> str:
        """A single-output node; `out` names a graph output."""
        return self.node(op_type, inputs, name, [out] if out else 1, domain, **attrs)[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer streamed to the external-data file (the array can be freed afterwards)."""
        name = self.fresh(name)
        self.initializers.append(self.data.tensor(name, array))
        return name

    def const(self, values: object, dtype: type = np.int64) -> str:
        """A small constant initializer, shared between uses."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            self._consts[key] = self.weight(f"const/{array.dtype.name}_{len(self._consts)}", array)
        return self._consts[key]


# ------------------------------------------------------------------------------------------------ quantizers
def _round_half_away(v: np.ndarray) -> np.ndarray:
    """roundf() for v >= 0 (what onnxruntime's quantizer uses; negative values are clipped to 0 afterwards)."""
    low = np.floor(v)
    return low + (v - low >= 0.5)


def quantize_blocks(w: np.ndarray, block: int, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray | None]:
    """MatMulNBits round-to-nearest quantization of a (N, K) weight, byte-identical to onnxruntime's
    quantize_matmul_4bits / quantize_matmul_8bits: (B uint8 (N, K/block, block*bits/8), scales float32
    (N, K/block), zero points uint8 or None). K is zero-padded to a multiple of `block`.

    symmetric: scale = (the block's max or min, whichever is larger in magnitude) / -2^(bits-1), zero point
    2^(bits-1) (implicit).
    asymmetric: the block's range widened to include 0, scale = (max - min) / (2^bits - 1),
    zero point = round(-min / scale). code = clip(round(x / scale + zero point), 0, 2^bits - 1).
    4-bit codes and zero points are packed two per byte, the first in the low nibble.
    """
    n, k = w.shape
    top = np.float32((1 << bits) - 1)
    w = w.astype(np.float32, copy=False)
    if k % block:
        w = np.pad(w, ((0, 0), (0, -k % block)))
    x = w.reshape(n, -1, block)
    if symmetric:
        low, high = x.min(axis=-1), x.max(axis=-1)
        edge = np.where(np.abs(high) > np.abs(low), high, low)  # on a tie of magnitudes the minimum wins
        scales = edge / np.float32(-(1 << (bits - 1)))
        zero = np.full(scales.shape, 1 << (bits - 1), np.float32)
    else:
        low = np.minimum(x.min(axis=-1), np.float32(0))
        high = np.maximum(x.max(axis=-1), np.float32(0))
        scales = (high - low) / top
        has_range = scales != 0
        zero_f = np.where(has_range, -low / np.where(has_range, scales, np.float32(1)), low)
        zero = np.clip(_round_half_away(zero_f), 0, top).astype(np.float32)
    nonzero = scales != 0
    inverse = np.where(nonzero, np.float32(1) / np.where(nonzero, scales, np.float32(1)), np.float32(0))
    codes = np.clip(_round_half_away(x * inverse[..., None] + zero[..., None]), 0, top).astype(np.uint8)
    zero_points = None if symmetric else zero.astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        if zero_points is not None:
            if zero_points.shape[1] % 2:
                zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
    return codes, scales.astype(np.float32), zero_points


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                      k: int) -> np.ndarray:
    """The (N, K) float32 weight a MatMulNBits (B, scales, zero points) triple stands for."""
    n, blocks, _ = packed.shape
    if bits == 4:
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, blocks, -1)
    else:
        codes = packed
    if zero_points is None:
        zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif bits == 4:
        zero = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        zero = zero_points
    centered = codes.astype(np.float32) - zero.astype(np.float32)[..., None]
    return (centered * scales[..., None]).reshape(n, -1)[:, :k]
