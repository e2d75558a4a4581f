"""llama.cpp's own quantizer, the oracle and the baseline of ondevice's GGUF writer: `llama_model_quantize` from
llama-cpp-python's low-level API, optionally with an importance matrix passed as llama-quantize passes it (one
float vector per tensor: the imatrix's sums / counts).

    llama_cpp_quantize("smol-f32.gguf", "smol-q4_0.gguf", "q4_0", imatrix=Imatrix.load("smol.imatrix.gguf"))
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ondevice.errors import MissingExtraError, OndeviceError
from ondevice.quant.imatrix import Imatrix

# llama.h's llama_ftype values of the recipes ondevice writes.
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_m": 15,
               "q6_k": 18, "bf16": 32}


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
