"""Per-tensor type choice for a whole-model recipe ("q4_k_m", "q8_0", ...), following llama.cpp.

The rules mirror `llama_tensor_get_type` / `tensor_type_fallback` in llama.cpp's src/llama-quant.cpp (as
vendored by llama-cpp-python 0.3.36), restricted to dense models and the recipes listed in RECIPES:

- only tensors with 2+ dimensions whose name ends in "weight" (and is not a norm) are quantized; norms,
  biases and other 1-D tensors stay f32;
- the output matrix, and token_embd when the embeddings are tied (it then serves as the output), get Q6_K
  for every quantized recipe except q8_0 (which keeps Q8_0), or Q8_0 when its width does not fit the
  recipe's block size;
- q4_k_m and q5_k_m give Q6_K to attn_v (and fused attn_qkv) and ffn_down in the layers where llama.cpp's
  use_more_bits() holds: the first eighth, the last eighth and every third layer between;
- q4_k_s gives Q5_K to attn_v in the first 4 layers and to ffn_down in the first eighth; q5_k_s is Q5_K
  throughout;
- iq4_nl / iq4_xs give Q5_K to attn_v when 4 or more query heads share a KV head (n_gqa >= 4), and to ffn_down
  in the first eighth when no importance matrix is given. llama.cpp requires an imatrix only for the IQ1/IQ2/
  IQ3_XXS types (and Q2_K_S), so neither IQ4 recipe does; the imatrix improves them (their quantizer takes it);
- q3_k_m gives Q5_K to attn_v (and attn_qkv) in the first 2 layers and Q4_K after, Q4_K to attn_output, and to
  ffn_down Q5_K in the first sixteenth and Q4_K after (falcon: Q4_K only in the use_more_bits layers, else Q3_K;
  and its attn_output stays Q3_K); q3_k_l gives Q5_K to attn_v, ffn_down and attn_output (falcon: Q4_K for
  ffn_down and attn_output); q3_k_s is Q3_K throughout;
- with an importance matrix, q4_0 / q5_0 give Q4_1 / Q5_1 to ffn_down in the first eighth of the layers;
- a tensor whose row width is not a multiple of the chosen type's block size falls back per tensor
  (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL; a 32-block type or a fallback that still does
  not fit -> F16).

Fallbacks are never silent: plan_tensor_type()/choose_tensor_type() return a TensorTypeChoice that records
the type the recipe wanted and why it changed, and describe_fallbacks() formats them for the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ondevice.errors import UnsupportedError
from ondevice.quant import QUANT_TYPES, QuantType, get_quant_type

RECIPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q6_k",
                            "q4_k_s", "q5_k_s", "q5_k_m", "iq4_nl", "iq4_xs", "q3_k_s", "q3_k_m", "q3_k_l")

# Each recipe's default tensor type (llama_ftype_get_default_type).
_DEFAULT_TYPE: dict[str, str] = {
    "f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1",
    "q5_0": "q5_0", "q5_1": "q5_1", "q4_k_m": "q4_k", "q6_k": "q6_k", "q4_k_s": "q4_k", "q5_k_s": "q5_k",
    "q5_k_m": "q5_k", "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
}
_FLOAT_RECIPES = frozenset({"f32", "f16", "bf16"})

# Block sizes of every type the rules can name.
_BLOCK_SIZE: dict[str, int] = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q4_1": 32,
                               "q5_0": 32, "q5_1": 32, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256, "iq4_nl": 32,
                               "iq4_xs": 256}
# tensor_type_fallback(): what a 256-block type becomes when the row width is not a multiple of 256.
_WIDTH_FALLBACK: dict[str, str] = {"q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq4_xs": "iq4_nl"}

# Substrings that keep a 2-D "*weight" tensor unquantized (the subset of llama.cpp's list that can occur
# in the dense decoder-only models ondevice handles).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd", "pos_embd", "token_types",
                    "ssm_conv1d", "attn_rel_b.weight")

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True, eq=False)
class TensorTypeChoice(QuantType):
    """The type chosen for one tensor. It is a QuantType itself (it quantizes as `qtype`), and says why.

    wanted: the type the recipe's rules asked for, before the width fallback.
    fallback_from: `wanted` when it did not fit the row width and `qtype` replaced it, else None.
    reason: one line explaining the choice (or the fallback).
    """

    gguf_name: str
    qtype: QuantType
    wanted: str
    reason: str
    fallback_from: str | None = None

    @property  # type: ignore[override]
    def name(self) -> str:
        return self.qtype.name

    @property  # type: ignore[override]
    def ggml_type(self) -> int:
        return self.qtype.ggml_type

    @property  # type: ignore[override]
    def block_size(self) -> int:
        return self.qtype.block_size

    @property  # type: ignore[override]
    def type_size(self) -> int:
        return self.qtype.type_size

    @property
    def fell_back(self) -> bool:
        return self.fallback_from is not None

    @property  # type: ignore[override]
    def takes_importance(self) -> bool:
        return self.qtype.takes_importance

    def _quantize_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.qtype._quantize_rows(rows)

    def _quantize_rows_weighted(self, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        return self.qtype._quantize_rows_weighted(rows, importance)

    def _dequantize_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        return self.qtype._dequantize_rows(rows, n)

    def describe(self) -> str:
        if self.fallback_from:
            return f"{self.gguf_name}: {self.fallback_from} -> {self.qtype.name} ({self.reason})"
        return f"{self.gguf_name}: {self.qtype.name} ({self.reason})"

    def __repr__(self) -> str:
        return f"<TensorTypeChoice {self.describe()}>"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pattern for the extra-precision tensors of the _M recipes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def normalize_recipe(recipe: str) -> str:
    key = str(recipe).lower()
    if key not in _DEFAULT_TYPE:
        raise UnsupportedError(f"unknown quantization recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    return key


def _category(name: str) -> str:
    """tensor_get_category(): broad role from the GGUF name (substring tests, in llama.cpp's order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight", "attn_q.weight",
                "attn_output.weight"):
        if key in name:
            return key.removesuffix(".weight")
    for key in ("ffn_up", "ffn_gate", "ffn_down"):
        if key in name:
            return key
    return "other"


