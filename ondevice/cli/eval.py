"""`ondevice eval ARTIFACT --ref SOURCE`: perplexity, KL divergence and top-1 agreement against a reference."""

from __future__ import annotations

import argparse
import sys

HELP = """\
Measure what quantization cost: perplexity of ARTIFACT on a bundled public-domain text, and the KL divergence
of its next-token distributions from the reference's (KL(reference || artifact), nats per token) with the
top-1 agreement. SOURCE is a Hugging Face folder (run with transformers, float32) or another artifact (e.g. an
f32 GGUF). Both see the very same token ids. Needs a backend that returns logits: ondevice's runtime or
llama.cpp for GGUF, mlx for MLX folders, onnxruntime for ONNX folders, executorch for .pte, and for .mlpackage
Core ML on macOS or else ondevice's numpy interpreter of the package (coreml-interpreter: quality, not speed,
in float32; coreml-fp16 as a phone's GPU or Neural Engine computes, every op rounded to fp16; coreml-fp16-accumulate
with fp16 sums inside matmuls too).
Results go to the benchmark store, next to the speed figures (`ondevice bench report`).

--text FILE measures on your own text instead (UTF-8; `--text -` reads standard input): your domain, your
language. It needs at least one window of tokens (--ctx); the first --max-tokens tokens are used, and the
results record which text (its path and SHA-256), so they are not mistaken for the bundled text's.

examples:
  ondevice eval smol-q4_0.gguf --ref ./SmolLM2-135M-Instruct
  ondevice eval ./SmolLM2-135M-Instruct --to gguf --quant q4_0,q8_0 --ref ./SmolLM2-135M-Instruct
  ondevice eval ./SmolLM2-135M-Instruct --to mlx,onnx,coreml --quant 4bit --ref ./SmolLM2-135M-Instruct
  ondevice eval smol-q4_0.gguf --ref ./SmolLM2-135M-Instruct --text my-notes.txt
  cat *.md | ondevice eval smol-q4_0.gguf --ref smol-f16.gguf --text -
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="quality of a quantized model against its reference (PPL, KL, top-1)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="artifact or alias (or a source with --to)")
    p.add_argument("--ref", required=True, metavar="SOURCE", help="reference: Hugging Face folder or artifact")
    p.add_argument("--to", help="convert ARTIFACT(s) to these targets first, comma-separated (e.g. gguf,mlx)")
    p.add_argument("--quant", help="comma-separated schemes for --to")
    p.add_argument("--label", help="model name to record")
    p.add_argument("--backend", help="backend for the artifact (default: the first available that returns logits)")
    p.add_argument("--ref-backend", help="backend for the reference (default: transformers for a Hugging Face "
                                         "folder, else the artifact's backend)")
    p.add_argument("--kv-cache", metavar="TYPE", help="KV cache type of the artifact's backend (f16, q8_0, f32; "
                   "ondevice and llama.cpp): `eval X --ref X --kv-cache q8_0` measures what a q8_0 cache costs")
    p.add_argument("--ref-kv-cache", metavar="TYPE", help="KV cache type of the reference's backend (default: its own)")
    p.add_argument("--text", metavar="FILE", help="evaluate on this UTF-8 text file, or - for standard input "
                                                   "(default: the bundled public-domain text)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per evaluation window (default 256)")
    p.add_argument("--max-tokens", type=int, default=1024, help="text tokens evaluated at most (default 1024)")
    p.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    p.add_argument("--db", help="results database (default: the user data dir's ondevice/bench.sqlite)")
    p.add_argument("--no-store", action="store_true", help="do not record the results")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ondevice.bench.artifacts import describe_artifact, resolve_artifacts
    from ondevice.bench.evaluate import EvalText, EvalWindowing, evaluate, quality_row
    from ondevice.bench.fingerprint import fingerprint
    from ondevice.bench.store import Store
    from ondevice.cli import print_json
    from ondevice.errors import OndeviceError
    from ondevice.hub import resolve_model
    from ondevice.runtime.kv import check_kv_cache, kv_quant_label

    if args.ctx < 8 or args.max_tokens < 8:
        raise OndeviceError("--ctx and --max-tokens must be at least 8")
    kv_cache = check_kv_cache(args.kv_cache) if args.kv_cache else None
    ref_kv_cache = check_kv_cache(args.ref_kv_cache) if args.ref_kv_cache else None
    # The text is read first: a wrong --text fails before anything is converted or loaded.
    text = EvalText.read(args.text) if args.text else EvalText.bundled()
    progress = not (args.no_progress or args.json)
    quants = [q.strip() for q in args.quant.split(",") if q.strip()] if args.quant else None
    artifacts = resolve_artifacts(args.artifacts, to=args.to, quants=quants, progress=progress, label=args.label)
    reference = describe_artifact(resolve_model(args.ref))
    fp = fingerprint(measure_bandwidth=False)
    threads = args.threads or fp["hardware"]["cores_physical"]
    setup = EvalWindowing(ctx=args.ctx, max_tokens=args.max_tokens)
    results = []
    store = None if args.no_store else Store(args.db)
    try:
        device_id = store.ensure_device(fp) if store else None
        for artifact in artifacts:
            result = evaluate(artifact, reference, backend=args.backend, ref_backend=args.ref_backend,
                              threads=threads, setup=setup, progress=progress, text=text, kv_cache=kv_cache,
                              ref_kv_cache=ref_kv_cache)
            result.update(model=artifact.model, quant=artifact.quant, artifact=str(artifact.path),
                          reference=str(reference.path), threads=threads)
            results.append(result)
            if store:
                environment = {"os": fp["software"]["os"], "python": fp["software"]["python"],
                               "ondevice": fp["software"]["ondevice"]}
                row = quality_row(artifact, reference, result, environment)
                store.add_measurement({**row, "device_id": device_id, "threads": threads})
            if not args.json:
                print(f"{artifact.model} {kv_quant_label(artifact.quant, kv_cache)} ({result['backend']}) vs "
                      f"{reference.path.name} ({result['ref_backend']}"
                      f"{', kv-' + ref_kv_cache if ref_kv_cache else ''}): PPL {result['perplexity']:.3f} (reference "
                      f"{result['ref_perplexity']:.3f}), KL {result['kl_mean']:.5f} nats/token "
                      f"(p99 {result['kl_p99']:.4f}, max {result['kl_max']:.4f}), top-1 agreement "
                      f"{result['top1_agreement']:.1%} over {result['tokens']} tokens of {text.label}")
                if not result["tokenizers_agree"]:
                    print("note: the two tokenizers split the text differently; both were fed the artifact's "
                          "token ids", file=sys.stderr)
    finally:
        if store:
            store.close()
    if args.json:
        print_json(results)
    return 0
