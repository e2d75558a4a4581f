"""`ondevice inspect PATH [--json]`."""

from __future__ import annotations

import argparse


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