def _layer_index(name: str, n_layers: int) -> int:
    match = _LAYER.match(name)
    if match is None:
        raise UnsupportedError(f"cannot tell the layer of tensor {name!r} (expected a 'blk.N.' prefix)")
    index = int(match.group(1))
    if not 0 <= index < n_layers:
        raise UnsupportedError(f"tensor {name!r} is in layer {index} but the model has {n_layers} layers")
    return index


def _recipe_rules(recipe: str, default: str, name: str, n_cols: int, n_layers: int, tied: bool,
                  arch: str, has_imatrix: bool = False, n_gqa: int = 1) -> tuple[str, str]:
    """llama_tensor_get_type_impl() for the supported recipes: (wanted type, reason)."""
    category = _category(name)
    falcon = arch == "falcon"
    if category == "output" or (tied and category == "token_embd"):
        role = "output" if category == "output" else "tied token_embd (also the output)"
        if falcon or n_cols % _BLOCK_SIZE[default]:
            return "q8_0", f"{role}; width {n_cols} does not fit {default} blocks"
        if default != "q8_0":
            return "q6_k", f"{role}; more bits than the recipe type"
        return default, f"{role}; recipe type"
    if recipe in ("q3_k_m", "q3_k_l"):
        return _q3_k_rules(recipe, default, name, category, n_layers, falcon)
    iq4 = recipe in ("iq4_nl", "iq4_xs")
    k_mix = recipe in ("q4_k_m", "q5_k_m", "q4_k_s") or iq4
    if category in ("attn_v", "attn_qkv", "attn_kv_b") and iq4:
        if n_gqa >= 4:
            return "q5_k", f"{category}: {n_gqa} query heads per KV head"
    elif category in ("attn_v", "attn_qkv", "attn_kv_b") and k_mix:
        layer = _layer_index(name, n_layers)
        if recipe in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            return "q6_k", f"{category} of layer {layer}: a use_more_bits layer"
        if recipe == "q4_k_s" and layer < 4:  # llama.cpp counts attn_v tensors: in a dense model, the layer index
            return "q5_k", f"{category} of layer {layer}: one of the first 4"
    elif category == "ffn_down" and (k_mix or (recipe in ("q4_0", "q5_0") and has_imatrix)):
        layer = _layer_index(name, n_layers)
        if recipe == "q4_k_m":
            if falcon:
                if layer < n_layers // 16:
                    return "q6_k", f"ffn_down of layer {layer}: falcon, first sixteenth"
                if use_more_bits(layer, n_layers):
                    return "q5_k", f"ffn_down of layer {layer}: falcon, a use_more_bits layer"
            elif use_more_bits(layer, n_layers):
                return "q6_k", f"ffn_down of layer {layer}: a use_more_bits layer"
        elif iq4 and layer < n_layers // 8 and not has_imatrix:
            return "q5_k", f"ffn_down of layer {layer}: first eighth, without an imatrix"
        elif recipe == "q5_k_m" and use_more_bits(layer, n_layers):
            return "q6_k", f"ffn_down of layer {layer}: a use_more_bits layer"
        elif recipe == "q4_k_s" and not falcon and layer < n_layers // 8:
            return "q5_k", f"ffn_down of layer {layer}: first eighth"
        elif recipe in ("q4_0", "q5_0") and has_imatrix and layer < n_layers // 8:
            # llama.cpp guards the first eighth's ffn_down against Q4_0/Q5_0 going wrong even with an imatrix.
            wanted = "q4_1" if recipe == "q4_0" else "q5_1"
            return wanted, f"ffn_down of layer {layer}: first eighth, with an imatrix"
    return default, "recipe type"


