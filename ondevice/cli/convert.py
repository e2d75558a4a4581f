"""`ondevice convert SRC --to TARGET --quant SCHEME -o OUT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ondevice.converters import TARGET_MODULES, get_target
from ondevice.converters.base import TargetOption, default_output
from ondevice.errors import UnsupportedError
from ondevice.formats.atomic import check_output_path

HELP = """\
Quantize a model and write it for a target runtime. The source is a Hugging Face folder, a GGUF file,
a model alias or hf:org/name. Tensors are streamed one at a time; the output is written atomically
(nothing partial is left on failure or Ctrl-C).

GGUF schemes: {gguf_schemes} ({gguf_generic}). Rows whose
width a K-quant cannot take (not a multiple of 256) fall back per tensor as llama.cpp does; the
fallbacks are printed. --imatrix FILE (from `ondevice imatrix` or llama-imatrix, GGUF or .dat) weights the
q4_0/q4_1/q5_0/q5_1/q3_k/q4_k/q5_k/q6_k/iq4_nl/iq4_xs tensors by the importance of their input columns, as
llama-quantize --imatrix does (same bytes); --calibrate computes that imatrix on the bundled calibration text first (SmolLM2-135M: ~2-4 min).
--method awq computes its own statistics layer by layer on the calibration text (the inputs of the model as
quantized so far) and scales each input channel before rounding (AWQ on each type's own quantizer): the scales
fold exactly into the RMSNorm weights and the v / up rows, so the file is an ordinary GGUF of the same size
(SmolLM2-135M: ~4 min; the lowest KL to the float model and a lower perplexity, docs/BENCHMARKS.md 3.1.3).
--method gptq keeps the imatrix rounding's scales and chooses the codes by GPTQ instead (lower KL, but a higher
held-out perplexity). --to mlx, onnx and executorch take --method awq too (each with its own rounding in the search).

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
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin pickles (they can run code: trusted sources only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_target_options(p)
    p.set_defaults(handler=run)


def target_flags() -> dict[str, list[tuple[str, TargetOption]]]:
    """flag -> [(target, its declaration)], in registry order: the flags each target declares beyond the common ones."""
    flags: dict[str, list[tuple[str, TargetOption]]] = {}
    for name in TARGET_MODULES:
        for option in get_target(name).TARGET.cli_options:
            flags.setdefault(option.flag, []).append((name, option))
    return flags


def add_target_options(p: argparse.ArgumentParser) -> None:
    """--help groups the flags by the targets that take them ("--to mlx, executorch"), each target's help."""
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for flag, owners in target_flags().items():
        names = tuple(name for name, _ in owners)
        if names not in groups:
            groups[names] = p.add_argument_group(f"--to {', '.join(names)} options")
        helps = "; ".join(f"{name}: {option.help}" if len(owners) > 1 else option.help for name, option in owners)
        dest = flag.lstrip("-").replace("-", "_")
        if owners[0][1].type is None:
            groups[names].add_argument(flag, dest=dest, action="store_true", default=None, help=helps)
        else:
            groups[names].add_argument(flag, dest=dest, type=owners[0][1].type, metavar=owners[0][1].metavar,
                                       default=None, help=helps)


def target_option_values(args: argparse.Namespace, target: str) -> dict[str, object]:
    """The options fields the given flags set for `target`; a flag of another target is an error, not ignored."""
    values: dict[str, object] = {}
    for flag, owners in target_flags().items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if given is None:
            continue
        mine = [option for name, option in owners if name == target]
        if not mine:
            others = ", ".join(name for name, _ in owners)
            raise UnsupportedError(f"{flag} does not apply to --to {target} (it is for --to {others})")
        values[mine[0].field] = mine[0].switch_value if mine[0].type is None else given
    return values


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
    extra = target_option_values(args, args.to)
    source = resolve_model(args.source)  # a missing source is the first thing to report
    out = args.output or default_output(args.source, writer.TARGET, scheme)
    check_output_path(out, args.force)  # fail before the expensive part
    model = open_source(source, allow_pickle=args.allow_pickle)
    try:
        options = writer.TARGET.options(quant=scheme, force=args.force, pre_tokenizer=args.pre_tokenizer,
                                        progress=not (args.no_progress or args.json), **extra)
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
