"""The runtime's KV cache types, in a module light enough for the bench and `fit` to import without the kernels:
they record the cache bytes the runtime really keeps, so the figure comes from here, not from a copy."""

from __future__ import annotations

import numpy as np

# user-facing KV cache types -> element type of the cache arrays
KV_CACHE_DTYPES: dict[str, type] = {"f16": np.float16, "f32": np.float32}
DEFAULT_KV_CACHE = "f16"  # half the memory of f32, and the numerics of llama.cpp's default cache


def kv_element_bytes(kv_cache: str = DEFAULT_KV_CACHE) -> int:
    """Bytes of one cached K or V element for a user-facing cache type."""
    return int(np.dtype(KV_CACHE_DTYPES[kv_cache]).itemsize)
