"""`ondevice convert SRC --to TARGET --quant SCHEME -o OUT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ondevice.converters import TARGET_MODULES, get_target
from ondevice.converters.base import ConvertOptions, default_output
from ondevice.formats.atomic import check_output_path

HELP = """\
Quantize a model and write it for a target runtime. The source is a Hugging Face folder, a GGUF file,
a model alias or hf:org/name. Tensors are streamed one at a time; the output is written atomically
(nothing partial is left on failure or Ctrl-C).

GGUF schemes: {gguf_schemes} ({gguf_generic}). Rows whose
width a K-quant cannot take (not a multiple of 256) fall back per tensor as llama.cpp does; the
fallbacks are printed.

Core ML int4: blocks of 32 in Q4_1's asymmetric form (int4 codes, fp16 scales, int8 block offsets: 4.75 bits per
weight); a Q4_0/Q4_1 source's grids are copied, and the output layer is quantized by GPTQ on a bundled
calibration text (SmolLM2: 91 s instead of 81 s; --no-calibrate rounds it instead).
"""


def _help() -> str:
    gguf = get_target("gguf").TARGET
    generic = ", ".join(f"{name} = {scheme}" for name, scheme in gguf.generic.items())
    return HELP.format(gguf_schemes=" ".join(gguf.quants), gguf_generic=generic)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="quantize and convert a model for a target runtime", description=_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="HF folder, .gguf file, alias or hf:org/name")
    p.add_argument("--to", required=True, choices=list(TARGET_MODULES), help="target format")
    p.add_argument("--quant", help="scheme for the target (default: the target's default; 4bit/8bit: recommended)")
    p.add_argument("-o", "--output", type=Path, help="output file or folder (default: derived from SRC)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--pre", dest="pre_tokenizer", metavar="NAME",
                   help="llama.cpp pre-tokenizer name when it cannot be detected (e.g. smollm, llama-bpe, qwen2)")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="quantization group (mlx: 32/64/128; executorch 8da4w: 32/64); must divide every width")
    p.add_argument("--block-size", type=int, metavar="N", help="int4 block (onnx MatMulNBits, coreml; default 32)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="KV cache length of executorch/coreml programs")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="coreml int4: round the output layer to the grid instead of GPTQ on the bundled calibration "
                        "text (SmolLM2: 10 s faster, top-1 80%% instead of 91%%)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin pickles (they can run code: trusted sources only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def summarize_fallbacks(fallbacks: list[str]) -> list[str]:
    """Group per-tensor fallback lines ("name: a -> b (reason)") into one line per kind (--json keeps all)."""
    groups: dict[str, list[str]] = {}
    for line in fallbacks:
        name, _, what = line.partition(": ")
        groups.setdefault(what, []).append(name)
    return [f"{len(names)} tensors {what}, e.g. {names[0]}" if len(names) > 1 else f"{names[0]}: {what}"
            for what, names in groups.items()]


def run(args: argparse.Namespace) -> int:
    from ondevice.cli import print_json
    from ondevice.hub import resolve_model
    from ondevice.sources import open_source

    writer = get_target(args.to)
    scheme, note = writer.TARGET.resolve_quant(args.quant)
    source = resolve_model(args.source)  # a missing source is the first thing to report
    out = args.output or default_output(args.source, writer.TARGET, scheme)
    check_output_path(out, args.force)  # fail before the expensive part
    model = open_source(source, allow_pickle=args.allow_pickle)
    try:
        options = ConvertOptions(quant=scheme, force=args.force, pre_tokenizer=args.pre_tokenizer,
                                 progress=not (args.no_progress or args.json), group_size=args.group_size,
                                 block_size=args.block_size, max_seq_len=args.max_seq_len, calibrate=args.calibrate)
        result = writer.convert(model, out, options)
    finally:
        model.close()
    if note:
        result.notes.append(note)
    if args.json:
        print_json(result.to_json())
        return 0
    for line in result.notes:
        print(f"note: {line}", file=sys.stderr)
    for line in summarize_fallbacks(result.fallbacks):
        print(f"fallback: {line}", file=sys.stderr)
    mix = ", ".join(f"{n} {t}" for t, n in result.tensor_types.items())
    print(f"wrote {result.output} ({result.size_bytes / 1e6:.1f} MB, {args.to} {result.quant}; tensors: {mix}) "
          f"in {result.seconds:.1f} s, peak RSS {result.peak_rss_mib:.0f} MiB")
    return 0