def _q3_k_rules(recipe: str, default: str, name: str, category: str, n_layers: int, falcon: bool) -> tuple[str, str]:
    """llama_tensor_get_type_impl()'s Q3_K_M / Q3_K_L branches (output and tied embeddings handled before)."""
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        if recipe == "q3_k_l":
            return "q5_k", f"{category}: q3_k_l"
        layer = _layer_index(name, n_layers)  # llama.cpp counts attn_v tensors: in a dense model, the layer index
        if layer < 2:
            return "q5_k", f"{category} of layer {layer}: one of the first 2"
        return "q4_k", f"{category} of layer {layer}: after the first 2"
    if category == "ffn_down":
        layer = _layer_index(name, n_layers)
        if recipe == "q3_k_l":
            return ("q4_k", "ffn_down: falcon, q3_k_l") if falcon else ("q5_k", "ffn_down: q3_k_l")
        if layer < n_layers // 16:
            return "q5_k", f"ffn_down of layer {layer}: first sixteenth"
        if not falcon or use_more_bits(layer, n_layers):
            return "q4_k", f"ffn_down of layer {layer}: after the first sixteenth"
        return default, "recipe type"
    if category == "attn_output":
        if falcon:
            return ("q4_k", "attn_output: falcon, q3_k_l") if recipe == "q3_k_l" else (default, "recipe type")
        return ("q5_k" if recipe == "q3_k_l" else "q4_k"), f"attn_output: {recipe}"
    return default, "recipe type"


def plan_tensor_type(recipe: str, gguf_name: str, shape: Sequence[int], n_layers: int,
                     tied_embeddings: bool, arch: str, has_imatrix: bool = False, n_gqa: int = 1) -> TensorTypeChoice:
    """The type llama.cpp's quantizer would give tensor `gguf_name` (numpy `shape`, rows last), with why.
    `n_gqa`: query heads per KV head (the IQ4 recipes give attn_v more bits from 4 up)."""
    recipe = normalize_recipe(recipe)
    shape = tuple(int(dim) for dim in shape)
    f32 = QUANT_TYPES["f32"]
    if len(shape) < 2:
        return TensorTypeChoice(gguf_name, f32, "f32", "1-D tensor (norm or bias), kept f32")
    if not gguf_name.endswith("weight") or any(key in gguf_name for key in _NEVER_QUANTIZED):
        return TensorTypeChoice(gguf_name, f32, "f32", "norm or non-weight tensor, kept f32")
    default = _DEFAULT_TYPE[recipe]
    if recipe in _FLOAT_RECIPES:
        return TensorTypeChoice(gguf_name, get_quant_type(default), default, "recipe type")

    n_cols = shape[-1]
    wanted, reason = _recipe_rules(recipe, default, gguf_name, n_cols, n_layers, tied_embeddings, arch, has_imatrix,
                                   n_gqa)
    chosen = wanted
    fallback_from = None
    if n_cols % _BLOCK_SIZE[wanted]:
        # tensor_type_fallback(): a 256-block type drops to its 32-block stand-in; anything that still
        # does not divide the width is stored as F16.
        chosen = _WIDTH_FALLBACK.get(wanted, wanted)
        if n_cols % _BLOCK_SIZE[chosen]:
            chosen = "f16"
        fallback_from = wanted
        reason = f"row width {n_cols} is not a multiple of {_BLOCK_SIZE[wanted]}"
    if chosen not in QUANT_TYPES:
        raise UnsupportedError(
            f"recipe {recipe} wants {chosen} for tensor {gguf_name!r} and ondevice does not implement "
            f"{chosen}; use another recipe"
        )
    return TensorTypeChoice(gguf_name, QUANT_TYPES[chosen], wanted, reason, fallback_from)


def choose_tensor_type(recipe: str, gguf_name: str, shape: Sequence[int], n_layers: int,
                       tied_embeddings: bool, arch: str, has_imatrix: bool = False, n_gqa: int = 1) -> TensorTypeChoice:
    """The QuantType for one tensor (a TensorTypeChoice: usable as the QuantType, and it records fallbacks).
    `has_imatrix`: an importance matrix is given (llama.cpp then changes a few choices of q4_0, q5_0 and the IQ4
    recipes); `n_gqa`: query heads per KV head."""
    return plan_tensor_type(recipe, gguf_name, shape, n_layers, tied_embeddings, arch, has_imatrix, n_gqa)


def describe_fallbacks(choices: Iterable[TensorTypeChoice]) -> list[str]:
    """One line per tensor whose recipe type did not fit its width, e.g.
    "blk.0.attn_q.weight: q4_k -> q5_0 (row width 576 is not a multiple of 256)"."""
    return [choice.describe() for choice in choices if choice.fallback_from]
