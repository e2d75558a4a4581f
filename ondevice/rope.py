"""Rotary position embedding, computed once for every backend: the per-pair frequencies (with llama3 or linear
scaling as per-pair divisors, llama.cpp's `rope_freqs`) and the cos/sin tables the graph builders embed.

Tables are rotate-half (HF) order: pair i rotates dims i and i + D/2 by angle position * inv_freq[i].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ondevice.model import ModelSpec


def layer_freq_factors(spec: ModelSpec, layer: int | None) -> tuple[float, ...] | None:
    """The frequency divisors of a layer: scaling applies to full-attention layers (gemma3's sliding layers keep
    their own unscaled base)."""
    return spec.rope_freq_factors if layer is None or not spec.window(layer) else None


def inverse_frequencies(spec: ModelSpec, layer: int | None = None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/D) / factor[i] of `layer` (None: the model's global RoPE), float64 (D/2,)."""
    d = spec.head_dim
    inv = 1.0 / (spec.layer_rope_theta(layer) ** (np.arange(0, d, 2, dtype=np.float64) / d))
    factors = layer_freq_factors(spec, layer)
    if factors is not None:
        inv = inv / np.asarray(factors, np.float64)
    return inv


def rope_kind(spec: ModelSpec, layer: int) -> tuple[float, bool]:
    """What makes two layers' RoPE tables differ (base, scaled): layers of one kind share a table."""
    return spec.layer_rope_theta(layer), layer_freq_factors(spec, layer) is not None


def rope_tables(spec: ModelSpec, positions: int, dtype: type = np.float32,
                layer: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (positions, D/2), of positions 0..positions-1 for `layer`'s RoPE."""
    angles = np.outer(np.arange(positions, dtype=np.float64), inverse_frequencies(spec, layer))
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def freq_factors_from_hf(scaling: Mapping[str, Any], head_dim: int, theta: float) -> tuple[float, ...]:
    """Per-pair frequency divisors of an HF `rope_scaling` of type llama3 or linear (the caller checked the type).

    llama3 keeps high frequencies, divides low ones by `factor` and blends in between (Llama 3.1's recipe)."""
    kind = scaling.get("rope_type") or scaling.get("type")
    factor = float(scaling["factor"])
    pairs = head_dim // 2
    if kind == "linear":
        return (factor,) * pairs
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for f in inv:
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)
