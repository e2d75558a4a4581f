"""`ondevice export MODEL --app {pocketpal,ios,android,react-native} -o DIR`: a model bundle for a phone app."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """\
Write a folder an app can load: the model file, its tokenizer and chat template, and manifest.json (context
length, stop tokens, recommended sampling, RAM estimate from `ondevice fit`). The manifest follows a versioned
JSON Schema (ondevice/data/schemas/app-bundle-manifest.v2.schema.json) and is validated before the folder
appears.

  pocketpal  the GGUF + manifest, for PocketPal AI and other llama.cpp-based apps
  ios        --format gguf (default): the GGUF for llama.cpp-based iOS apps + tokenizer.json + chat template
             (Swift sample: apps/ios); --format coreml: a Core ML .mlpackage (iOS 18 mlprogram, stateful KV
             cache; --quant int4 (default), int8 or fp16) with its tokenizer and runtime manifest
  android    --format gguf (default): the GGUF for llama.cpp on Android; --format pte: an ExecuTorch .pte
             (XNNPACK) with its tokenizer and runtime manifest (Kotlin sample: apps/android)
  react-native  for the @ondevice/react-native SDK (sdk/react-native): --format gguf (default) for llama.rn,
             --format pte for react-native-executorch; both with tokenizer_config.json (chat template, EOS)

examples:
  ondevice export smollm2-135m-instruct --app pocketpal -o smol-pocketpal
  ondevice export model.gguf --app android --format pte -o smol-android
  ondevice export smollm2-135m-instruct --app ios --format coreml -o smol-ios-coreml
  ondevice export smollm2-135m-instruct --app react-native -o smol-rn
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ondevice.export_bundle import APPS

    p = sub.add_parser("export", help="bundle a model for a phone app (PocketPal, iOS, Android, React Native)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="GGUF file or alias")
    p.add_argument("--app", required=True, choices=APPS, help="the kind of app")
    p.add_argument("-o", "--output", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--format", dest="model_format", choices=("gguf", "pte", "coreml"),
                   help="model format (ios: gguf or coreml; android, react-native: gguf or pte; pocketpal: gguf)")
    p.add_argument("--quant", help="scheme for --format pte (default 8da4w) or coreml (int4, int8, fp16; default int4)")
    p.add_argument("--device", help="device profile for the RAM estimate (see `ondevice fit --list`)")
    p.add_argument("--ctx", type=int, help="context the RAM estimate is sized for (default 2048)")
    p.add_argument("--name", help="display name apps show, written to the manifest and the GGUF's general.name "
                   "(default: general.name, or the file/repo name when general.name is a training-run slug)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ondevice.cli import print_json
    from ondevice.export_bundle import export_bundle

    result = export_bundle(args.model, args.app, args.output, model_format=args.model_format,
                           device=args.device, ctx=args.ctx, quant=args.quant, name=args.name, force=args.force,
                           progress=not args.json)
    if args.json:
        print_json(result.to_json())
        return 0
    m, ram = result.manifest["model"], result.manifest["ram"]
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {result.output}/ for {args.app}: {m['file']} ({m['format']} {m['quantization']}), manifest.json "
          f"(validated); RAM ~{ram['estimate_bytes'] / 1e6:.0f} MB at context {ram['context']} on {ram['device']}")
    return 0
