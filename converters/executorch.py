"""Target ExecuTorch (`--to executorch`): a `.pte` program lowered to XNNPACK, with a manifest beside it.

The program has one method, forward(tokens (1, S) int64, input_pos (1,) int64) -> logits (1, S, vocab), with S
dynamic in 1..max_chunk (prefill takes chunks, decode takes one token). The KV cache is static, held in mutable
buffers of max_seq_len positions, and handled by ExecuTorch's own LLM kernels as in its llama example:
llama::update_cache writes the new K/V rows at input_pos.. in place, llama::custom_sdpa attends causally to rows
0..input_pos+S-1 only (GQA inside the kernel), so resetting the cache is just starting again at position 0. The
graph breaks only at those kernels (RMSNorm's mean is a product with a constant row, so XNNPACK takes it too): 5
delegates instead of 22 on a 2-block model, and SmolLM2-135M exports in ~12 min where the old index_copy_ /
masked-SDPA graph had not finished after 46. The runner loads the same kernel library before the program.

Schemes: fp32; 8da4w (torchao: int8 dynamic per-token activations, int4 weights in groups of 32: on Q4_1's
asymmetric grid as a symmetric int4 part plus per-block offsets, see AsymmetricInt4; groups of 64+: symmetric);
int8 (8-bit dynamic activations, int8 per-channel weights). Every linear layer takes the scheme or the export
fails: a group size that does not divide a layer's input width is refused, never silently skipped (torchao's
own filter in ExecuTorch's llama export leaves such layers float). The embedding is int8 per row in quantized
schemes (gathered rows are dequantized, never the whole table).

A .pte cannot carry the chat template, so `<stem>.json` (the manifest: spec, special ids, chat template,
generation settings, per-layer schemes) and `<stem>.tokenizer.json` are written beside it, before the .pte
itself; every file is written atomically and the .pte last, so a .pte on disk always has its manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from ondevice.converters.base import (
    ConvertOptions,
    ConvertResult,
    Target,
    TargetOption,
    awq_folded,
    awq_target_options,
    check_calibration_chunks,
    check_method,
    count_types,
    options_as,
    peak_rss_mib,
    progress_bar,
)

from ondevice.architectures import get_architecture
from ondevice.decoder import DecoderOps, attention_scale, check_consumed, require_features, run_decoder
from ondevice.errors import MissingExtraError, OndeviceError, UnsupportedError
from ondevice.formats.atomic import atomic_output, check_output_path, write_text_atomic
from ondevice.model import CanonicalModel, ModelSpec
from ondevice.rope import rope_kind, rope_tables


@dataclass
class ExecuTorchOptions(ConvertOptions):
    group_size: int | None = None  # 8da4w weight group; None = 32
    max_seq_len: int | None = None  # KV cache positions; None = min(context length, 2048)
    method: str | None = None  # "awq": scales searched on the calibration text, folded in before the rounding
    calibration_chunks: int | None = None  # chunks of 512 tokens of the calibration text (default: all, 24)


METHODS = ("awq",)

TARGET = Target(
    name="executorch",
    quants=("fp32", "8da4w", "int8"),
    default_quant="8da4w",
    generic={"4bit": "8da4w", "8bit": "int8", "f32": "fp32"},
    output_is_dir=False,
    suffix=".pte",
    description="an ExecuTorch .pte program (XNNPACK) with a static KV cache, manifest and tokenizer beside it",
    options=ExecuTorchOptions,
    cli_options=(TargetOption("--group-size", "group_size", "8da4w weight group: 32 or 64 (default 32); must divide every width"),
                 TargetOption("--max-seq-len", "max_seq_len", "static KV cache length (default: min(context, 2048))"),
                 *awq_target_options("8da4w's Q4_1 grid in groups of 32", "executorch")),
)

MANIFEST_FORMAT = "ondevice-executorch/1"
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP = 32
DEFAULT_MAX_SEQ = 2048
MAX_CHUNK = 128  # the largest S of one forward call (prefill goes in chunks of this many tokens)


def manifest_path(pte: Path) -> Path:
    return pte.with_suffix(".json")


def tokenizer_path(pte: Path) -> Path:
    return pte.with_suffix(".tokenizer.json")


def require_torch_stack() -> None:
    try:
        import executorch  # noqa: F401
        import torch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError:
        raise MissingExtraError("--to executorch needs the executorch extra: pip install 'ondevice[executorch]'") from None


def load_llm_ops() -> None:
    """Register ExecuTorch's LLM ops (llama::update_cache, llama::custom_sdpa) with torch, and their kernels with
    the ExecuTorch runtime in this process (both come from the library this import loads)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


