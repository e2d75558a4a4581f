"""`ondevice sweep MODELS... --to ... --quant ...`: the whole matrix (convert -> eval -> bench per device), here in
order or on a Ray cluster, into one results store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = """\
Run a matrix of models x targets x schemes x backends x devices: each cell converted once, evaluated (--eval)
and benchmarked (--bench, the default) on each device, every result written to the results store on this
machine (`ondevice bench report` shows them). Without --ray the jobs run here in order; with --ray they are Ray
tasks: `--ray local` uses this machine's cores, `--ray ADDRESS` a cluster. A job already in the store (same
source content, target, scheme, backend, settings, device) is skipped, so an interrupted sweep resumes.

Device nodes join the cluster with a custom resource naming the device; bench jobs for D run only there:
  ray start --head --port 6379                                           (the driver's machine)
  ray start --address HEAD:6379 --resources '{"device:pixel-8": 1}'      (a machine wired to a Pixel 8)
  ondevice sweep --devices --ray HEAD:6379                               (lists the devices the cluster offers)

Without --ray (or with --ray local) this machine stands for every device named in --devices (default: one
device called "local").

Artifacts are not copied between nodes: a node that lacks one converts it into ARTIFACT_DIR (named by the
source's content hash, target and scheme), so each node needs the MODEL sources (shared folder or alias).

examples:
  ondevice sweep smollm2-135m-instruct --to gguf --quant q4_0,q8_0 --backend ondevice,llama.cpp -o sweep-out
  ondevice sweep ./Qwen3-0.6B ./SmolLM2-360M --to gguf,executorch --quant 4bit --eval --bench \\
                 --devices pixel-8,rpi5 --ray HEAD:6379 -o /shared/sweep
  ondevice sweep smollm2-135m-instruct --to gguf --quant 4bit,8bit --ray local -o sweep-out --json
"""


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    from ondevice.cli.bench import _positive

    p = sub.add_parser("sweep", help="a models x targets x schemes x devices matrix, locally or on Ray",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="sources: Hugging Face folder, .gguf or alias")
    p.add_argument("--to", help="targets, comma-separated (e.g. gguf,mlx,onnx,executorch)")
    p.add_argument("--quant", help="schemes, comma-separated (e.g. q4_0,q8_0 or 4bit,8bit)")
    p.add_argument("--backend", help="backends, comma-separated (default: every one that runs the artifact)")
    p.add_argument("--eval", action="store_true", help="evaluate each artifact against its source (PPL, KL, top-1)")
    p.add_argument("--bench", action="store_true", help="benchmark each artifact (the default without --eval)")
    p.add_argument("--devices", nargs="?", const="", metavar="NAME,...",
                   help="devices to bench on (nodes started with --resources '{\"device:NAME\": 1}'); alone: list "
                        "the devices the cluster offers")
    p.add_argument("--ray", metavar="local|ADDRESS", help="run as Ray tasks: on this machine or the cluster at "
                                                          "ADDRESS (needs `pip install 'ondevice[ray]'`)")
    p.add_argument("--num-cpus", type=_positive, help="with --ray local: worker slots (default: all cores)")
    p.add_argument("-o", "--output", type=Path, metavar="ARTIFACT_DIR", help="where the artifacts go")
    p.add_argument("--label", help="model name to record (one MODEL only)")
    p.add_argument("--prompt", type=_positive, default=128, help="bench prompt length in tokens (default 128)")
    p.add_argument("--gen", type=_positive, default=128, help="tokens to generate (default 128)")
    p.add_argument("--threads", type=_positive, help="threads of each bench and eval job (default: this machine's physical cores)")
    p.add_argument("--repeat", type=_positive, default=5, help="measured repeats per bench (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    p.add_argument("--ctx", type=_positive, default=256, help="eval window in tokens (default 256)")
    p.add_argument("--max-tokens", type=_positive, default=1024, help="eval text tokens at most (default 1024)")
    p.add_argument("--db", type=Path, help="results database (default: the user data dir's ondevice/bench.sqlite)")
    p.add_argument("--json", action="store_true", help="print the finished jobs' rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ondevice.bench import sweep
    from ondevice.bench.fingerprint import fingerprint
    from ondevice.bench.runner import Settings
    from ondevice.bench.store import Store
    from ondevice.cli import print_json
    from ondevice.errors import OndeviceError

    if not args.models:
        if args.devices != "" or not args.ray:
            raise OndeviceError("give MODEL(s) to sweep, or `--devices --ray ADDRESS` to list the cluster's devices")
        return _list_devices(args)
    if not args.to or not args.output:
        raise OndeviceError("a sweep needs --to TARGETS and -o ARTIFACT_DIR")
    if args.label and len(args.models) > 1:
        raise OndeviceError("--label names one model; give one MODEL with it")
    if args.warmup < 0:
        raise OndeviceError(f"--warmup must be >= 0, got {args.warmup}")
    devices = _names(args.devices or "")
    if args.ray and args.ray != "local":
        sweep.connect(args.ray, devices)
        offered = sweep.cluster_devices()
        devices = devices or sorted(offered)
        if not devices and (args.bench or not args.eval):
            raise OndeviceError("the cluster offers no devices to bench on: start a node with ray start --address "
                                "... --resources '{\"device:NAME\": 1}', or sweep with --eval only")
        missing = [d for d in devices if d not in offered]
        if missing:
            raise OndeviceError(f"no node offers device(s) {', '.join(missing)} (the cluster has: "
                                f"{', '.join(sorted(offered)) or 'none'}); start one with ray start --address ... "
                                f"--resources '{{\"device:{missing[0]}\": 1}}'")
    devices = devices or [sweep.LOCAL_DEVICE]
    fp = fingerprint(measure_bandwidth=False)
    want_bench = args.bench or not args.eval
    threads = args.threads or fp["hardware"]["cores_physical"]
    settings = Settings(threads, args.prompt, args.gen, args.repeat, args.warmup) if want_bench else None
    eval_setup = {"ctx": args.ctx, "max_tokens": args.max_tokens, "threads": threads} if args.eval else None
    progress = not (args.no_progress or args.json)
    with Store(args.db) as store:  # opened first: a bad --db fails before any work
        plan = sweep.plan_sweep(args.models, targets=_names(args.to), quants=_names(args.quant or ""),
                                backends=_names(args.backend) if args.backend else None, devices=devices,
                                artifact_dir=args.output.resolve(), settings=settings, eval_setup=eval_setup,
                                done_keys=sweep.done_keys(store.measurements(status="ok")), label=args.label)
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
        if plan.skipped and not args.json:
            print(f"{len(plan.skipped)} job(s) already in {store.path}: skipped", file=sys.stderr)
        device_id = store.ensure_device(fp)
        run_id = store.start_run(device_id, json.dumps({k: v for k, v in vars(args).items() if k != "handler"},
                                                       default=str))
        bar = sweep.progress_bar(len(plan.jobs), progress)

        def record(done: sweep.Finished) -> None:
            if done.row is not None:
                node = store.ensure_device(done.fingerprint) if done.fingerprint else device_id
                store.add_measurement({**done.row, "run_id": run_id, "device_id": node})
            bar.update(1)
            if not args.json:
                bar.clear()
                print(sweep.format_finished(done), file=sys.stderr)

        # Ray starts in the background while this process converts (see sweep.run_ray).
        local = None
        if args.ray == "local" and plan.jobs:
            local = sweep.LocalRay(devices, args.num_cpus, targets=tuple(_names(args.to)))
        try:
            if not plan.jobs:  # everything already in the store: no Ray to start
                outcome = sweep.SweepOutcome([], False)
            elif args.ray:
                outcome = sweep.run_ray(plan.jobs, record, local=local)
            else:
                outcome = sweep.run_serial(plan.jobs, record)
        finally:
            bar.close()
            if local is not None:
                local.stop()
            elif args.ray:
                sweep.import_ray().shutdown()
        store.finish_run(run_id, "interrupted" if outcome.interrupted else "complete")
        db_path = store.path
    rows = [done.row for done in outcome.finished if done.row is not None]
    convert_errors = [{"job": done.job.describe(), "error": done.error} for done in outcome.finished if done.error]
    if args.json:
        print_json({"run_id": run_id, "db": str(db_path), "interrupted": outcome.interrupted,
                    "skipped": len(plan.skipped), "results": rows,
                    "convert_errors": convert_errors})
    else:
        sys.stdout.write(sweep.summary_table(outcome.finished))
        ok = sum(r["status"] == "ok" for r in rows)
        print(f"recorded {len(rows)} result(s) ({ok} ok, {len(plan.skipped)} skipped as already done) in "
              f"{db_path}; `ondevice bench report` shows them", file=sys.stderr)
    if outcome.interrupted:
        print("ondevice: interrupted; the results above were kept", file=sys.stderr)
        return 130
    return 0 if all(r["status"] == "ok" for r in rows) and not convert_errors else 1


def _list_devices(args: argparse.Namespace) -> int:
    from ondevice.bench import sweep
    from ondevice.cli import print_json

    sweep.connect(args.ray, [])
    try:
        offered: dict[str, Any] = sweep.cluster_devices()
    finally:
        sweep.import_ray().shutdown()
    if args.json:
        print_json({"devices": offered})
    elif offered:
        for name, nodes in sorted(offered.items()):
            print(f"{name}\t{nodes} node(s)")
    else:
        print("the cluster offers no devices (start a node with --resources '{\"device:NAME\": 1}')",
              file=sys.stderr)
    return 0
