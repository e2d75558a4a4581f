"""Importance matrices (llama.cpp's "imatrix"): per linear layer, the sum over calibration tokens of each input
column's squared activation, and the token count. Weight-quantizers that take importance weights (Q4_0/Q4_1/Q5_0/
Q5_1/Q4_K/Q6_K, as in ggml) spend their error budget where the inputs are large.

    imatrix = compute_imatrix(model, calibration_chunks(model, text, ctx=512))   # numpy float32 reference pass
    imatrix.save("smol.imatrix.gguf")        # llama.cpp's GGUF form (<tensor>.in_sum2 / <tensor>.counts)
    imatrix.save("smol.imatrix.dat")         # or its legacy binary
    imatrix = Imatrix.load(path)             # either form; hostile files are one-line InvalidModelErrors
    weights = imatrix.importance("blk.0.attn_q.weight")   # float32 (columns,): sum / count, what quantizers take

The chunks follow llama-imatrix: the text is tokenized once (with the BOS when the tokenizer adds one) and cut into
chunks of `ctx` tokens, the first token of each chunk replaced by the BOS; every token of every chunk counts. Entries
are named by the GGUF tensor they feed (blk.N.attn_q.weight ...); like llama-imatrix, only the blocks' matrices are
collected (not token_embd or the output layer).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ondevice.errors import InvalidModelError, OndeviceError
from ondevice.model import CanonicalModel

IN_SUM2, COUNTS = ".in_sum2", ".counts"
KEY_TYPE, KEY_DATASETS = "general.type", "imatrix.datasets"
KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"
MAX_ENTRIES = 1 << 16  # a model has a few hundred matrices; a legacy header claiming more is hostile
MAX_NAME = 1 << 10
MAX_COLUMNS = 1 << 24


@dataclass
class Imatrix:
    """sums[name]: float32 (n_mat, columns) sums of squared inputs (n_mat = 1 for a dense matrix); counts[name]:
    int64 (n_mat,) tokens seen. A legacy .dat holds sums already scaled to `count` calls; sums / counts is the
    importance either way (what llama-quantize passes to ggml)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray | None:
        """The importance vector of tensor `name` (float32, n_mat * columns), or None when it has no entry.
        Matrices that saw no token get weights 1 (llama-quantize's rule)."""
        if name not in self.sums:
            return None
        sums, counts = self.sums[name], self.counts[name].astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts[:, None] > 0, sums / np.where(counts > 0, counts, 1)[:, None], np.float32(1))
        return out.astype(np.float32).reshape(-1)

    def summary(self) -> dict:
        tokens = max((int(c.max()) for c in self.counts.values()), default=0)
        return {"entries": len(self.sums), "tokens": tokens, "chunks": self.chunk_count,
                "chunk_size": self.chunk_size, "datasets": list(self.datasets)}

    # ------------------------------------------------------------------------------------------------ files

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except FileNotFoundError:
            raise OndeviceError(f"imatrix {path}: no such file") from None
        except OSError as exc:
            raise OndeviceError(f"imatrix {path}: cannot read it ({exc.strerror or exc})") from None
        imatrix = _load_gguf(path) if magic == b"GGUF" else _load_dat(path)
        imatrix.validate(str(path))
        return imatrix

    def save(self, path: str | Path, *, force: bool = False, legacy: bool | None = None) -> int:
        """Write atomically: the GGUF form, or the legacy .dat when `legacy` (default: by the .dat suffix)."""
        path = Path(path)
        if legacy is None:
            legacy = path.suffix.lower() == ".dat"
        return _save_dat(self, path, force) if legacy else _save_gguf(self, path, force)

    def validate(self, where: str) -> None:
        if not self.sums:
            raise InvalidModelError(f"{where}: the imatrix has no entries")
        for name, sums in self.sums.items():
            counts = self.counts.get(name)
            if counts is None:
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has sums but no counts")
            if sums.ndim != 2 or counts.shape != (sums.shape[0],):
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has {sums.size} sums for "
                                        f"{counts.size} counts (not a whole number of columns per count)")
            if not np.isfinite(sums).all():
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has non-finite sums (NaN/Inf); "
                                        "recompute it")
            if (sums < 0).any() or (counts < 0).any():
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has negative sums or counts")
        extra = set(self.counts) - set(self.sums)
        if extra:
            raise InvalidModelError(f"{where}: imatrix entry {sorted(extra)[0]!r} has counts but no sums")

    def check_model(self, columns: dict[str, int], where: str) -> list[str]:
        """Match against a model's matrices (GGUF name -> input columns). A size mismatch or no common entry at
        all means another model: an error. Returns the names of the model's matrices the imatrix lacks."""
        common = [name for name in columns if name in self.sums]
        if not common:
            example = next(iter(sorted(self.sums)))
            raise InvalidModelError(f"{where}: the imatrix has no entry for any tensor of this model (it has e.g. "
                                    f"{example!r}); it was computed for another model")
        for name in common:
            size = self.sums[name].size
            if size != columns[name]:
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has {size} values but the tensor has "
                                        f"{columns[name]} input columns; it was computed for another model")
        return [name for name in columns if name not in self.sums]