# ---------------------------------------------------------------------------------------------------------------
# the torch module


# What this graph builder expresses (decoder.FEATURES)
SUPPORTED_FEATURES = ("qkv_bias", "qk_norm", "rope_freq_factors", "norm_offset", "post_norms", "gelu_tanh",
                      "embed_scale", "attn_scale", "sliding_window", "local_rope_theta")


def build_module(model: CanonicalModel, max_seq: int, bar: Any = None) -> Any:
    """A torch decoder (float32) holding the model's weights by role and a zeroed static KV cache; its forward is
    ondevice.decoder.run_decoder over TorchOps."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    load_llm_ops()

    spec = model.spec
    require_features(spec, "executorch", SUPPORTED_FEATURES)
    arch = get_architecture(spec.arch)
    d, nh, nkv = spec.head_dim, spec.n_heads, spec.n_kv_heads

    def load(role: str, layer: int | None = None) -> Any:
        if bar is not None:
            bar.update(1)
        return torch.from_numpy(model.tensors[arch.hf_tensor(role, layer)].load())

    def linear(role: str, layer: int, bias: bool) -> nn.Linear:
        w = load(role, layer)
        module = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        module.weight = nn.Parameter(w, requires_grad=False)
        if bias:
            module.bias = nn.Parameter(load(f"{role}_bias", layer), requires_grad=False)
        return module

    class RMSNorm(nn.Module):
        def __init__(self, weight: Any) -> None:
            super().__init__()
            self.weight = nn.Parameter(weight, requires_grad=False)

            # The mean of squares as a product with a constant 1/width row: XNNPACK lowers mean.dim only over
            # the inner dims of a 4-D tensor, so a plain mean(-1) would split every block's partition in three.
            self.register_buffer("mean_row", torch.full((1, weight.shape[0]), 1.0 / weight.shape[0]),
                                 persistent=False)

        def forward(self, x: Any) -> Any:
            weight = self.weight + spec.norm_offset if spec.norm_offset else self.weight  # the source's w is stored
            return x * torch.rsqrt(F.linear(x * x, self.mean_row) + spec.rms_eps) * weight

    class Block(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            roles = arch.layer_roles(spec)
            self.norms = nn.ModuleDict({role: RMSNorm(load(role, i)) for role, shape in roles.items()
                                        if role.endswith("_norm")})
            self.linears = nn.ModuleDict({role: linear(role, i, spec.qkv_bias and role in ("q", "k", "v"))
                                          for role, shape in roles.items() if len(shape) == 2})
            # (1, positions, kv heads, head dim): the layout of ExecuTorch's llama::update_cache / custom_sdpa.
            self.register_buffer("k_cache", torch.zeros(1, max_seq, nkv, d), persistent=False)
            self.register_buffer("v_cache", torch.zeros(1, max_seq, nkv, d), persistent=False)

    class TorchOps(DecoderOps):
        def __init__(self, decoder: Decoder, tokens: Any, start: Any) -> None:
            super().__init__(spec)
            self.decoder, self.tokens, self.start = decoder, tokens, start
            self.s = tokens.shape[1]
            self.masks: dict[int, Any] = {}

        def tables(self, layer: int) -> tuple[Any, Any]:
            n = self.decoder.rope_of_layer[layer]
            cos, sin = getattr(self.decoder, f"rope_cos{n}"), getattr(self.decoder, f"rope_sin{n}")
            return cos.narrow(0, self.start, self.s), sin.narrow(0, self.start, self.s)

        def window_mask(self, window: int) -> Any:
            """(S, max_seq) additive mask: row p sees keys p-window+1..p."""
            if window not in self.masks:
                rows = torch.arange(self.s).unsqueeze(1) + self.start
                keys = torch.arange(max_seq).unsqueeze(0)
                visible = (keys <= rows) & (keys > rows - window)
                self.masks[window] = torch.where(visible, 0.0, float("-inf"))
            return self.masks[window]

        def scale(self, x: Any, factor: float) -> Any:
            return x * factor

        def embed(self) -> Any:
            self.tensor_name("embed", None)
            return self.decoder.embed_tokens(self.tokens)

        def norm(self, x: Any, role: str, layer: int | None) -> Any:
            self.tensor_name(role, layer)
            return self.decoder.norm(x) if layer is None else self.decoder.layers[layer].norms[role](x)

        def project(self, x: Any, roles: tuple[str, ...], layer: int, bias: bool = False) -> list[Any]:
            for role in roles:
                self.tensor_name(role, layer)
                if bias:
                    self.tensor_name(f"{role}_bias", layer)
            return [self.decoder.layers[layer].linears[role](x) for role in roles]

        def head_norm(self, x: Any, role: str, layer: int, n_heads: int) -> Any:
            self.tensor_name(role, layer)
            heads = x.view(1, x.shape[1], n_heads, d)
            return self.decoder.layers[layer].norms[role](heads).view(1, x.shape[1], n_heads * d)

        @staticmethod
        def rope(x: Any, cos: Any, sin: Any) -> Any:  # rotate-half, x (1, S, heads, d), cos/sin (S, 1, d/2)
            first, second = x[..., : d // 2], x[..., d // 2 :]
            return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

        def attention(self, q: Any, k: Any, v: Any, layer: int) -> Any:
            block, s = self.decoder.layers[layer], q.shape[1]
            cos, sin = self.tables(layer)
            q, k = self.rope(q.view(1, s, nh, d), cos, sin), self.rope(k.view(1, s, nkv, d), cos, sin)
            # ExecuTorch's own LLM kernels (the ones its llama example uses): the cache rows start.. are written in
            # place, and the causal attention reads rows 0..start+S-1 only (never an unwritten row), with GQA
            # handled inside the kernel. Everything between two of these is one XNNPACK partition.
            torch.ops.llama.update_cache(k, block.k_cache, self.start)
            torch.ops.llama.update_cache(v.view(1, s, nkv, d), block.v_cache, self.start)
            window, scale = spec.window(layer), attention_scale(spec)
            mask = self.window_mask(window) if window else None  # causal within the window, else causal
            ctx = torch.ops.llama.custom_sdpa(q, block.k_cache, block.v_cache, self.start, mask, 0.0, not window,
                                              scale)
            return ctx.reshape(1, s, nh * d)

        def gated_act(self, gate: Any, up: Any, layer: int) -> Any:
            if spec.activation == "gelu_tanh":
                # spelled out: XNNPACK lowers F.gelu(approximate="tanh") to its erf GELU (5e-3 off transformers)
                u = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
                return 0.5 * gate * (1.0 + torch.tanh(u)) * up
            return F.silu(gate) * up

        def add(self, x: Any, y: Any, layer: int, what: str) -> Any:
            return x + y

        def logits(self, x: Any) -> Any:
            self.tensor_name("embed" if spec.tie_embeddings else "output", None)
            return self.decoder.lm_head(x)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            table = load("embed")
            self.embed_tokens = nn.Embedding(table.shape[0], table.shape[1])
            self.embed_tokens.weight = nn.Parameter(table, requires_grad=False)
            self.layers = nn.ModuleList([Block(i) for i in range(spec.n_layers)])
            self.norm = RMSNorm(load("final_norm"))
            # Tied: the output layer starts from the same table (quantization gives it its own copy).
            head = table if spec.tie_embeddings else load("output")
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
            self.lm_head.weight = nn.Parameter(head.clone() if spec.tie_embeddings else head, requires_grad=False)
            # one (cos, sin) pair per distinct RoPE of the layers (gemma3: the sliding layers' base and the global)
            kinds = [rope_kind(spec, i) for i in range(spec.n_layers)]
            firsts = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}
            self.rope_of_layer = [list(firsts).index(kind) for kind in kinds]
            for n, layer in enumerate(firsts.values()):
                cos, sin = rope_tables(spec, max_seq, layer=layer)
                self.register_buffer(f"rope_cos{n}", torch.from_numpy(cos.reshape(max_seq, 1, -1).copy()),
                                     persistent=False)
                self.register_buffer(f"rope_sin{n}", torch.from_numpy(sin.reshape(max_seq, 1, -1).copy()),
                                     persistent=False)
            self.used_tensors: set[str] = set()  # filled by a forward pass, for check_consumed

        def forward(self, tokens: Any, input_pos: Any) -> Any:
            start = input_pos[0].item()
            torch._check_is_size(start)
            torch._check(start + tokens.shape[1] <= max_seq)
            ops = TorchOps(self, tokens, start)
            logits = run_decoder(ops)
            self.used_tensors |= ops.used
            return logits

    return Decoder().eval()


class QuantizedEmbedding:
    """Factory for an int8 per-row embedding module: gathers code rows and their scales, then dequantizes."""

    @staticmethod
    def create(table: Any) -> Any:
        import torch
        from torch import nn

        class Int8Embedding(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                scale = table.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
                self.register_buffer("codes", torch.round(table / scale).clamp(-127, 127).to(torch.int8))
                self.register_buffer("scales", scale.to(torch.float32))

            def forward(self, tokens: Any) -> Any:
                return self.codes[tokens].to(torch.float32) * self.scales[tokens]

        return Int8Embedding()


class AsymmetricInt4:
    """A linear layer on Q4_1's grid (per block of 32: weight = d * code + m, code 0..15) in 8da4w form.

    8da4w weights are symmetric: d * c with c in -8..7. Q4_1's are not, but d * code + m = d * (code - 8) + (m + 8 d):
    a symmetric int4 part that 8da4w holds exactly (torchao's SYMMETRIC_NO_CLIPPING_ERR picks scale d when the
    block spans -8..7, which Q4_1's codes 0..15 do by construction) plus one float offset per block, applied to the
    block sums of the input. The offsets cost 32 bits per 32 weights (fp32; XNNPACK runs them as a small linear).
    From a Q4_1 source the grid is the source's own (re-quantizing its dequantized weights with Q4_1's rule gives
    them back), so the only 4-bit loss left is the int8 activations'; symmetric int4 on a second grid doubled it
    (SmolLM2: top-1 54%)."""

    @staticmethod
    def split(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """weight (N, K) -> (symmetric part d * (code - 8) (N, K), per-block offsets m + 8 d (N, K / 32))."""
        from ondevice.quant import get_quant_type
        from ondevice.quant.affine import centered

        q4_1 = get_quant_type("q4_1")
        rows, width = weight.shape
        codes, scale, bias = q4_1.affine_codes(q4_1.quantize(weight), width)
        signed, offsets = centered(codes, scale, bias)
        symmetric = (signed.astype(np.float32).reshape(rows, -1, 32) * scale[..., None]).reshape(rows, width)
        return symmetric, offsets

    @staticmethod
    def create(linear: Any, block_sums: Any) -> Any:
        """`linear` rebuilt as symmetric part + block offsets; `block_sums` (K / 32, K) of ones, shared per width."""
        import torch
        from torch import nn
        from torch.nn import functional as F

        symmetric, offsets = AsymmetricInt4.split(linear.weight.data.numpy())

        class OffsetLinear(nn.Module):
            # Everything comes in as arguments: a closure over `linear` would keep its float32 weight alive.
            def __init__(self, symmetric: Any, offsets: Any, bias: Any, block_sums: Any) -> None:
                super().__init__()
                self.symmetric = nn.Linear(symmetric.shape[1], symmetric.shape[0], bias=bias is not None)
                self.symmetric.weight = nn.Parameter(symmetric, requires_grad=False)
                if bias is not None:
                    self.symmetric.bias = bias
                # A parameter, not an nn.Linear: torchao's filter quantizes `symmetric` only.
                self.offsets = nn.Parameter(offsets, requires_grad=False)
                self.register_buffer("block_sums", block_sums, persistent=False)

            def forward(self, x: Any) -> Any:
                return self.symmetric(x) + F.linear(F.linear(x, self.block_sums), self.offsets)

        return OffsetLinear(torch.from_numpy(symmetric), torch.from_numpy(offsets), linear.bias, block_sums)


def _replace_with_asymmetric(module: Any, linears: dict[str, Any]) -> None:
    import torch

    sums: dict[int, Any] = {}
    for name, linear in linears.items():
        width = linear.in_features
        if width not in sums:
            sums[width] = torch.repeat_interleave(torch.eye(width // 32), 32, dim=1)  # (K / 32, K)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, AsymmetricInt4.create(linear, sums[width]))


def quantize_module(module: Any, quant: str, group: int) -> dict[str, str]:
    """Quantize every linear layer (and the embedding) in place; the scheme of each layer, checked afterwards.

    8da4w in groups of 32 puts every weight on Q4_1's asymmetric grid (AsymmetricInt4); other groups are plain
    symmetric int4."""
    import torch
    from torch import nn
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    asymmetric = quant == "8da4w" and group == 32
    if quant == "8da4w":
        bad = [f"{name} (width {m.in_features})" for name, m in linears.items() if m.in_features % group]
        if bad:
            raise UnsupportedError(f"--group-size {group} does not divide the input width of {len(bad)} linear "
                                   f"layers, e.g. {bad[0]}; choose a group size that divides "
                                   f"{min(m.in_features for m in linears.values())}")
        mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if asymmetric else MappingType.SYMMETRIC
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group),
                                                       weight_mapping_type=mapping)
        scheme = "8da4w-g32-asym" if asymmetric else f"8da4w-g{group}"
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        scheme = "8da8w-per-channel"
    with torch.no_grad():
        if asymmetric:
            _replace_with_asymmetric(module, linears)
        quantize_(module, config, lambda m, fqn: isinstance(m, nn.Linear))
        module.embed_tokens = QuantizedEmbedding.create(module.embed_tokens.weight.data)
    schemes: dict[str, str] = {"embed_tokens": "int8-per-row"}
    # Check the result rather than trust the filter: a linear whose weight is still a plain tensor was skipped.
    for name in linears:
        layer = module.get_submodule(name)
        weight = layer.symmetric.weight if asymmetric else layer.weight
        if type(weight.data) is torch.Tensor:
            raise OndeviceError(f"torchao left {name} unquantized; please report this")
        schemes[name] = scheme
    return schemes


def export_program(module: Any, max_seq: int, max_chunk: int) -> bytes:
    """torch.export with a dynamic sequence length, XNNPACK lowering, ExecuTorch program bytes."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torchao.utils import unwrap_tensor_subclass

    module = unwrap_tensor_subclass(module)
    seq = torch.export.Dim("seq", min=1, max=max_chunk)
    example = (torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with torch.no_grad():
        exported = torch.export.export(module, example, dynamic_shapes=({1: seq}, None), strict=False)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,
        do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
    ))
    return program.buffer


