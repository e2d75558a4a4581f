"""The `ondevice` command. Each subcommand is a module with `register(subparsers)` and `run(args) -> int`;
adding one is a new module plus a line in COMMANDS."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
import traceback
from typing import Any

from ondevice import __version__
from ondevice.errors import OndeviceError

COMMANDS = ("convert", "imatrix", "inspect", "run", "chat", "models", "bench", "eval", "fit", "serve", "export",
            "sweep")

EPILOG = """\
examples:
  ondevice convert smollm2-135m-instruct --to gguf --quant q4_k_m -o smol.gguf
  ondevice convert ./SmolLM2-135M-Instruct --to gguf --quant 4bit
  ondevice convert smol.gguf --to hf -o ./smol-hf
  ondevice inspect smol.gguf --json
  ondevice run -p "Name three uses of a paperclip." -n 64 --temp 0
  ondevice chat smol.gguf
  ondevice bench smollm2-135m-instruct --to gguf --quant 4bit,8bit --backend ondevice,llama.cpp
  ondevice serve smol.gguf --port 8080
  ondevice models list

MODEL may be a path (Hugging Face folder or .gguf file), an alias from `ondevice models list`,
or hf:org/name (needs `pip install 'ondevice[hub]'`).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ondevice",
        description="Convert, quantize, run and benchmark small language models on device.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ondevice {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ondevice.cli.{name}").register(sub)
    _accept_debug_anywhere(sub)
    return parser


def _accept_debug_anywhere(sub: argparse._SubParsersAction) -> None:
    """`--debug` after the subcommand too (SUPPRESS: a subcommand's parser never resets the top-level value)."""
    commands = set(sub._name_parser_map.values())  # aliases map to the same parser
    for command in commands:
        if "--debug" in command._option_string_actions:
            continue
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks on errors")
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_debug_anywhere(action)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C does, so atomic writers remove their temporary output.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except OndeviceError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"ondevice: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ondevice: interrupted; nothing partial was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # last resort: still one line, unless --debug
        if args.debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"ondevice: internal error: {type(exc).__name__}: {first} (rerun with --debug for details)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