# ---------------------------------------------------------------------------------------------------- GGUF form


def _load_gguf(path: Path) -> Imatrix:
    from ondevice.formats.gguf import GGUFFile

    with GGUFFile(path) as f:
        where = str(path)
        missing = [key for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if key not in f.fields]
        if missing:  # llama-quantize refuses these too ("missing imatrix metadata")
            kind = f.get(KEY_TYPE)
            what = "a model, not an imatrix" if kind == "model" or not any(n.endswith(IN_SUM2) for n in f.tensors) \
                else f"an imatrix without its metadata {missing[0]!r}"
            raise InvalidModelError(f"{where}: {what}")
        datasets = f.get(KEY_DATASETS)
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise InvalidModelError(f"{where}: metadata {KEY_DATASETS!r} must be an array of strings")
        imatrix = Imatrix(datasets=list(datasets), chunk_count=f.require(KEY_CHUNK_COUNT, int),
                          chunk_size=f.require(KEY_CHUNK_SIZE, int))
        pairs: dict[str, dict[str, object]] = {}
        for name, info in f.tensors.items():
            for suffix in (IN_SUM2, COUNTS):
                if name.endswith(suffix):
                    if info.ggml_type != 0:
                        raise InvalidModelError(f"{where}: imatrix tensor {name!r} must be F32")
                    values = f.tensor_data(name).reshape(-1).view("<f4")
                    shape = info.shape if len(info.shape) > 1 else (1, info.shape[0])
                    pairs.setdefault(name.removesuffix(suffix), {})[suffix] = values.reshape(-1, shape[-1])
        for name, pair in sorted(pairs.items()):
            if IN_SUM2 not in pair or COUNTS not in pair:
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has "
                                        f"{'counts' if IN_SUM2 not in pair else 'sums'} but no "
                                        f"{'sums' if IN_SUM2 not in pair else 'counts'}")
            sums, counts = np.array(pair[IN_SUM2], np.float32), np.asarray(pair[COUNTS], np.float32).reshape(-1)
            if not np.isfinite(counts).all():
                raise InvalidModelError(f"{where}: imatrix entry {name!r} has non-finite counts")
            imatrix.sums[name] = sums.reshape(counts.size, -1) if sums.size % max(counts.size, 1) == 0 else sums
            imatrix.counts[name] = np.rint(counts).astype(np.int64)  # llama.cpp: lround()
    return imatrix


def _save_gguf(imatrix: Imatrix, path: Path, force: bool) -> int:
    from ondevice.formats.gguf import PlannedTensor, TypedValue, ValueType, write_gguf

    fields = {
        KEY_TYPE: TypedValue(ValueType.STRING, "imatrix"),
        KEY_DATASETS: TypedValue(ValueType.ARRAY, list(imatrix.datasets), ValueType.STRING),
        KEY_CHUNK_COUNT: TypedValue(ValueType.UINT32, int(imatrix.chunk_count)),
        KEY_CHUNK_SIZE: TypedValue(ValueType.UINT32, int(imatrix.chunk_size)),
    }
    tensors = []
    for name in sorted(imatrix.sums):  # llama-imatrix's order: sorted names, sums then counts
        sums = np.ascontiguousarray(imatrix.sums[name], np.float32)
        counts = np.ascontiguousarray(imatrix.counts[name], np.float32).reshape(-1, 1)
        if len(sums) == 1:  # ggml writes ggml_n_dims(): a dense entry's (columns, 1) and (1, 1) as 1-D
            sums, counts = sums.reshape(-1), counts.reshape(-1)
        tensors.append(PlannedTensor(name + IN_SUM2, sums.shape, 0, sums.tobytes))
        tensors.append(PlannedTensor(name + COUNTS, counts.shape, 0, counts.tobytes))
    return write_gguf(path, fields, tensors, force=force)


