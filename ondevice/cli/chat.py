"""`ondevice chat [MODEL]`: an interactive multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from ondevice.cli.run import add_sampling_args

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal",
                       description="Chat with a model. Commands: /reset clears the conversation, /exit quits "
                                   "(or Ctrl-D). Earlier turns stay in the KV cache, so each reply starts fast.")
    p.add_argument("model", nargs="?", metavar="MODEL", help="GGUF file or alias (default: smollm2-135m-instruct)")
    p.add_argument("--timings", action="store_true", help="print a timing line after each reply")
    add_sampling_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import ondevice
    from ondevice.cli.run import sampling_kwargs, timing_line
    from ondevice.converters.base import peak_rss_mib
    from ondevice.errors import OndeviceError

    model = ondevice.load(args.model, threads=args.threads, n_ctx=args.ctx, kv_cache=args.kv_cache)
    if not model.chat_template:
        raise OndeviceError(f"{model.path} has no chat template; use `ondevice run --raw` instead")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model.path} ({model.spec.arch}, {model.threads} threads). /reset, /exit",
              file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(system)
            model.reset()
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in model.generate(messages, **sampling_kwargs(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except OndeviceError as exc:  # e.g. the context is full: say so and keep the session
            print(f"\nondevice: {exc}", file=sys.stderr)
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.timings:
            print(timing_line(model.last_stats, peak_rss_mib()), file=sys.stderr)
    return 0
