"""Where `--ray local`'s fixed costs go, side by side: Ray's start-up as `ondevice sweep` did it before (a plain
`ray.init`, dashboard and driver logs off) and as it does it now (sweep.LocalRay: no autoscaler monitor, log monitor or dashboard API server), wall time and the CPU-seconds
of the processes Ray started (on a 2-core machine those compete with the driver's conversions), then the shutdown.
Each variant runs in a fresh process, alternating, ROUNDS times.

    PYTHONPATH=. python benchmarks/ray_local_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PROBE = r"""
import json, os, sys, time
from ondevice.bench import sweep

def tree_cpu_s(root):
    # user+system CPU-seconds of every live descendant of root (Ray's processes, before shutdown)
    stats = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    family, total, grew = {root}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, cpu) in stats.items():
            if ppid in family and pid not in family:
                family.add(pid); total += cpu; grew = True
    return total, len(family) - 1

lean = sys.argv[1] == "lean"
from ondevice.bench.fingerprint import fingerprint
fingerprint()  # LocalRay measures it first (cached per process): not part of Ray's start-up
start = time.perf_counter()
if lean:
    local = sweep.LocalRay([sweep.LOCAL_DEVICE], 2)
    local.wait()
else:
    sweep.connect("local", [sweep.LOCAL_DEVICE], num_cpus=2)
ray = sweep.import_ray()
up = time.perf_counter() - start
ray.get([ray.remote(lambda: 1).remote() for _ in range(2)])  # both workers have run a task
time.sleep(1)
cpu, processes = tree_cpu_s(os.getpid())
stop = time.perf_counter()
local.stop() if lean else ray.shutdown()
print(json.dumps({"up_s": up, "ray_cpu_s": cpu, "processes": processes, "shutdown_s": time.perf_counter() - stop}))
"""


def probe(variant: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", PROBE, variant], capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        sys.exit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"ray.init": [], "sweep.LocalRay": []}
    for r in range(opts.rounds):
        order = ["ray.init", "sweep.LocalRay"] if r % 2 == 0 else ["sweep.LocalRay", "ray.init"]
        for name in order:
            runs[name].append(probe("lean" if name == "sweep.LocalRay" else "plain"))
            print(f"round {r + 1} {name}: {runs[name][-1]} (load average {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| start-up | up (s) | CPU-s of Ray's processes | processes | shutdown (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        print(f"| {name} | {med['up_s']:.2f} | {med['ray_cpu_s']:.2f} | {med['processes']:.0f} | "
              f"{med['shutdown_s']:.2f} |")


if __name__ == "__main__":
    main()
