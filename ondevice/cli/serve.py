"""`ondevice serve [MODEL] [--onnx DIR]`: a local OpenAI-compatible server with a browser chat page at /, and/or
the in-browser chat page that runs an ONNX export in the browser (onnxruntime-web)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import sys
from pathlib import Path

HELP = """\
Serve a model over an OpenAI-compatible HTTP API: POST /v1/chat/completions (streaming SSE or not),
POST /v1/completions, GET /v1/models, GET /health, and a chat page at / for the browser.

Up to --parallel requests are decoded together (continuous batching: one pass through the weights gives every
running request its next token; a request joins between steps and a long prompt is evaluated in chunks, so the
others' streams keep flowing; with temperature 0 a reply is the one it gets alone). A request whose prompt
starts like an earlier one (a shared system prompt, the previous chat turn) reuses its cached tokens
(usage.prompt_tokens_details.cached_tokens). Other requests wait in a bounded first-come-first-served
queue (--max-queue), and get HTTP 429 when it is full. A client that disconnects stops its generation.
Binds to 127.0.0.1 by default; use --host 0.0.0.0 to listen on the network, preferably with --api-key
(or the ONDEVICE_API_KEY environment variable).

Browsers: no CORS headers are sent, so pages of other origins cannot read replies; on a loopback bind a request
whose Host header is not localhost/127.0.0.1/[::1] (a DNS-rebinding page) gets 403 unless --allow-host NAME.
The Bearer scheme is matched case-insensitively (RFC 7235); the key itself in constant time.

In-browser mode: --onnx DIR (a folder from `ondevice convert MODEL --to onnx`) serves that folder under /model/
and a page, /inbrowser.html, that runs it inside the browser tab with onnxruntime-web (WebAssembly) and
tokenizers.js, both shipped with ondevice: the page fetches nothing from the internet, and once loaded it keeps
chatting if the server goes away. With --onnx and no MODEL, no model is loaded server-side (/ is that page and
the /v1 routes answer 404); with both, / is the server-backed page and links to the in-browser one.

examples:
  ondevice serve smollm2-135m-instruct --port 8080
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'
  ondevice convert smollm2-135m-instruct --to onnx --quant int4 -o smol-onnx
  ondevice serve --onnx smol-onnx          # open http://127.0.0.1:8080/: the model runs in the browser
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ondevice.cli.run import add_kv_cache_arg

    p = sub.add_parser("serve", help="OpenAI-compatible local server + browser chat page", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="GGUF file or alias (default: smollm2-135m-instruct; none with --onnx alone)")
    p.add_argument("--onnx", metavar="DIR", help="also serve this ONNX folder (`ondevice convert --to onnx`) to the "
                   "in-browser chat page, which runs it with onnxruntime-web")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("ONDEVICE_API_KEY"),
                   help="require Authorization: Bearer KEY on /v1 routes (default: $ONDEVICE_API_KEY)")
    p.add_argument("--model-id", help="model name reported by /v1/models (default: the file name)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--ctx", type=int, default=2048, help="context window in tokens (default 2048)")
    add_kv_cache_arg(p)
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="requests decoded together (default: from cores and RAM, printed at start; 1 = one at a "
                        "time, the only mode that uses speculation, and the default with --speculate or --draft)")
    p.add_argument("--context-shift", action="store_true",
                   help="a conversation that outgrows --ctx drops its oldest turns (after the system prompt) instead "
                        "of failing (with --parallel 1 the dropped part is re-rotated in the cache rather than "
                        "evaluated again on the next turn)")
    p.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait (default 16; then 429)")
    p.add_argument("--max-connections", type=int, default=64, help="open connections (default 64; then 503)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens accepted (default 1024)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--queue-timeout", type=float, default=300.0,
                   help="seconds a request may wait for its turn before a 503 (default 300)")
    p.add_argument("--web-dir", help="folder served at / (default: the chat pages shipped with ondevice, apps/web)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="on a loopback bind, also answer requests whose Host header is NAME (repeatable; by "
                        "default only localhost/127.0.0.1/[::1] are answered, which stops DNS-rebinding pages)")
    p.add_argument("--draft", metavar="MODEL", help="a model with the same vocabulary that drafts for speculate draft")
    p.add_argument("--speculate", choices=("off", "grammar", "lookup", "draft"), default=None,
                   help="default for requests that name none (a request's \"speculate\" field wins): grammar = draft "
                        "what a schema or tool grammar forces, lookup = also tokens copied from the prompt; the same "
                        "output either way. Default grammar")
    p.add_argument("--verbose", action="store_true", help="log every request (and client disconnects) to stderr")
    p.set_defaults(handler=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auto_parallel(model: object) -> int:
    """--parallel's default: batching needs ondevice's own runtime; other backends serve one at a time."""
    from ondevice.bench.fingerprint import total_ram_bytes
    from ondevice.server.engine import auto_parallel

    per_position = getattr(model, "kv_bytes_per_position", None)
    if per_position is None or not hasattr(getattr(model, "transformer", None), "forward_segments"):
        return 1
    return auto_parallel(per_position * model.n_ctx, os.cpu_count() or 1, total_ram_bytes())


def run(args: argparse.Namespace) -> int:
    import ondevice
    from ondevice.errors import OndeviceError
    from ondevice.runtime.sampling import DEFAULTS
    from ondevice.server import Limits, create_server
    from ondevice.server.app import DEFAULT_WEB_DIR

    for name in ("max_queue", "max_connections", "max_tokens_limit", "max_body", "parallel"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise OndeviceError(f"--{name.replace('_', '-')} must be >= 1")
    onnx_dir = None
    if args.onnx:
        onnx_dir = Path(args.onnx)
        if not (onnx_dir / "genai_config.json").is_file() or not (onnx_dir / "tokenizer.json").is_file():
            raise OndeviceError(f"--onnx {onnx_dir}: not an ONNX folder from `ondevice convert --to onnx` "
                                "(genai_config.json and tokenizer.json are needed)")
    # --onnx alone: nothing runs server-side, the page runs the ONNX folder in the browser.
    model = None
    if args.model or not onnx_dir:
        model = ondevice.load(args.model, threads=args.threads, n_ctx=args.ctx, kv_cache=args.kv_cache,
                              draft=args.draft)
    parallel = args.parallel
    if model is not None and parallel is None:
        # speculation runs in the one-at-a-time mode only: asking for it picks that mode unless --parallel says
        parallel = 1 if args.speculate or args.draft else _auto_parallel(model)
    limits = Limits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body,
                    default_max_tokens=min(DEFAULTS.max_tokens, args.max_tokens_limit),
                    default_speculate=args.speculate, context_shift=args.context_shift)
    try:
        server = create_server(model, args.host, args.port, model_id=args.model_id, api_key=args.api_key,
                               limits=limits, max_queue=args.max_queue, max_connections=args.max_connections,
                               queue_timeout_s=args.queue_timeout, web_dir=args.web_dir or DEFAULT_WEB_DIR,
                               onnx_dir=onnx_dir, verbose=args.verbose, allow_hosts=tuple(args.allow_host),
                               parallel=parallel or 1)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OndeviceError(f"port {args.port} is in use; pick another with --port") from None
        raise OndeviceError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
                            "pick another --port or --host") from None
    if not _is_loopback(args.host) and not args.api_key:
        print(f"ondevice: warning: listening on {args.host} without an API key: anyone on the network can use "
              "this model (pass --api-key)", file=sys.stderr)
    if model is None:
        print(f"serving {onnx_dir} to the in-browser chat page at {server.url}/ (the model runs in the browser; "
              "no server-side model); Ctrl-C stops", file=sys.stderr, flush=True)
    else:
        extra = f", in-browser page at {server.url}/inbrowser.html" if onnx_dir else ""
        how = ("--parallel" if args.parallel else "one at a time for --speculate/--draft"
               if parallel == 1 and (args.speculate or args.draft)
               else "default from cores and RAM; --parallel N to change")
        print(f"serving {server.model_id} on {server.url} (OpenAI API at {server.url}/v1, chat page at "
              f"{server.url}/{extra}); {parallel} request(s) at a time ({how}); Ctrl-C stops",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server.engine is not None:
            server.engine.stop()
        server.server_close()
    return 0
