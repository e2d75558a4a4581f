"""One benchmark job in a fresh process: `python -m ondevice.bench.worker` reads a job (one JSON line) on stdin
and answers with JSON lines on stdout, one event per line:

    {"event": "started", "baseline_rss_mib": ..., "backend_version": ...}   runtime imported, nothing loaded
    {"event": "loaded", "load_s": ..., "rss_mib": ...}
    {"event": "prompt", "prompt_tokens": N}
    {"event": "repeat", "index": i, "warmup": bool, "ttft_s", "prefill_tok_s", "decode_s", "decode_tok_s", ...}
    {"event": "done", "peak_rss_mib": ..., "rss_mib": ...}
    {"event": "error", "status": "unavailable" | "error", "stage": ..., "error": "one line"}
    {"event": "interrupted", "peak_rss_mib": ...}                           Ctrl-C: what was measured is kept

A fresh process per job keeps the memory figures honest (nothing from an earlier model stays mapped). Whatever
a native library prints goes to stderr: the protocol has stdout to itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from time import perf_counter
from typing import Any, TextIO

from ondevice.bench.backends.base import TokenClock


def current_rss_mib() -> float:
    """Resident set size now (Linux: /proc/self/statm; elsewhere the peak so far, equal to it early on)."""
    try:
        with open("/proc/self/statm") as fh:
            resident_pages = int(fh.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process. Linux: VmHWM, which belongs to this program's own address space.
    (getrusage's ru_maxrss survives exec on Linux, so a worker would report its parent's peak when larger.)"""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    from ondevice.converters.base import peak_rss_mib as rusage_peak

    return rusage_peak()


def repeat_timing(clock: TokenClock, prompt_tokens: int, gen_tokens: int) -> dict[str, float | int]:
    """Timings of one generation from the harness clock. Prefill speed counts the prompt over the time to the
    first token; decode speed counts the tokens after the first over the time between the first and the last."""
    ticks = clock.ticks
    if len(ticks) != gen_tokens:
        raise RuntimeError(f"the backend produced {len(ticks)} tokens, {gen_tokens} were asked for")
    ttft = ticks[0] - clock.start_s
    decode_s = ticks[-1] - ticks[0]
    return {
        "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft if ttft > 0 else 0.0,
        "decode_s": decode_s,
        "decode_tok_s": (gen_tokens - 1) / decode_s if gen_tokens > 1 and decode_s > 0 else 0.0,
        "generated_tokens": len(ticks),
    }


def _one_line(exc: BaseException) -> str:
    from ondevice.errors import OndeviceError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, OndeviceError) else f"{type(exc).__name__}: {text}"


def run_job(job: dict[str, Any], out: TextIO) -> int:
    from ondevice.bench.backends import backend_class
    from ondevice.bench.prompt import exact_prompt

    def emit(event: str, **data: Any) -> None:
        out.write(json.dumps({"event": event, **data}) + "\n")
        out.flush()

    stage = "import"
    try:
        cls = backend_class(job["backend"])
        reason = cls.unavailable_reason()
        if reason:
            emit("error", status="unavailable", stage=stage, error=reason)
            return 2
        backend = cls()
        try:
            backend.import_runtime()
        except ImportError as exc:
            emit("error", status="unavailable", stage=stage, error=_one_line(exc))
            return 2
        emit("started", baseline_rss_mib=current_rss_mib(), backend_version=cls.version(), pid=os.getpid())

        stage = "load"
        prompt_tokens, gen_tokens = int(job["prompt_tokens"]), int(job["gen_tokens"])
        n_ctx = int(job.get("n_ctx") or prompt_tokens + gen_tokens + 8)
        start = perf_counter()
        backend.kv_cache = job.get("kv_cache")
        backend.load(Path(job["artifact"]), threads=int(job["threads"]), n_ctx=n_ctx)
        emit("loaded", load_s=perf_counter() - start, rss_mib=current_rss_mib())

        stage = "prompt"
        prompt = exact_prompt(backend, prompt_tokens)
        emit("prompt", prompt_tokens=len(prompt.ids))

        stage = "run"
        clock = TokenClock()
        warmup = int(job.get("warmup", 0))
        for index in range(warmup + int(job["repeat"])):
            backend.generate(prompt, gen_tokens, clock)
            emit("repeat", index=index, warmup=index < warmup, **repeat_timing(clock, len(prompt.ids), gen_tokens))
        emit("done", peak_rss_mib=peak_rss_mib(), rss_mib=current_rss_mib())
        with contextlib.suppress(Exception):  # the measurement is complete; the process ends anyway
            backend.close()
        return 0
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report short
        emit("interrupted", stage=stage, peak_rss_mib=peak_rss_mib())
        return 130
    except Exception as exc:  # any failure is a result to record, never a crash of the run
        emit("error", status="error", stage=stage, error=_one_line(exc))
        return 1


PARENT_PID_ENV = "ONDEVICE_BENCH_PARENT"


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the run that started it dies, even by SIGKILL (no orphan keeps a core
    busy). The parent's pid comes from the environment, checked after arming to close the race."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # the parent died before prctl
        os._exit(130)


def main() -> int:
    _die_with_parent()
    # The protocol gets a private copy of stdout; fd 1 itself now points at stderr so that prints from native
    # code (or from Python libraries) cannot interleave with the JSON lines.
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    line = sys.stdin.readline()
    try:
        job = json.loads(line)
    except ValueError:
        protocol.write(json.dumps({"event": "error", "status": "error", "stage": "job",
                                   "error": "the worker expects one JSON job line on stdin"}) + "\n")
        return 2
    return run_job(job, protocol)


if __name__ == "__main__":
    sys.exit(main())
