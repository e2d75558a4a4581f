"""`ondevice bench MODEL...` (speed and memory per backend), `bench report`, `bench import`, `bench export`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = """\
Benchmark models on every runtime that can run them, on this device, and keep the results.

  ondevice bench MODEL [MODEL...] [--backend ondevice,llama.cpp] [--prompt 128,512] [--gen 128]
                 [--threads 1,2] [--repeat 5] [--warmup 1] [--to gguf --quant 4bit,8bit] [--json] [--db PATH]
  ondevice bench report [--device D] [--model M] [--format md|html|csv|json] [-o DIR]
  ondevice bench import FILE.json
  ondevice bench export [-o FILE.json]

MODEL is an artifact (.gguf file, MLX folder, .pte, .onnx, Hugging Face folder) or an alias; with --to/--quant
it is a source converted on the fly (cached under the user cache dir). Every (backend, artifact, setting) runs
in a fresh process so memory figures are honest: load time, time to first token, prefill and decode tok/s
(median and min-max over the repeats), peak RSS and its growth over the idle process. A backend that is not
installed or fails is recorded with its error; Ctrl-C keeps what was measured. Options go after MODEL.

examples:
  ondevice bench smollm2-135m-instruct --to gguf --quant 4bit,8bit --backend ondevice,llama.cpp
  ondevice bench smollm2-135m-instruct --to gguf,mlx,onnx,executorch --quant 4bit,8bit
  ondevice bench smol-q8_0.gguf --prompt 256 --gen 64 --threads 1,2 --repeat 3
  ondevice bench report -o bench-report
