"""GGUF v2/v3 reading (validating, mmap, zero-copy) and writing (streamed, atomic).

The reader treats the file as hostile: every count, length, dimension and offset is checked against the
file size before anything is read or sliced, so a truncated or crafted file gives an InvalidModelError,
never a crash, a hang or a read outside the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.errors import InvalidModelError, UnsupportedError
from ondevice.formats.atomic import atomic_output

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

# Sanity caps for hostile files; real models are far below them.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_DIMS = 4
MAX_NAME_BYTES = 1 << 16
MAX_ARRAY_DEPTH = 2


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TypedValue:
    """A metadata value with its GGUF type; arrays carry their element type."""

    type: ValueType
    value: Any
    element_type: ValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: slowest-varying first (GGUF stores the reverse)
    ggml_type: int
    offset: int  # absolute offset of the data in the file
    nbytes: int


def _tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    from ondevice.quant import quant_type_for_ggml

    qtype = quant_type_for_ggml(ggml_type)
    n_per_row = shape[-1] if shape else 1
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    if n_per_row % qtype.block_size:
        raise InvalidModelError(
            f"tensor row width {n_per_row} is not a multiple of the {qtype.name} block size {qtype.block_size}"
        )
    return rows * (n_per_row // qtype.block_size) * qtype.type_size


class _Cursor:
    """Bounds-checked little-endian reader over a buffer."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> InvalidModelError:
        return InvalidModelError(f"{self.path}: not a valid GGUF file ({what} at byte {self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated {what}")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, vtype: ValueType, what: str) -> Any:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def string(self, what: str, max_len: int | None = None) -> str:
        length = self.u64(f"{what} length")
        if max_len is not None and length > max_len:
            raise self.fail(f"{what} of {length} bytes exceeds the limit of {max_len}")
        raw = self.take(length, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> TypedValue:
        try:
            vtype = ValueType(vtype)
        except ValueError:
            raise self.fail(f"unknown value type {vtype} in {what}") from None
        if vtype == ValueType.STRING:
            return TypedValue(vtype, self.string(what))
        if vtype != ValueType.ARRAY:
            return TypedValue(vtype, self.scalar(vtype, what))
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"arrays nested too deeply in {what}")
        elem_raw = self.u32(f"{what} element type")
        try:
            elem = ValueType(elem_raw)
        except ValueError:
            raise self.fail(f"unknown array element type {elem_raw} in {what}") from None
        count = self.u64(f"{what} count")
        remaining = len(self.buf) - self.pos
        min_item = 8 if elem in (ValueType.STRING, ValueType.ARRAY) else struct.calcsize(_SCALAR_FORMATS[elem])
        if count * min_item > remaining:
            raise self.fail(f"{what} claims {count} items, more than the file holds")
        if elem in _NUMPY_DTYPES:
            size = count * np.dtype(_NUMPY_DTYPES[elem]).itemsize
            items = np.frombuffer(self.take(size, what), dtype=_NUMPY_DTYPES[elem]).copy()
            return TypedValue(vtype, items, elem)
        if elem == ValueType.BOOL:
            items = np.frombuffer(self.take(count, what), dtype=np.uint8).astype(bool)
            return TypedValue(vtype, items, elem)
        if elem == ValueType.STRING:
            return TypedValue(vtype, self._strings(count, what), elem)
        return TypedValue(vtype, [self.value(elem, what, depth + 1) for _ in range(count)], elem)

    def _strings(self, count: int, what: str) -> list[str]:
        out: list[str] = []
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise self.fail(f"truncated {what}")
                (length,) = unpack(buf, pos)
                pos += 8
                if length > end - pos:
                    raise self.fail(f"truncated {what}")
                out.append(str(buf[pos : pos + length], "utf-8"))
                pos += length
        except UnicodeDecodeError:
            self.pos = pos
            raise self.fail(f"{what} is not valid UTF-8") from None
        self.pos = pos
        return out


