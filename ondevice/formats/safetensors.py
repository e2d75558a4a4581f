"""safetensors reading (mmap, validated, zero-copy) and streamed writing.

Format: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} with an
optional "__metadata__" map of strings, then the data. Offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ondevice.errors import InvalidModelError, UnsupportedError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# dtype name -> (numpy dtype of the stored bits, bytes per element)
_DTYPES: dict[str, str] = {
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",  # no numpy bf16: kept as raw bits, widened on load
    "F64": "<f8",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "U32": "<u4",
    "BOOL": "u1",
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class SafeTensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute in the file
    nbytes: int


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: one tensor-sized buffer, not two
    return wide.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


def release_pages(mapping: mmap.mmap | None, offset: int, nbytes: int) -> None:
    """Drop a consumed range of a read-only file mapping from our resident set.

    The pages stay in the OS page cache; they just stop counting toward this process's RSS, so streaming a
    model tensor by tensor keeps peak RSS near one tensor instead of growing to the file size.
    """
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = -(-offset // page) * page
    end = (offset + nbytes) // page * page
    if end > start:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise InvalidModelError(f"cannot open {self.path}: {exc.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        try:
            self._parse_header(size)
        except BaseException:
            self._fh.close()
            raise
        self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def _fail(self, what: str) -> InvalidModelError:
        return InvalidModelError(f"{self.path}: not a valid safetensors file ({what})")

    def _parse_header(self, size: int) -> None:
        head = self._fh.read(8)
        if len(head) < 8:
            raise self._fail("truncated header")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise self._fail(f"header length {hlen} is larger than the file")
        try:
            header = json.loads(self._fh.read(hlen))
        except ValueError:  # also a 5000-digit int, beyond Python's int-from-text limit
            raise self._fail("header is not valid JSON") from None
        except RecursionError:
            raise self._fail("header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        base = self._data_start = 8 + hlen
        self.tensors: dict[str, SafeTensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"bad entry for {name!r}") from None
            if not isinstance(dtype, str):
                raise self._fail(f"bad dtype for {name!r}")
            if dtype not in _DTYPES:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if not all(_is_count(d) for d in shape) or not all(_is_count(v) for v in (start, end)):
                raise self._fail(f"bad shape or offsets for {name!r}")
            # Python ints: a numpy int64 product wraps, and a wrapped size of 0 would match empty offsets.
            nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            if not 0 <= start <= end or end - start != nbytes or base + end > size:
                raise self._fail(f"tensor {name!r} offsets {start}..{end} do not match its shape or the file size")
            self.tensors[name] = SafeTensorInfo(name, dtype, shape, base + start, nbytes)
        self._check_disjoint()

    def _check_disjoint(self) -> None:
        """Two tensors sharing bytes would alias silently (a write to one is a write to the other): refuse it,
        whatever the order of the header entries."""
        base = self._data_start
        spans = sorted((t.offset - base, t.offset - base + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (start, end, name), (next_start, next_end, next_name) in zip(spans, spans[1:], strict=False):
            if next_start < end:
                raise self._fail(f"tensors {name!r} (data_offsets {start}..{end}) and {next_name!r} "
                                 f"({next_start}..{next_end}) overlap")

    def raw(self, name: str) -> np.ndarray:
        """The stored elements as a read-only numpy view (BF16 as uint16 bits)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=_DTYPES[info.dtype])
        arr = np.frombuffer(self._mmap, dtype=_DTYPES[info.dtype], count=info.nbytes // np.dtype(
            _DTYPES[info.dtype]).itemsize, offset=info.offset)
        return arr.reshape(info.shape)

    def load_f32(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(f"{self.path}: tensor {name!r} has dtype {info.dtype}; expected F32, F16 or BF16")
        data = self.raw(name)
        out = bf16_to_f32(data) if info.dtype == "BF16" else data.astype(np.float32)
        release_pages(self._mmap, info.offset, info.nbytes)
        return out

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass
        self._fh.close()


@dataclass
class PlannedSafeTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]


def write_safetensors(path: Path, tensors: Iterable[PlannedSafeTensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[PlannedSafeTensor], None] | None = None) -> int:
    """Stream tensors into a safetensors file (the caller handles atomicity); returns bytes written."""
    planned = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in planned:
        nbytes = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(_DTYPES[t.dtype]).itemsize
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for t in planned:
            data = np.ascontiguousarray(t.produce(), dtype=_DTYPES[t.dtype])
            if data.shape != tuple(t.shape):
                raise InvalidModelError(f"tensor {t.name!r}: produced shape {data.shape}, expected {t.shape}")
            fh.write(memoryview(data).cast("B"))
            if on_tensor is not None:
                on_tensor(t)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()