# ---------------------------------------------------------------------------------------------------- legacy .dat
# int32 n_entries; per entry: int32 name length, name, int32 ncall, int32 nval, float32[nval] = sum / count * ncall;
# then (optional) int32 chunk count, int32 dataset length, dataset name.


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidModelError(f"{self.where}: not a valid imatrix file (truncated {what} at byte {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _load_dat(path: Path) -> Imatrix:
    where = str(path)
    data = path.read_bytes()
    r = _Reader(data, where)
    n_entries = r.i32("entry count")
    if not 1 <= n_entries <= MAX_ENTRIES:
        raise InvalidModelError(f"{where}: not an imatrix file (GGUF or llama.cpp's legacy .dat): "
                                f"it claims {n_entries} entries")
    imatrix = Imatrix()
    for i in range(n_entries):
        length = r.i32(f"name length of entry {i}")
        if not 0 < length <= MAX_NAME:
            raise InvalidModelError(f"{where}: not a valid imatrix file (entry {i} has a name of {length} bytes)")
        try:
            name = r.take(length, f"name of entry {i}").decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidModelError(f"{where}: not a valid imatrix file (entry {i}'s name is not UTF-8)") from None
        ncall, nval = r.i32(f"call count of {name!r}"), r.i32(f"value count of {name!r}")
        if not 0 < nval <= MAX_COLUMNS or ncall < 0:
            raise InvalidModelError(f"{where}: not a valid imatrix file (entry {name!r}: {nval} values, "
                                    f"{ncall} calls)")
        if name in imatrix.sums:
            raise InvalidModelError(f"{where}: imatrix entry {name!r} appears twice")
        values = np.frombuffer(r.take(4 * nval, f"values of {name!r}"), "<f4").astype(np.float32)
        imatrix.sums[name] = values.reshape(1, nval)
        imatrix.counts[name] = np.array([ncall], np.int64)
    if r.pos < len(data):  # trailing chunk count and dataset name are optional, as in llama.cpp
        imatrix.chunk_count = r.i32("chunk count")
        if r.pos < len(data):
            length = r.i32("dataset name length")
            if not 0 <= length <= 1 << 20:
                raise InvalidModelError(f"{where}: not a valid imatrix file (dataset name of {length} bytes)")
            if length:
                imatrix.datasets.append(r.take(length, "dataset name").decode("utf-8", "replace"))
        if r.pos != len(data):
            raise InvalidModelError(f"{where}: not a valid imatrix file ({len(data) - r.pos} stray bytes at the end)")
    imatrix.chunk_size = 0  # the legacy form does not store it: its sums are per call already
    return imatrix


def _save_dat(imatrix: Imatrix, path: Path, force: bool) -> int:
    from ondevice.formats.atomic import atomic_output

    chunk = imatrix.chunk_size or 1
    out = bytearray(struct.pack("<i", len(imatrix.sums)))
    for name in sorted(imatrix.sums):
        raw = name.encode("utf-8")
        sums, counts = imatrix.sums[name], imatrix.counts[name]
        ncall = -(-int(counts.max()) // chunk)  # ceiling, as llama-imatrix: never a zero count
        count = np.repeat(counts.astype(np.float32), sums.shape[1])
        flat = sums.reshape(-1).astype(np.float32)
        if (counts == ncall).all():
            values = flat  # a legacy file read back: already per call, written unchanged
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(count == 0, np.float32(ncall), flat / count * np.float32(ncall))
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, flat.size)
        out += values.astype("<f4").tobytes()
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode("utf-8")
    out += struct.pack("<ii", int(imatrix.chunk_count), len(dataset)) + dataset
    with atomic_output(path, force=force) as tmp:
        tmp.write_bytes(bytes(out))
    return len(out)


# ---------------------------------------------------------------------------------------------------- computing


def chunk_tokens(model: CanonicalModel, text: str, ctx: int, chunks: int | None = None) -> list[list[int]]:
    """llama-imatrix's chunks of `text`: ctx tokens each, the first replaced by the BOS when the tokenizer adds one."""
    from tokenizers import Tokenizer

    if ctx < 16:
        raise OndeviceError("--ctx must be at least 16 (llama.cpp ignores batches of fewer tokens)")
    tokenizer = Tokenizer.from_str(model.tokenizer_json)
    bos = model.special.bos_id if model.special.add_bos else None
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    ids = ([bos] if bos is not None else []) + [t for t in ids if 0 <= t < model.spec.vocab_size]
    n_chunks = len(ids) // ctx
    if chunks is not None:
        n_chunks = min(n_chunks, max(int(chunks), 0))
    if n_chunks < 1:
        raise OndeviceError(f"the calibration text has {len(ids)} tokens: fewer than one chunk of --ctx {ctx}; "
                            "give a longer text or a smaller --ctx")
    out = []
    for i in range(n_chunks):
        chunk = ids[i * ctx:(i + 1) * ctx]
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def chat_text(model: CanonicalModel, text: str) -> str:
    """The text as chat turns in the model's template: paragraphs alternate user and assistant, two a conversation."""
    from ondevice.chat_template import render_chat

    if not model.chat_template:
        raise OndeviceError("--chat: the model has no chat template")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(model.tokenizer_json)
    special = model.special
    bos = tokenizer.id_to_token(special.bos_id) if special.bos_id is not None else None
    eos = tokenizer.id_to_token(special.eos_id) if special.eos_id is not None else None
    pieces = []
    for i in range(0, len(paragraphs), 2):
        messages = [{"role": "user", "content": paragraphs[i]}]
        if i + 1 < len(paragraphs):
            messages.append({"role": "assistant", "content": paragraphs[i + 1]})
        pieces.append(render_chat(model.chat_template, messages, add_generation_prompt=False,
                                  bos_token=bos or "", eos_token=eos or ""))
    return "".join(pieces)


def compute_imatrix(model: CanonicalModel, chunks: list[list[int]], *, dataset: str = "",
                    on_layer: Callable[[int], None] | None = None) -> Imatrix:
    """Run the numpy float32 reference over `chunks` (each attending only to itself) and sum the squared inputs
    of every block matrix, in float64, stored as float32 (llama.cpp accumulates in float32)."""
    from ondevice.decoder import run_decoder
    from ondevice.reference import FinalHiddenOps

    sums: dict[str, np.ndarray] = {}

    class Collect(FinalHiddenOps):
        def project(self, x: np.ndarray, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[np.ndarray]:
            squares = np.einsum("ij,ij->j", x, x, dtype=np.float64)
            for role in roles:
                sums[self.arch.gguf_name(self.tensor_name(role, layer))] = squares
            if on_layer is not None and "down" in roles:
                on_layer(layer)
            return super().project(x, roles, layer, bias)

    run_decoder(Collect(model, chunks))
    tokens = sum(len(chunk) for chunk in chunks)
    imatrix = Imatrix(datasets=[dataset] if dataset else [], chunk_count=len(chunks),
                      chunk_size=len(chunks[0]))
    for name, squares in sums.items():
        if not math.isfinite(float(squares.sum())):
            raise InvalidModelError(f"non-finite activations at the input of {name}: the model's weights overflow "
                                    "in float32")
        imatrix.sums[name] = squares.astype(np.float32).reshape(1, -1)
        imatrix.counts[name] = np.array([tokens], np.int64)
    return imatrix


def bundled_calibration_text() -> str:
    from ondevice.quant.calibration import CALIBRATION_TEXT

    return CALIBRATION_TEXT.read_text(encoding="utf-8")


def calibrate(model: CanonicalModel, text: str | None = None, *, label: str = "", ctx: int = 512,
              chunks: int | None = None, chat: bool = False, progress: bool = True) -> Imatrix:
    """The imatrix of `model` over `text` (default: the bundled calibration text), with a progress bar per layer."""
    from ondevice.converters.base import progress_bar

    if text is None:
        text, label = bundled_calibration_text(), label or "ondevice/data/calibration_text.txt"
    if chat:
        text = chat_text(model, text)
    windows = chunk_tokens(model, text, ctx, chunks)
    with progress_bar(model.spec.n_layers, f"imatrix {len(windows)}x{ctx} tokens", progress) as bar:
        bar.unit = "layer"
        return compute_imatrix(model, windows, dataset=label, on_layer=lambda _layer: bar.update(1))