class GGUFFile:
    """A parsed, validated GGUF file. Tensor data stays in the mmap (zero-copy views)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise InvalidModelError(f"cannot open {self.path}: {exc.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 24:
            self._fh.close()
            raise InvalidModelError(f"{self.path}: not a valid GGUF file (only {size} bytes)")
        self._mmap = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.buffer = memoryview(self._mmap)
        self.file_size = size
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self.buffer, self.path)
        if bytes(cur.take(4, "magic")) != GGUF_MAGIC:
            raise InvalidModelError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
            raise cur.fail(f"absurd counts ({n_tensors} tensors, {n_kv} metadata entries)")
        self.fields: dict[str, TypedValue] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key", MAX_NAME_BYTES)
            if key in self.fields:
                raise cur.fail(f"duplicate metadata key {key!r}")
            self.fields[key] = cur.value(cur.u32("value type"), f"value of {key!r}")
        self.alignment = int(self._scalar_field("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1) or self.alignment > 1 << 20:
            raise cur.fail(f"alignment {self.alignment} is not a power of two")
        raw_infos = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = cur.string("tensor name", MAX_NAME_BYTES)
            if name in names:
                raise cur.fail(f"duplicate tensor {name!r}")
            names.add(name)
            n_dims = cur.u32(f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.u64(f"dimension of {name!r}") for _ in range(n_dims)]
            if any(d == 0 or d > 1 << 40 for d in dims):
                raise cur.fail(f"tensor {name!r} has an invalid dimension {dims}")
            ggml_type = cur.u32(f"type of {name!r}")
            offset = cur.u64(f"offset of {name!r}")
            raw_infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, shape, ggml_type, rel_offset in raw_infos:
            try:
                nbytes = _tensor_nbytes(ggml_type, shape)
            except UnsupportedError as exc:
                raise UnsupportedError(f"{self.path}: tensor {name!r}: {exc}") from None
            except InvalidModelError as exc:
                raise InvalidModelError(f"{self.path}: tensor {name!r}: {exc}") from None
            if rel_offset % self.alignment:
                raise cur.fail(f"tensor {name!r} offset {rel_offset} is not aligned to {self.alignment}")
            start = self.data_offset + rel_offset
            if start + nbytes > self.file_size:
                raise InvalidModelError(
                    f"{self.path}: tensor {name!r} ({nbytes} bytes at {start}) extends past the end of the file "
                    f"({self.file_size} bytes); the file is truncated or corrupt"
                )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
            spans.append((start, start + nbytes, name))
        spans.sort()
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise InvalidModelError(f"{self.path}: tensors {name_a!r} and {name_b!r} overlap")

    def _scalar_field(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        if field.type in (ValueType.ARRAY, ValueType.STRING):
            raise InvalidModelError(f"{self.path}: metadata {key!r} must be a number")
        return field.value

    def drop_fields(self, prefix: str) -> None:
        """Forget the parsed values of the keys starting with prefix (a runtime that keeps the file open for its
        mapped weights does not need the ~10 MB of vocabulary strings once its tokenizer is built)."""
        for key in [key for key in self.fields if key.startswith(prefix)]:
            del self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        """The plain value of a metadata key (numpy array for numeric arrays, list for string arrays)."""
        field = self.fields.get(key)
        return default if field is None else field.value

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        value = self.get(key)
        if value is None:
            raise InvalidModelError(f"{self.path}: required metadata {key!r} is missing")
        if isinstance(value, np.generic):
            value = value.item()
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):  # True is not a count
            raise InvalidModelError(f"{self.path}: metadata {key!r} has the wrong type ({type(value).__name__})")
        return value

    def tensor_data(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor as a read-only uint8 view into the mmap, shape (rows, row_nbytes)."""
        info = self.tensors[name]
        flat = np.frombuffer(self.buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return flat.reshape(rows, info.nbytes // rows)

    def close(self) -> None:
        try:
            self.buffer.release()
            self._mmap.close()
        except (BufferError, ValueError):
            pass  # numpy views still alive; the mapping is freed when they go
        self._fh.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- writing


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(tv: TypedValue) -> bytes:
    if tv.type == ValueType.STRING:
        return _encode_string(tv.value)
    if tv.type != ValueType.ARRAY:
        return struct.pack(_SCALAR_FORMATS[tv.type], tv.value)
    elem = tv.element_type
    assert elem is not None
    items = tv.value
    head = struct.pack("<IQ", int(elem), len(items))
    if elem in _NUMPY_DTYPES:
        return head + np.asarray(items, dtype=_NUMPY_DTYPES[elem]).tobytes()
    if elem == ValueType.BOOL:
        return head + np.asarray(items, dtype=np.uint8).tobytes()
    if elem == ValueType.STRING:
        return head + b"".join(_encode_string(s) for s in items)
    return head + b"".join(_encode_value(v) for v in items)


@dataclass
class PlannedTensor:
    """A tensor to write: its shape, type and a producer called once, in file order, to get its bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    produce: Callable[[], np.ndarray | bytes]


def write_gguf(
    path: str | os.PathLike[str],
    fields: dict[str, TypedValue],
    tensors: Iterable[PlannedTensor],
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    force: bool = False,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> int:
    """Write a GGUF v3 file atomically, streaming one tensor at a time; returns the file size."""
    planned = list(tensors)
    fields = dict(fields)
    if alignment != DEFAULT_ALIGNMENT:
        fields["general.alignment"] = TypedValue(ValueType.UINT32, alignment)
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(planned), len(fields)))
    for key, tv in fields.items():
        header += _encode_string(key) + struct.pack("<I", int(tv.type)) + _encode_value(tv)
    offset = 0
    sizes = []
    for t in planned:
        nbytes = _tensor_nbytes(t.ggml_type, t.shape)
        sizes.append(nbytes)
        header += _encode_string(t.name) + struct.pack("<I", len(t.shape))
        header += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
        header += struct.pack("<IQ", t.ggml_type, offset)
        offset += -(-nbytes // alignment) * alignment
    header += b"\0" * (-len(header) % alignment)
    with atomic_output(Path(path), force=force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            for t, nbytes in zip(planned, sizes, strict=True):
                data = t.produce()
                raw = memoryview(data.tobytes() if isinstance(data, np.ndarray) and not data.flags.c_contiguous
                                 else data).cast("B")
                if raw.nbytes != nbytes:
                    raise InvalidModelError(f"tensor {t.name!r}: produced {raw.nbytes} bytes, expected {nbytes}")
                fh.write(raw)
                fh.write(b"\0" * (-nbytes % alignment))
                if on_tensor is not None:
                    on_tensor(t)
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()
