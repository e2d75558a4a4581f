"""What `ondevice sweep --ray local` costs or gains over the serial run, on one machine.

1. Overhead: the same convert -> bench sweep (2 schemes x 2 backends) serially and with `--ray local`. Bench jobs
   hold the `device:local` resource, so they run one at a time either way; the difference is Ray's start-up and
   scheduling (plus whatever the two conversions gain by running side by side).
2. Speed-up: a 4-job CPU-bound sweep (4 conversions, each followed by its 1-thread eval) serially and on 2 local
   workers.

Every run uses a fresh artifact folder and database, so nothing is skipped or taken from a cache.

    PYTHONPATH=. python benchmarks/sweep_overhead.py [--model smollm2-135m-instruct] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each job of the CPU-bound case on one core in both runs (numpy's BLAS would otherwise use both cores serially).
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def timed_sweep(args: list[str], work: Path, tag: str, env: dict[str, str]) -> float:
    out, db = work / f"{tag}-art", work / f"{tag}.sqlite"
    command = [sys.executable, "-m", "ondevice", "sweep", *args, "-o", str(out), "--db", str(db), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each pair this many times (best kept)")
    opts = parser.parse_args()
    bench = [opts.model, "--to", "gguf", "--quant", "q8_0,q4_0", "--backend", "ondevice,llama.cpp", "--bench",
             "--prompt", "64", "--gen", "32", "--repeat", "3", "--threads", "2"]
    cpu = [opts.model, "--to", "gguf", "--quant", "q8_0,q4_0,q4_1,q5_0", "--backend", "ondevice", "--eval",
           "--ctx", "256", "--max-tokens", "768", "--threads", "1"]
    cases = [("overhead: 2x2 bench sweep", bench, ["--ray", "local"], {}),
             ("4-job CPU-bound sweep (convert + 1-thread eval), 2 workers", cpu, ["--ray", "local", "--num-cpus", "2"],
              ONE_THREAD)]
    print("| sweep | serial (s) | --ray local (s) | ratio |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        work = Path(tmp)
        for index, (name, args, ray_args, env) in enumerate(cases):
            serial = min(timed_sweep(args, work, f"s{index}-{r}", env) for r in range(opts.rounds))
            on_ray = min(timed_sweep(args + ray_args, work, f"r{index}-{r}", env) for r in range(opts.rounds))
            print(f"| {name} | {serial:.1f} | {on_ray:.1f} | {on_ray / serial:.2f} |", flush=True)


if __name__ == "__main__":
    main()