def make_manifest(model: CanonicalModel, quant: str, group: int | None, max_seq: int, max_chunk: int,
                  schemes: dict[str, str], pte: Path) -> dict[str, Any]:
    spec, special = model.spec, model.special
    generation = {k: v for k, v in model.generation_config.items() if v is not None}
    return {
        "format": MANIFEST_FORMAT,
        "program": pte.name,
        "tokenizer": tokenizer_path(pte).name,
        "method": "forward",
        "inputs": ["tokens (1, S) int64", "input_pos (1,) int64"],
        "max_seq_len": max_seq,
        "max_chunk": max_chunk,
        "quant": quant,
        "group_size": group,
        "spec": {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__},
        "special": {"bos_id": special.bos_id, "eos_id": special.eos_id, "eos_ids": list(special.eos_ids),
                    "pad_id": special.pad_id, "add_bos": special.add_bos},
        "chat_template": model.chat_template,
        "generation": generation,
        "layers": schemes,
    }


class _Unweighted:
    """A quantizer as AWQ's search sees it, without importance weights: AsymmetricInt4.split rounds each linear by
    Q4_1's plain rule, so the search must too."""

    def __init__(self, name: str) -> None:
        from ondevice.quant import get_quant_type

        self.qtype = get_quant_type(name)
        self.name = f"{name}_unweighted"

    def quantize(self, x: np.ndarray, *, name: str | None = None, importance: np.ndarray | None = None) -> np.ndarray:
        return self.qtype.quantize(x)

    def dequantize(self, data: np.ndarray, n: int) -> np.ndarray:
        return self.qtype.dequantize(data, n)


