"""`ondevice fit MODEL --device NAME`: estimated RAM need and decode speed on a device profile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = """\
Estimate, before you ship, whether MODEL fits on a device and how fast it will decode there. An estimate from a
roofline model (decoding streams the weights and the KV cache from memory once per token), calibrated by the
efficiency measured on this machine by `ondevice bench` (run it first for calibrated numbers). Device profiles
(phones, Apple Silicon Macs, Raspberry Pi 5, ...) are JSON files with their public sources; add your own with
--profile FILE or in the user config dir's ondevice/devices/ folder (see --list for the bundled ones).

examples:
  ondevice fit smollm2-135m-instruct --device iphone-15-pro
  ondevice fit ./SmolLM2-135M-Instruct --to gguf --quant 4bit --device raspberry-pi-5 --ctx 4096
  ondevice fit --list
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="estimate RAM and decode speed of a model on a device profile",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="artifact or alias (or a source with --to/--quant)")
    p.add_argument("--device", help="device profile name (see --list)")
    p.add_argument("--profile", type=Path, action="append", default=[], help="extra device profile JSON file")
    p.add_argument("--list", action="store_true", help="list the device profiles")
    p.add_argument("--to", help="convert MODEL to this target first (e.g. gguf)")
    p.add_argument("--quant", help="scheme for --to")
    p.add_argument("--ctx", type=int, default=2048, help="context length the KV cache is sized for (default 2048)")
    p.add_argument("--slots", type=int, default=1, help="sequences served at once (`serve --parallel N`): the KV "
                   "cache is held once per slot and the speed is each stream's (default 1)")
    p.add_argument("--kv-cache", metavar="TYPE", help="KV cache type the backends are sized for: f16 (default), "
                   "q8_0 or f32 (for those that take one; the others keep their own)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length for the speed estimate (default 512)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens for the speed estimate (default 128)")
    p.add_argument("--backend", help="comma-separated backends to estimate for (default: those measured here)")
    p.add_argument("--db", type=Path, help="results database to calibrate from (default: the user data dir's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ondevice.bench.fit import calibrate, estimate, find_profile, load_profiles, render_text
    from ondevice.cli import print_json
    from ondevice.errors import OndeviceError
    from ondevice.runtime.kv import check_kv_cache

    profiles = load_profiles(args.profile)
    if args.list:
        if args.json:
            print_json([p.data | {"path": p.path} for p in profiles.values()])
        else:
            for p in profiles.values():
                print(f"{p.name:<22} {p.title}: {p.ram_gb:g} GB RAM, {p.memory_bandwidth_gbs:g} GB/s")
        return 0
    if not args.model or not args.device:
        raise OndeviceError("give MODEL and --device NAME (or --list to see the device profiles)")
    if min(args.ctx, args.prompt, args.gen, args.slots) < 1:
        raise OndeviceError("--ctx, --prompt, --gen and --slots must be positive")
    profile = find_profile(profiles, args.device)

    from ondevice.bench.artifacts import resolve_artifacts
    from ondevice.bench.backends import parse_backends
    from ondevice.bench.fingerprint import fingerprint
    from ondevice.bench.store import Store, default_db_path

    quants = [args.quant] if args.quant else None
    artifact = resolve_artifacts([args.model], to=args.to, quants=quants, progress=not args.json)[0]
    db = args.db or default_db_path()
    calibrations = {}
    if db.exists():  # never create a database just to read nothing from it
        with Store(db) as store:
            rows = store.measurements(kind="speed", status="ok")
        calibrations = calibrate(rows, fingerprint(measure_bandwidth=False)["device_id"])
    backends = parse_backends(args.backend) if args.backend else None
    result = estimate(artifact, profile, calibrations, ctx=args.ctx, prompt_tokens=args.prompt,
                      gen_tokens=args.gen, backends=backends, slots=args.slots,
                      kv_cache=check_kv_cache(args.kv_cache) if args.kv_cache else None)
    if args.json:
        print_json(result.to_json())
    else:
        print(render_text(result))
        if not calibrations:
            print(f"note: no benchmark of this machine in {db}; speeds use an assumed efficiency",
                  file=sys.stderr)
    return 0
