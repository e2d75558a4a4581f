"""The runtime's KV cache types, in a module light enough for the bench and `fit` to import without the kernels:
they record the cache bytes the runtime really keeps, so the figure comes from here, not from a copy.

A cached K (or V) row is one head's head_dim values at one position. f16 and f32 keep them as they are; q8_0 keeps
head_dim/32 ggml Q8_0 blocks (an fp16 scale and 32 int8, 34 bytes), llama.cpp's `--cache-type-k/-v q8_0`: 1.0625
bytes a value, 53% of f16. q8_0 needs head_dim % 32 == 0; other models get a one-line error naming f16 (llama.cpp
refuses such a cache too), not a silent fallback that would leave the memory figure wrong."""

from __future__ import annotations

import numpy as np

from ondevice.errors import UnsupportedError

# user-facing KV cache types -> element type of the cache arrays (q8_0: bytes of blocks)
KV_CACHE_DTYPES: dict[str, type] = {"f16": np.float16, "f32": np.float32, "q8_0": np.uint8}
DEFAULT_KV_CACHE = "f16"  # half the memory of f32, and the numerics of llama.cpp's default cache
Q8_0_BLOCK = 32  # values per Q8_0 block
Q8_0_BLOCK_BYTES = 34  # fp16 scale + 32 int8


class KVCacheTypeError(UnsupportedError):
    """An unknown KV cache type, or one the model's head size cannot use."""


def check_kv_cache(kv_cache: str, head_dim: int | None = None) -> str:
    """kv_cache if it names a cache type this model (of head_dim, when given) can use; else a one-line error."""
    if kv_cache not in KV_CACHE_DTYPES:
        raise KVCacheTypeError(f"KV cache type must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}")
    if kv_cache == "q8_0" and head_dim is not None and head_dim % Q8_0_BLOCK != 0:
        raise KVCacheTypeError(f"a q8_0 KV cache needs a head size that is a multiple of {Q8_0_BLOCK}; this model's "
                               f"is {head_dim}: use --kv-cache f16")
    return kv_cache


def kv_row_items(kv_cache: str, head_dim: int) -> int:
    """Array items of one cached K (or V) row of head_dim values (bytes for q8_0)."""
    check_kv_cache(kv_cache, head_dim)
    return head_dim // Q8_0_BLOCK * Q8_0_BLOCK_BYTES if kv_cache == "q8_0" else head_dim


def kv_row_bytes(kv_cache: str, head_dim: int) -> int:
    """Bytes of one cached K (or V) row of head_dim values."""
    return kv_row_items(kv_cache, head_dim) * int(np.dtype(KV_CACHE_DTYPES[kv_cache]).itemsize)


def kv_element_bytes(kv_cache: str = DEFAULT_KV_CACHE) -> float:
    """Bytes of one cached K or V value for a user-facing cache type (1.0625 for q8_0: exact for any head size
    the type accepts)."""
    check_kv_cache(kv_cache)
    return kv_row_bytes(kv_cache, Q8_0_BLOCK) / Q8_0_BLOCK


def kv_quant_label(quant: str, kv_cache: str | None) -> str:
    """The quant a benchmark or eval row records: the weights' type, plus the KV cache type when one was asked for
    (so rows of one file with different caches stay apart in reports)."""
    return quant if kv_cache is None else f"{quant} kv-{kv_cache}"