def awq_types(model: CanonicalModel) -> dict:
    """What AWQ's search rounds each tensor with: Q4_1's rule for the block linears (8da4w in groups of 32 holds
    that grid exactly), float for the rest (the int8 embedding and the output layer are not scaled by AWQ)."""
    from ondevice.quant import get_quant_type

    f32, q4_1 = get_quant_type("f32"), _Unweighted("q4_1")
    arch = get_architecture(model.spec.arch)
    types = {name: f32 for name in model.tensors}
    for layer in range(model.spec.n_layers):
        types.update({arch.hf_tensor(role, layer): q4_1 for role in ("q", "k", "v", "o", "gate", "up", "down")})
    return types


def convert(model: CanonicalModel, out: Path, options: ConvertOptions) -> ConvertResult:
    options = options_as(ExecuTorchOptions, options)
    require_torch_stack()
    start = time.perf_counter()
    quant = options.quant
    spec = model.spec
    group = options.group_size
    if group is not None and quant != "8da4w":
        raise UnsupportedError(f"--group-size applies to --quant 8da4w only, not {quant}")
    if quant == "8da4w":
        group = DEFAULT_GROUP if group is None else group
        if group not in GROUP_SIZES:
            raise UnsupportedError(f"--group-size {group} is not supported; choose 32, 64, 128 or 256")
    check_method(options.method, METHODS, "executorch")
    if options.method is not None and (quant != "8da4w" or group != DEFAULT_GROUP):
        raise UnsupportedError(f"--method {options.method} applies to --quant 8da4w in groups of {DEFAULT_GROUP} "
                               "(Q4_1's grid, which the search rounds with)")
    check_calibration_chunks(options.calibration_chunks, options.method is not None, "--method awq")
    max_seq = options.max_seq_len or min(spec.context_length, DEFAULT_MAX_SEQ)
    if max_seq < 2:
        raise UnsupportedError(f"max_seq_len {max_seq} is too small")
    max_chunk = min(MAX_CHUNK, max_seq - 1)
    out = Path(out)
    sidecars = [manifest_path(out), tokenizer_path(out)]
    for path in [out, *sidecars]:
        check_output_path(path, options.force)  # fail before minutes of export

    if options.method is not None:  # the module is built from the folded tensors in the source's place
        model = replace(model, tensors={**model.tensors, **awq_folded(model, awq_types(model),
                                                                       options.calibration_chunks, options.progress)})
    with progress_bar(len(model.tensors), f"executorch {quant}", options.progress) as bar:
        module = build_module(model, max_seq, bar)
    if quant == "fp32":
        schemes = {name: "fp32" for name, _ in module.named_modules() if name and not list(_.children())
                   and hasattr(_, "weight")}
    else:
        schemes = quantize_module(module, quant, group or 0)
    buffer = export_program(module, max_seq, max_chunk)
    check_consumed(model.tensors, module.used_tensors, "executorch")
    del module

    manifest = make_manifest(model, quant, group if quant == "8da4w" else None, max_seq, max_chunk, schemes, out)
    write_text_atomic(tokenizer_path(out), model.tokenizer_json, force=options.force)
    write_text_atomic(manifest_path(out), json.dumps(manifest, indent=1) + "\n", force=options.force)
    with atomic_output(out, force=options.force) as tmp:
        tmp.write_bytes(buffer)
    size = len(buffer)
    types = [s for name, s in schemes.items() if name != "embed_tokens"]
    notes = [f"executorch {quant}: XNNPACK, static KV cache of {max_seq} positions, prefill chunks of "
             f"{max_chunk}; manifest {manifest_path(out).name}, tokenizer {tokenizer_path(out).name}"]
    if options.method is not None:
        notes.append(f"{options.method}: scales folded into the norms and the v/up rows before the rounding")
    if quant != "fp32":
        notes.append("embedding: int8 per row" + (" (own copy; the output layer is quantized separately)"
                                                 if spec.tie_embeddings else ""))
    return ConvertResult(target="executorch", quant=quant, output=str(out), size_bytes=size,
                         seconds=time.perf_counter() - start, tensor_types=count_types(types), notes=notes,
                         peak_rss_mib=peak_rss_mib())
