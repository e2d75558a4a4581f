"""llama.cpp's own tools where llama-cpp-python reaches them, the oracles and baselines of ondevice's calibrated GGUF
writer (llama-cpp-python ships no llama-imatrix or llama-quantize binary):

- llama_cpp_quantize: `llama_model_quantize` from the low-level API, optionally with an importance matrix passed as
  llama-quantize passes it (one float vector per tensor: the imatrix's sums / counts);
- llama_cpp_imatrix: llama-imatrix's collection, i.e. its ggml scheduler callback (cb_eval) summing the squared
  inputs of every blk.* matrix multiplication of llama.cpp's own forward pass, over the same token chunks.

    llama_cpp_quantize("smol-f32.gguf", "smol-q4_0.gguf", "q4_0", imatrix=Imatrix.load("smol.imatrix.gguf"))
    theirs = llama_cpp_imatrix("smol-f32.gguf", chunks)      # chunks: ondevice.quant.imatrix.chunk_tokens(...)
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ondevice.errors import MissingExtraError, OndeviceError
from ondevice.quant.imatrix import Imatrix

# llama.h's llama_ftype values of the recipes ondevice writes.
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q3_k_s": 11,
               "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "bf16": 32}


def llama_cpp_quantize(src: str | Path, dst: str | Path, recipe: str, *, imatrix: Imatrix | None = None,
                       pure: bool = False, threads: int = 2) -> None:
    """Quantize the GGUF `src` (f32/f16) into `dst` with llama.cpp, as `llama-quantize [--imatrix] src dst RECIPE`
    does (without the quantize.imatrix.* metadata the command-line tool adds)."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError("llama.cpp's quantizer needs llama-cpp-python: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[recipe]
    params.nthread = threads
    params.pure = pure
    keep = []  # the vectors and names must outlive the call
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.sums) + 1))()
        for i, name in enumerate(sorted(imatrix.sums)):
            values = np.ascontiguousarray(imatrix.importance(name), np.float32)
            raw = name.encode()
            keep += [values, raw]
            entries[i].name = raw
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(imatrix.sums)].name = None  # terminator
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise OndeviceError(f"llama_model_quantize failed on {src} ({status})")


def _ggml_tensor_struct():  # noqa: ANN202
    """ggml.h's struct ggml_tensor (ggml 0.25 as vendored by llama-cpp-python 0.3.36)."""

    class GGMLTensor(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                    ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]

    return GGMLTensor


def llama_cpp_imatrix(model_path: str | Path, chunks: list[list[int]], *, threads: int = 2) -> Imatrix:
    """The imatrix llama-imatrix collects on `chunks` (each decoded alone, all logits requested as llama-imatrix
    does, so the last layer sees every token; an f32 KV cache and no flash attention, where llama-imatrix's
    defaults round attention through f16, ~1e-3 relative): sums of squared src1 rows of each MUL_MAT whose weight is a blk.*
    tensor and whose batch has >= 16 f32 rows, accumulated in float64 here."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError("llama.cpp's imatrix needs llama-cpp-python: pip install llama-cpp-python") from None
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_op_name.argtypes = [ctypes.c_int]
    tensor_type = _ggml_tensor_struct()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    failure: list[str] = []

    def collect(address: int, ask: bool, _user: int) -> bool:
        try:
            t = tensor_type.from_address(address)
            if base.ggml_op_name(t.op) != b"MUL_MAT" or not t.src[0] or not t.src[1]:
                return False if ask else True
            weight, x = tensor_type.from_address(t.src[0]), tensor_type.from_address(t.src[1])
            name = weight.name.decode()
            if ask:
                return name.startswith("blk.") and x.ne[1] >= 16 and x.type == 0
            rows, cols = x.ne[1] * x.ne[2] * x.ne[3], x.ne[0]
            if x.nb[0] != 4 or x.nb[1] != 4 * cols or (x.ne[2] > 1 and x.nb[2] != x.nb[1] * x.ne[1]):
                raise RuntimeError(f"non-contiguous activations for {name}")
            values = np.ctypeslib.as_array(ctypes.cast(x.data, ctypes.POINTER(ctypes.c_float)), shape=(rows, cols))
            squares = np.einsum("ij,ij->j", values, values, dtype=np.float64)
            sums[name] = sums.get(name, 0) + squares
            counts[name] = counts.get(name, 0) + rows
        except Exception as exc:  # an exception must not cross the C callback
            failure.append(f"{type(exc).__name__}: {exc}")
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(collect)
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
    if not model:
        raise OndeviceError(f"llama.cpp could not load {model_path}")
    n_ctx = max(len(c) for c in chunks)
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
    ctx_params.n_threads = ctx_params.n_threads_batch = threads
    ctx_params.type_k = ctx_params.type_v = 0  # an f32 KV cache (llama.cpp's default f16 one rounds attention)
    ctx_params.flash_attn_type = 0  # and the plain attention: flash attention rounds through f16 on the CPU
    ctx_params.cb_eval = callback
    ctx_params.cb_eval_user_data = None
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    try:
        for chunk in chunks:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(chunk)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise OndeviceError("llama_decode failed")
            if failure:
                raise OndeviceError(f"collecting llama.cpp's activations failed: {failure[0]}")
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    imatrix = Imatrix(chunk_count=len(chunks), chunk_size=n_ctx)
    for name, squares in sums.items():
        imatrix.sums[name] = np.asarray(squares, np.float32).reshape(1, -1)
        imatrix.counts[name] = np.array([counts[name]], np.int64)
    return imatrix
