"""`ondevice inspect PATH [--json]`."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a model file or folder holds",
                       description="Architecture, parameter count, quantization mix, size, tokenizer, "
                                   "pre-tokenizer, chat template and metadata of a model artifact.")
    p.add_argument("path", metavar="PATH", help="model file/folder or alias")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ondevice.cli import print_json
    from ondevice.hub import resolve_model
    from ondevice.inspect import inspect_model

    info = inspect_model(resolve_model(args.path))
    if args.json:
        print_json(info)
        return 0
    if info["format"] not in ("gguf", "hf"):
        _print_target(info)
        return 0
    spec = info["spec"]
    print(f"{info['path']}")
    print(f"  format        {info['format']}  ({info['size_bytes'] / 1e6:.1f} MB, "
          f"{info['bits_per_weight']} bits/weight)")
    print(f"  architecture  {info['architecture']}  {info['parameters'] / 1e6:.1f}M parameters, "
          f"{spec['n_layers']} layers, width {spec['hidden_size']}, heads {spec['n_heads']}/{spec['n_kv_heads']}, "
          f"ffn {spec['ffn_size']}, context {spec['context_length']}, tied embeddings {spec['tie_embeddings']}")
    if "quant_mix" in info:
        mix = ", ".join(f"{k}: {v['tensors']} ({v['bytes'] / 1e6:.1f} MB)" for k, v in info["quant_mix"].items())
        print(f"  quant mix     {mix}")
    if "dtypes" in info:
        print(f"  dtypes        {info['dtypes']}")
    tok = info["tokenizer"]
    print(f"  tokenizer     vocab {tok['vocab_size']}, pre-tokenizer {tok['pre_tokenizer']}, bos {tok['bos_id']}, "
          f"eos {tok['eos_ids']}, add_bos {tok['add_bos']}")
    template = info["chat_template"]
    print(f"  chat template {'none' if not template else f'{len(template)} chars: ' + template[:60]!r}")
    return 0


def _print_target(info: dict[str, Any]) -> None:
    """MLX / ONNX / ExecuTorch / Core ML: the common facts, then what is particular to the format."""
    spec = info.get("spec") or {}
    print(info["path"])
    bits = f", {info['bits_per_weight']} bits/weight" if info.get("bits_per_weight") else ""
    print(f"  format        {info['format']}  ({info['size_bytes'] / 1e6:.1f} MB{bits}), quant {info['quant']}")
    shape = ", ".join(f"{key} {spec[key]}" for key in ("n_layers", "hidden_size", "n_heads", "n_kv_heads",
                                                        "head_dim", "ffn_size", "context_length", "tie_embeddings")
                      if spec.get(key) is not None)
    params = f"  {info['parameters'] / 1e6:.1f}M parameters," if info.get("parameters") else ""
    print(f"  architecture  {info.get('architecture')}{params} {shape}")
    if info["format"] == "mlx":
        print(f"  quantization  {info['quantization']}; {info['quantized_layers']} quantized layers, "
              f"left in float: {', '.join(info['float_layers']) or 'none'}; tensor dtypes {info['tensor_dtypes']}")
    elif info["format"] == "onnx":
        graph = info["graph"]
        top = ", ".join(f"{op} {n}" for op, n in list(graph["ops"].items())[:8])
        print(f"  graph         {graph['file']}: {graph['nodes']} nodes of {graph['op_types']} op types ({top}); "
              f"MatMulNBits {graph['matmul_nbits'] or 'none'}; initializers {graph['initializers']}")
    elif info["format"] == "coreml":
        program = info["program"]
        print(f"  program       {program['opset']}, {program['operations']} operations; blockwise int4 weights "
              f"{program['blockwise_int4']}, int8 {program['blockwise_int8']}; linear layers {program['linear_ops']} "
              f"({program['linear_with_compressed_weight']} on compressed weights); states {program['states']}")
    elif info["format"] == "pte":
        program = info["program"]
        print(f"  program       {program['identifier']}, method {program['method']}, KV cache "
              f"{program['max_seq_len']} positions, prefill chunks of {program['max_chunk']}")
    if info.get("layer_schemes"):
        print(f"  layer schemes {info['layer_schemes']} (manifest {info['manifest']})")
    if info.get("files"):
        print("  files         " + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in info["files"].items()))
    tok = info.get("tokenizer") or {}
    print(f"  tokenizer     vocab {tok.get('vocab_size')}, bos {tok.get('bos_id')}, eos {tok.get('eos_ids')}, "
          f"add_bos {tok.get('add_bos')}")
    template = info.get("chat_template")
    print(f"  chat template {'none' if not template else f'{len(template)} chars: ' + template[:60]!r}")
