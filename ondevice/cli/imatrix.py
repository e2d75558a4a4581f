"""`ondevice imatrix MODEL -o FILE`: the importance matrix of a model over a calibration text (llama.cpp's formats)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = """\
Compute an importance matrix: for every matrix of the model's blocks, the sum over the calibration tokens of each
input column's squared activation, and the token count, by ondevice's numpy float32 reference of the model. The
text is cut into chunks of --ctx tokens as llama-imatrix does (each chunk opened by the BOS). The output is
llama.cpp's format, so it interchanges with llama-imatrix and llama-quantize --imatrix: the GGUF form
(<tensor>.in_sum2, <tensor>.counts), or its legacy binary when FILE ends in .dat. Written atomically: Ctrl-C
leaves nothing behind. Use it with `ondevice convert MODEL --to gguf --quant q4_k_m --imatrix FILE`.

examples:
  ondevice imatrix smollm2-135m-instruct -o smol.imatrix.gguf
  ondevice imatrix ./SmolLM2-135M-Instruct --text my-domain.txt --ctx 256 -o smol.imatrix.dat
  ondevice imatrix smol.gguf --chat --chunks 8 -o smol-chat.imatrix.gguf --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("imatrix", help="importance matrix over a calibration text (llama.cpp's imatrix formats)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, alias or hf:org/name")
    p.add_argument("--text", metavar="FILE", help="calibration text, UTF-8 (- reads standard input; default: the "
                                                   "bundled ondevice/data/calibration_text.txt)")
    p.add_argument("--chat", action="store_true", help="wrap the text in the model's chat template (paragraphs "
                                                       "alternate user and assistant turns)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, help="use at most this many chunks (default: all the text holds)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output file (.gguf, or .dat for the legacy form)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pytorch_model.bin pickles (they can run code: trusted sources only)")
    p.add_argument("--json", action="store_true", help="print a summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ondevice.bench.evaluate import EvalText
    from ondevice.cli import print_json
    from ondevice.formats.atomic import check_output_path
    from ondevice.hub import resolve_model
    from ondevice.quant.imatrix import calibrate
    from ondevice.sources import open_source

    start = time.perf_counter()
    text, label = None, ""
    if args.text:  # read first: a wrong --text fails before the model is loaded
        given = EvalText.read(args.text)
        text, label = given.text, given.label
    source = resolve_model(args.model)
    check_output_path(args.output, args.force)
    model = open_source(source, allow_pickle=args.allow_pickle)
    try:
        imatrix = calibrate(model, text, label=label, ctx=args.ctx, chunks=args.chunks, chat=args.chat,
                            progress=not (args.no_progress or args.json))
    finally:
        model.close()
    size = imatrix.save(args.output, force=args.force)
    summary = {**imatrix.summary(), "output": str(args.output), "format": "dat" if args.output.suffix.lower() ==
               ".dat" else "gguf", "size_bytes": size, "chat": bool(args.chat),
               "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {args.output} ({summary['format']}, {summary['entries']} matrices, {summary['tokens']} tokens in "
          f"{summary['chunks']} chunks of {summary['chunk_size']}) in {summary['seconds']:.1f} s", file=sys.stderr)
    return 0
