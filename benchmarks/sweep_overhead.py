"""What `ondevice sweep --ray local` costs or gains over the serial run, on one machine.

1. Overhead: the same convert -> bench sweep (2 schemes x 2 backends) serially and with `--ray local`. Bench jobs
   hold the `device:local` resource, so they run one at a time either way; the difference is Ray's start-up and
   scheduling (plus whatever the two conversions gain by running side by side).
   `--case default` runs the same matrix at the bench's default settings (prompt 128, gen 128, 5 repeats, threads =
   physical cores): the sweep a user gets, against which Ray's fixed cost (start-up, shutdown) is weighed.
2. Speed-up: a 4-job CPU-bound sweep (4 conversions, each followed by its 1-thread eval) serially and on 2 local
   workers.

Every run uses a fresh artifact folder and database, so nothing is skipped or taken from a cache. The serial and
Ray runs of each case are interleaved (their order alternating from round to round), so load from other work on
the machine falls on both; each round's ratio is printed, then the medians.

    PYTHONPATH=. python benchmarks/sweep_overhead.py [--model smollm2-135m-instruct] [--rounds 3] [--case overhead|default|cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Each job of the CPU-bound case on one core in both runs (numpy's BLAS would otherwise use both cores serially).
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass
class Timing:
    total_s: float
    converts_done_s: float  # when the last conversion's line arrived
    last_result_s: float  # when the last job's line arrived; total - this = shutdown and exit

    def phases(self) -> str:
        return (f"converts done {self.converts_done_s:.1f}, jobs done {self.last_result_s:.1f}, "
                f"exit {self.total_s:.1f}")


def timed_sweep(args: list[str], work: Path, tag: str, env: dict[str, str]) -> Timing:
    out, db = work / f"{tag}-art", work / f"{tag}.sqlite"
    command = [sys.executable, "-m", "ondevice", "sweep", *args, "-o", str(out), "--db", str(db), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    assert proc.stderr is not None
    converts_done = last_result = 0.0
    lines = []
    for line in proc.stderr:  # a line per finished job, as it finishes
        lines.append(line)
        now = time.perf_counter() - start
        if line.startswith("convert "):
            converts_done = now
        if line.startswith(("convert ", "eval ", "bench ")):
            last_result = now
    proc.wait()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{''.join(lines)[-2000:]}")
    return Timing(elapsed, converts_done, last_result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3, help="serial/Ray pairs per case (medians reported)")
    parser.add_argument("--case", choices=("overhead", "default", "cpu", "both"), default="both",
                        help="both = overhead and cpu")
    opts = parser.parse_args()
    default = [opts.model, "--to", "gguf", "--quant", "q8_0,q4_0", "--backend", "ondevice,llama.cpp", "--bench"]
    bench = default + ["--prompt", "64", "--gen", "32", "--repeat", "3", "--threads", "2"]
    cpu = [opts.model, "--to", "gguf", "--quant", "q8_0,q4_0,q4_1,q5_0", "--backend", "ondevice", "--eval",
           "--ctx", "256", "--max-tokens", "768", "--threads", "1"]
    named = {"overhead": ("overhead: 2x2 bench sweep, shortened bench", bench, ["--ray", "local"], {}),
             "default": ("overhead: 2x2 bench sweep, default bench settings", default, ["--ray", "local"], {}),
             "cpu": ("4-job CPU-bound sweep (convert + 1-thread eval), 2 workers", cpu,
                     ["--ray", "local", "--num-cpus", "2"], ONE_THREAD)}
    cases = [named["overhead"], named["cpu"]] if opts.case == "both" else [named[opts.case]]
    summary = []
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        work = Path(tmp)
        for index, (name, args, ray_args, env) in enumerate(cases):
            serial, on_ray = [], []
            for r in range(opts.rounds):
                order = [("s", args), ("r", args + ray_args)]
                for tag, run_args in order if r % 2 == 0 else order[::-1]:
                    timing = timed_sweep(run_args, work, f"{tag}{index}-{r}", env)
                    (serial if tag == "s" else on_ray).append(timing.total_s)
                    print(f"  {'serial' if tag == 's' else '--ray local'}: {timing.phases()} s", flush=True)
                print(f"{name}, round {r + 1}: serial {serial[-1]:.1f} s, --ray local {on_ray[-1]:.1f} s, ratio "
                      f"{on_ray[-1] / serial[-1]:.2f} (load average {os.getloadavg()[0]:.1f})", flush=True)
            summary.append((name, statistics.median(serial), statistics.median(on_ray),
                            statistics.median(b / a for a, b in zip(serial, on_ray, strict=True))))
    print("\n| sweep | serial (s, median) | --ray local (s, median) | ratio of medians | median of round ratios |")
    print("|---|---:|---:|---:|---:|")
    for name, serial_s, ray_s, round_ratio in summary:
        print(f"| {name} | {serial_s:.1f} | {ray_s:.1f} | {ray_s / serial_s:.2f} | {round_ratio:.2f} |")


if __name__ == "__main__":
    main()