"""

SUBCOMMANDS = ("run", "report", "import", "export")


class _AnyWord:
    """argparse checks a subcommand against `choices`; this one lets any first word through (it may be a MODEL)."""

    def __init__(self, names: dict) -> None:
        self.names = names

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.names)


class _DefaultToRun(argparse._SubParsersAction):
    """`ondevice bench MODEL...` means `ondevice bench run MODEL...`: a first word that is not a subcommand is
    a model."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.choices = _AnyWord(self._name_parser_map)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if values and values[0] not in self._name_parser_map:
            values = ["run", *values]
        super().__call__(parser, namespace, values, option_string)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    return _int_list(text)[0]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark speed and memory across runtimes; report, import, export",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=run, bench_command=None)
    actions = p.add_subparsers(dest="bench_command", metavar="[run] MODEL... | report | import | export",
                               action=_DefaultToRun)

    r = actions.add_parser("run", help="benchmark MODEL(s) (the default: `ondevice bench MODEL`)",
                           description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("models", nargs="+", metavar="MODEL", help="artifact, alias, or source (with --to/--quant)")
    r.add_argument("--backend", help="comma-separated backends (default: every installed one that runs the artifact; "
                                     "`null` measures the harness itself)")
    r.add_argument("--to", help="convert MODEL(s) to these targets first, comma-separated (e.g. gguf or "
                                "gguf,mlx,onnx,executorch); each artifact goes to the backends that run its kind")
    r.add_argument("--quant", help="comma-separated schemes for --to (e.g. q4_0,q8_0 or 4bit,8bit)")
    r.add_argument("--label", help="model name to record (default: the alias or the file's own name)")
    r.add_argument("--prompt", type=_int_list, default=[128], help="prompt length(s) in tokens (default 128)")
    r.add_argument("--gen", type=_positive, default=128, help="tokens to generate (default 128)")
    r.add_argument("--threads", type=_int_list, help="thread count(s) (default: physical cores)")
    r.add_argument("--kv-cache", metavar="TYPES", help="KV cache type(s), comma-separated (f16, q8_0, f32), for the "
                   "backends that take one (ondevice, llama.cpp); default: each backend's own (f16)")
    r.add_argument("--repeat", type=_positive, default=5, help="measured repeats per setting (default 5)")
    r.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    r.add_argument("--timeout", type=float, default=1800, help="seconds allowed per job (default 1800)")
    _common(r)
    r.add_argument("--json", action="store_true", help="print the recorded measurements as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    rep = actions.add_parser("report", help="tables and charts from the stored results")
    rep.add_argument("--device", help="device id prefix or label substring")
    rep.add_argument("--model", help="model name substring")
    rep.add_argument("--format", choices=("md", "html", "csv", "json"), default="md", help="default md")
    rep.add_argument("-o", "--output", type=Path, help="write report.<format> and PNG charts into this folder")
    rep.add_argument("--no-charts", action="store_true", help="tables only")
    _common(rep)

    imp = actions.add_parser("import", help="merge results exported elsewhere (e.g. by an app on a phone)")
    imp.add_argument("file", type=Path, metavar="FILE.json")
    imp.add_argument("--json", action="store_true", help="print the counts as JSON")
    _common(imp)

    exp = actions.add_parser("export", help="every stored result as one JSON document")
    exp.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    _common(exp)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", type=Path, help="results database (default: the user data dir's ondevice/bench.sqlite)")


def run(args: argparse.Namespace) -> int:
    command = args.bench_command
    if command is None:
        print(HELP, file=sys.stderr)
        return 2
    return {"run": run_bench, "report": run_report, "import": run_import, "export": run_export}[command](args)


def _environment(fp: dict[str, Any]) -> dict[str, Any]:
    software = fp["software"]
    return {"os": software["os"], "python": software["python"], "ondevice": software["ondevice"],
            "mem_read_gbs": fp.get("mem_read_gbs")}


def run_bench(args: argparse.Namespace) -> int:
    from ondevice.bench.artifacts import resolve_artifacts
    from ondevice.bench.backends import parse_backends
    from ondevice.bench.fingerprint import fingerprint
    from ondevice.bench.runner import plan_jobs, run_jobs
    from ondevice.bench.store import Store
    from ondevice.cli import print_json
    from ondevice.errors import OndeviceError
    from ondevice.runtime.kv import check_kv_cache

    if args.warmup < 0:
        raise OndeviceError(f"--warmup must be >= 0, got {args.warmup}")
    backends = parse_backends(args.backend)
    kv_caches = [check_kv_cache(kv.strip()) for kv in args.kv_cache.split(",") if kv.strip()] if args.kv_cache else None
    progress = not (args.no_progress or args.json)
    with Store(args.db) as store:  # opened first: a bad --db fails before any conversion
        quants = [q.strip() for q in args.quant.split(",") if q.strip()] if args.quant else None
        artifacts = resolve_artifacts(args.models, to=args.to, quants=quants, progress=progress, label=args.label)
        fp = fingerprint()
        threads = args.threads or [fp["hardware"]["cores_physical"]]
        jobs, notes = plan_jobs(artifacts, backends, threads=threads, prompts=args.prompt, gen_tokens=args.gen,
                                repeat=args.repeat, warmup=args.warmup, kv_caches=kv_caches)
        for note in notes if args.backend else []:  # default set: each artifact simply goes to the backends that run it
            print(f"note: {note}", file=sys.stderr)
        if not jobs:
            raise OndeviceError("nothing to run: no chosen backend runs these artifacts")
        device_id = store.ensure_device(fp)
        run_id = store.start_run(device_id, json.dumps({k: v for k, v in vars(args).items()
                                                        if k not in ("handler",)}, default=str))

        def record(row: dict[str, Any]) -> None:
            store.add_measurement({**row, "run_id": run_id, "device_id": device_id})

        def say(line: str) -> None:
            if not args.json:
                print(line, file=sys.stderr)

        outcome = run_jobs(jobs, record=record, environment=_environment(fp), progress=progress, report_line=say,
                           timeout_s=args.timeout or None)
        store.finish_run(run_id, "interrupted" if outcome.interrupted else "complete")
        db_path = store.path
    if args.json:
        print_json({"device": fp, "run_id": run_id, "db": str(db_path), "interrupted": outcome.interrupted,
                    "measurements": outcome.rows})
    else:
        done = sum(r["status"] == "ok" for r in outcome.rows)
        print(f"recorded {len(outcome.rows)} measurement(s) ({done} ok) in {db_path}; "
              f"`ondevice bench report` shows tables and charts", file=sys.stderr)
    if outcome.interrupted:
        print("ondevice: interrupted; the measurements above were kept", file=sys.stderr)
        return 130
    return 0 if any(r["status"] == "ok" for r in outcome.rows) else 1


def run_report(args: argparse.Namespace) -> int:
    from ondevice.bench.report import build_report, write_report
    from ondevice.bench.store import Store

    with Store(args.db) as store:
        report = build_report(store, device=args.device, model=args.model)
    text, written = write_report(report, args.format, args.output, charts=not args.no_charts)
    if args.output is None:
        sys.stdout.write(text)
    else:
        charts = len(written) - 1
        print(f"wrote {written[0]}" + (f" and {charts} chart(s)" if charts else ""), file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from ondevice.bench.store import Store
    from ondevice.cli import print_json
    from ondevice.errors import OndeviceError

    try:
        data = json.loads(args.file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OndeviceError(f"cannot read {args.file}: {exc.strerror}") from None
    except ValueError as exc:
        raise OndeviceError(f"{args.file} is not valid JSON: {exc}") from None
    with Store(args.db) as store:
        counts = store.import_json(data)
    if args.json:
        print_json(counts)
    else:
        print(f"imported {counts['measurements']} measurement(s), {counts['devices']} new device(s) and "
              f"{counts['runs']} run(s); {counts['skipped']} already present", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ondevice.bench.store import Store
    from ondevice.formats.atomic import atomic_output

    with Store(args.db) as store:
        text = json.dumps(store.export_json(), indent=2, default=str) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        with atomic_output(args.output, force=True) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
