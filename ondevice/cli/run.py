"""`ondevice run [MODEL] -p PROMPT`: stream a reply, then a timing line on stderr."""

from __future__ import annotations

import argparse
import sys

HELP = """\
Generate a reply with ondevice's own runtime (C kernels). MODEL is a .gguf file or an alias; without it the
bundled default (SmolLM2-135M-Instruct) is used. The prompt is wrapped in the model's chat template unless
--raw is given. The reply streams to stdout; a timing line (time to first token, prefill and decode speed,
peak RSS) goes to stderr.

sampling defaults (one set, shared by `chat`, `serve`, its web pages and `export` bundles):
  {sampling}

example: ondevice run -p "Name three uses of a paperclip." -n 64 --temp 0
"""


def sampling_summary() -> str:
    from ondevice.runtime.sampling import DEFAULTS as D

    return (f"-n {D.max_tokens} --temp {D.temperature} --top-k {D.top_k} --top-p {D.top_p} --min-p {D.min_p} "
            f"--repeat-penalty {D.repeat_penalty}")


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    """--kv-cache, checked by load() (a bad value is a one-line error, as for every other input)."""
    p.add_argument("--kv-cache", metavar="TYPE",
                   help="KV cache type for GGUF models: f16 (default: half the memory of f32, llama.cpp's numerics), "
                        "q8_0 (Q8_0 blocks, 53%% of f16's memory, as llama.cpp's --cache-type-k/-v q8_0; needs a "
                        "head size that is a multiple of 32) or f32")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # The defaults are ondevice's one set (SamplingDefaults), the same the server, web pages and bundles use.
    from ondevice.runtime.sampling import DEFAULTS as D

    p.add_argument("-n", "--max-tokens", type=int, default=D.max_tokens,
                   help=f"tokens to generate at most (default {D.max_tokens})")
    p.add_argument("--temp", type=float, default=D.temperature,
                   help=f"temperature; 0 = greedy, still after the repeat penalty (default {D.temperature})")
    p.add_argument("--top-k", type=int, default=D.top_k, help=f"default {D.top_k} (0 = off)")
    p.add_argument("--top-p", type=float, default=D.top_p, help=f"default {D.top_p} (1 = off)")
    p.add_argument("--min-p", type=float, default=D.min_p, help=f"default {D.min_p} (0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=D.repeat_penalty, help=f"default {D.repeat_penalty} (1 = off)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--speculate", choices=("off", "grammar", "lookup", "draft"), default=None,
                   help="speculative decoding, the same output: grammar (default) = draft what a --json-schema forces, "
                        "lookup = also tokens copied from the prompt (faster when the reply repeats it), draft = "
                        "also the --draft model's tokens, off")
    p.add_argument("--draft", metavar="MODEL", help="a model with the same vocabulary that drafts for --speculate draft")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--ctx", type=int, default=2048, help="context window in tokens (default 2048)")
    add_kv_cache_arg(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--context-shift", action="store_true",
                   help="when the conversation outgrows --ctx, keep the system prompt and drop the oldest half of the "
                        "rest (the cached keys are re-rotated, not recomputed) instead of stopping; off by default")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate a reply with the built-in runtime", description=HELP.format(sampling=sampling_summary()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="GGUF file or alias (default: smollm2-135m-instruct)")
    p.add_argument("-p", "--prompt", help="the prompt (default: read standard input)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print the reply and the timings as one JSON object")
    p.add_argument("--json-schema", metavar="FILE",
                   help="constrain the reply to JSON valid against this JSON Schema file (structured output)")
    add_sampling_args(p)
    p.set_defaults(handler=run)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                speculate=getattr(args, "speculate", None), context_shift=getattr(args, "context_shift", False))


def timing_line(stats, rss_mib: float) -> str:
    return (f"ttft {stats.ttft_s * 1000:.0f} ms | prefill {stats.prefill_tok_s:.1f} tok/s "
            f"({stats.prompt_tokens - stats.cached_tokens} tokens) | decode {stats.decode_tok_s:.1f} tok/s "
            f"({stats.generated_tokens} tokens) | peak RSS {rss_mib:.0f} MiB")


def run(args: argparse.Namespace) -> int:
    import ondevice
    from ondevice.cli import print_json
    from ondevice.converters.base import peak_rss_mib
    from ondevice.errors import OndeviceError

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise OndeviceError("empty prompt: pass -p TEXT or pipe text on standard input")
    if args.json_schema:  # a bad schema fails before the model is loaded
        from ondevice.structured import compile_grammar

        compile_grammar(json_schema=args.json_schema)
    model = ondevice.load(args.model, threads=args.threads, n_ctx=args.ctx, kv_cache=args.kv_cache,
                          draft=args.draft)
    if args.raw:
        request: str | list[dict[str, str]] = prompt
    else:
        request = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        if not model.chat_template:
            request = prompt
    token_filter = None
    if args.json_schema:
        from ondevice.structured import TokenFilter

        token_filter = TokenFilter(model, json_schema=args.json_schema)
    pieces = []
    for piece in model.generate(request, stop=args.stop, token_filter=token_filter, **sampling_kwargs(args)):
        if args.json:
            pieces.append(piece)
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    stats = model.last_stats
    if token_filter is not None and not token_filter.is_accepting():
        from ondevice.structured import StructuredOutputError

        raise StructuredOutputError(f"the reply stopped before the JSON was complete ({stats.finish_reason}); "
                                    "raise -n/--max-tokens or bound the schema (maxLength, maxItems, enum)")
    if args.json:
        print_json({"text": "".join(pieces), "model": model.path, "threads": model.threads,
                    **stats.to_dict(), "peak_rss_mib": peak_rss_mib()})
    else:
        sys.stdout.write("\n")
        print(timing_line(stats, peak_rss_mib()), file=sys.stderr)
    return 0
