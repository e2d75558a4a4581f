"""The benchmark run: (backend, artifact, setting) jobs, each in a fresh worker process, recorded one row per job
as soon as it ends. A backend that is missing or fails becomes a row with its error and the run goes on;
Ctrl-C stops the run, keeps the rows recorded so far and the partial row of the job it interrupted."""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ondevice.bench.artifacts import Artifact
from ondevice.bench.backends import backend_class
from ondevice.bench.worker import PARENT_PID_ENV
from ondevice.runtime.kv import kv_quant_label


@dataclass(frozen=True)
class Settings:
    threads: int
    prompt_tokens: int
    gen_tokens: int
    repeat: int
    warmup: int
    kv_cache: str | None = None  # --kv-cache; None: the backend's default cache


@dataclass(frozen=True)
class Job:
    backend: str
    artifact: Artifact
    settings: Settings

    def describe(self) -> str:
        s = self.settings
        return (f"{self.backend} {self.artifact.model} {kv_quant_label(self.artifact.quant, s.kv_cache)} "
                f"threads={s.threads} prompt={s.prompt_tokens} gen={s.gen_tokens}")

    def worker_job(self) -> dict[str, Any]:
        return {"backend": self.backend, "artifact": str(self.artifact.path), **asdict(self.settings)}


@dataclass
class WorkerResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    stderr_tail: str = ""
    interrupted: bool = False
    timed_out: bool = False

    def first(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == name), None)


def plan_jobs(artifacts: Iterable[Artifact], backends: list[str], *, threads: list[int], prompts: list[int],
              gen_tokens: int, repeat: int, warmup: int,
              kv_caches: list[str | None] | None = None) -> tuple[list[Job], list[str]]:
    """Every (backend, artifact, setting) a backend can run, and notes on the pairs it cannot."""
    jobs: list[Job] = []
    notes: list[str] = []
    for artifact in artifacts:
        for name in backends:
            cls = backend_class(name)
            if not cls.accepts(artifact.kind):
                notes.append(f"{name} does not run {artifact.kind} artifacts: skipped {artifact.path.name}")
                continue
            if not cls.timed:
                notes.append(f"{name} is for quality (ondevice eval), not speed: skipped {artifact.path.name}")
                continue
            for kv in kv_caches or [None]:
                if kv is not None and kv not in cls.kv_cache_types:
                    notes.append(f"{name} cannot be given a {kv} KV cache: skipped {artifact.path.name} kv-{kv}")
                    continue
                for n_threads in threads:
                    for n_prompt in prompts:
                        jobs.append(Job(name, artifact, Settings(n_threads, n_prompt, gen_tokens, repeat, warmup, kv)))
    return jobs, notes


def _read_lines(stream: Any, sink: queue.Queue) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


class InterruptFlag:
    """While active (main thread only), Ctrl-C sets a flag instead of raising KeyboardInterrupt. An exception
    raised asynchronously can land inside a lock's acquire in queue.get (CPython restores a Condition's lock
    in a `finally` that a signal can cut short), leaving the queue locked and the run hung with its worker
    alive; polling a flag cannot. A second Ctrl-C is counted too: it means "stop now"."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def __bool__(self) -> bool:
        return self.count > 0

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def run_worker(job: Job, *, timeout_s: float | None = None, interrupt: InterruptFlag | None = None) -> WorkerResult:
    """Run one job in `python -m ondevice.bench.worker`; every event it sent, even if it was cut short.
    `interrupt` (an active InterruptFlag) is polled: once set, the worker is asked to stop and report. Without
    one, Ctrl-C during the job is caught the same way and shows as `result.interrupted`."""
    if interrupt is None:
        with InterruptFlag() as own:
            return run_worker(job, timeout_s=timeout_s, interrupt=own)
    result = WorkerResult()
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as stderr:
        # The worker dies with this process (worker.py sets a parent-death signal for the pid it is given).
        proc = subprocess.Popen([sys.executable, "-m", "ondevice.bench.worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8",
                                env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())})
        try:
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
            reader.start()
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(job.worker_job()) + "\n")
                proc.stdin.close()
            except OSError:  # the worker died at start; its exit status and stderr say why
                pass
            deadline = time.monotonic() + timeout_s if timeout_s else None
            _collect(lines, result, deadline, proc, interrupt)
            if interrupt:
                result.interrupted = True
                _stop_worker(proc, interrupt)
                _collect(lines, result, time.monotonic() + 15, proc, None)
        finally:  # whatever happens here, no worker outlives its job
            if proc.poll() is None:
                proc.kill()
            result.returncode = proc.wait()
        stderr.seek(0)
        tail = [line.strip() for line in stderr.read().splitlines() if line.strip()]
        result.stderr_tail = tail[-1] if tail else ""
    return result


def _collect(lines: queue.Queue, result: WorkerResult, deadline: float | None, proc: subprocess.Popen,
             interrupt: InterruptFlag | None) -> None:
    """Read the worker's events until it closes its output, the deadline passes (the worker is killed) or, with
    `interrupt`, Ctrl-C is pressed."""
    while True:
        if interrupt:
            return
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            if deadline is not None and time.monotonic() > deadline:
                result.timed_out = True
                proc.kill()
                return
            continue
        if line is None:
            return
        try:
            result.events.append(json.loads(line))
        except ValueError:
            continue  # not a protocol line (cannot happen by design; never fatal)


def _stop_worker(proc: subprocess.Popen, interrupt: InterruptFlag) -> None:
    """After Ctrl-C: the terminal has usually signalled the worker too; give it a moment to report, then ask it.
    A second Ctrl-C kills it at once."""
    deadline = time.monotonic() + 2
    while proc.poll() is None and time.monotonic() < deadline:
        if interrupt.count > 1:
            proc.kill()
            return
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)


def _spread(values: list[float], scale: float = 1.0) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return statistics.median(values) * scale, min(values) * scale, max(values) * scale


def measurement_row(job: Job, result: WorkerResult, environment: dict[str, Any]) -> dict[str, Any] | None:
    """The store row for one job; None when an interrupted job had measured nothing yet."""
    artifact, s = job.artifact, job.settings
    repeats = [e for e in result.events if e.get("event") == "repeat" and not e.get("warmup")]
    error_event = result.first("error")
    if error_event:
        status, error = error_event.get("status", "error"), f"{error_event.get('stage')}: {error_event['error']}"
    elif result.first("done"):
        status, error = "ok", None
    elif result.interrupted or result.first("interrupted"):
        if not repeats:
            return None
        status, error = "interrupted", f"interrupted after {len(repeats)} of {s.repeat} repeats"
    elif result.timed_out:
        status, error = "error", f"timed out after {len(repeats)} of {s.repeat} repeats"
    else:
        code = result.returncode or 0
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        status, error = "error", f"the worker died ({how}): {result.stderr_tail or 'no message'}"
    started = result.first("started") or {}
    loaded = result.first("loaded") or {}
    finished = result.first("done") or result.first("interrupted") or {}
    baseline, peak = started.get("baseline_rss_mib"), finished.get("peak_rss_mib")
    ttft = _spread([e["ttft_s"] for e in repeats], 1000.0)
    prefill = _spread([e["prefill_tok_s"] for e in repeats])
    decode = _spread([e["decode_tok_s"] for e in repeats])
    prompt_event = result.first("prompt") or {}
    return {
        "kind": "speed", "status": status, "error": error,
        "backend": job.backend, "backend_version": started.get("backend_version") or backend_class(job.backend).version(),
        "model": artifact.model, "quant": kv_quant_label(artifact.quant, s.kv_cache), "artifact": str(artifact.path),
        "artifact_kind": artifact.kind, "artifact_size_bytes": artifact.size_bytes,
        "weight_bytes_per_token": artifact.weight_bytes_per_token,
        "threads": s.threads, "prompt_tokens": prompt_event.get("prompt_tokens", s.prompt_tokens),
        "gen_tokens": s.gen_tokens, "repeats": len(repeats),
        "load_s": loaded.get("load_s"),
        "ttft_ms": ttft[0], "ttft_ms_min": ttft[1], "ttft_ms_max": ttft[2],
        "prefill_tok_s": prefill[0], "prefill_tok_s_min": prefill[1], "prefill_tok_s_max": prefill[2],
        "decode_tok_s": decode[0], "decode_tok_s_min": decode[1], "decode_tok_s_max": decode[2],
        "peak_rss_mib": peak, "baseline_rss_mib": baseline,
        "rss_growth_mib": peak - baseline if peak is not None and baseline is not None else None,
        "settings": {**asdict(s), "sampling": "greedy, end-of-text ignored", "source": artifact.source,
                     "slots": 1,  # one sequence decoded: fit scales the KV bytes per slot from this
                     "kv_bytes_per_position": artifact.shape.kv_bytes_per_position(
                         backend_class(job.backend).kv_bytes_for(s.kv_cache)) if artifact.shape else None},
        "environment": {**environment, "backend_version": started.get("backend_version")},
        "samples": [{k: e[k] for k in ("ttft_s", "prefill_tok_s", "decode_s", "decode_tok_s")} for e in repeats],
    }


def unavailable_row(job: Job, reason: str, environment: dict[str, Any]) -> dict[str, Any]:
    result = WorkerResult(events=[{"event": "error", "status": "unavailable", "stage": "import", "error": reason}])
    row = measurement_row(job, result, environment)
    assert row is not None
    return row


@dataclass
class RunOutcome:
    rows: list[dict[str, Any]]
    interrupted: bool


def run_jobs(jobs: list[Job], *, record: Callable[[dict[str, Any]], None], environment: dict[str, Any],
             progress: bool = True, report_line: Callable[[str], None] | None = None,
             timeout_s: float | None = None) -> RunOutcome:
    """Run the jobs in order, recording each row the moment its job ends."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), unit="job", file=sys.stderr, disable=not progress or None, dynamic_ncols=True,
               leave=False)
    unavailable: dict[str, str | None] = {}
    # Ctrl-C anywhere in the run (in a job or between jobs, even while a row is being recorded) only sets the
    # flag; the loop stops at the next check, so every row measured so far is kept whole.
    with InterruptFlag() as interrupt:
        try:
            for job in jobs:
                if interrupt:
                    break
                bar.set_description(job.describe())
                if job.backend not in unavailable:
                    unavailable[job.backend] = backend_class(job.backend).unavailable_reason()
                reason = unavailable[job.backend]
                if reason:
                    row: dict[str, Any] | None = unavailable_row(job, reason, environment)
                else:
                    result = run_worker(job, timeout_s=timeout_s, interrupt=interrupt)
                    row = measurement_row(job, result, environment)
                if row is not None:
                    record(row)
                    rows.append(row)
                    if report_line:
                        bar.clear()
                        report_line(format_row(row))
                bar.update(1)
        finally:
            bar.close()
        interrupted = bool(interrupt)
    return RunOutcome(rows, interrupted)


def format_row(row: dict[str, Any]) -> str:
    head = (f"{row['backend']} {row['model']} {row['quant']} threads={row['threads']} prompt={row['prompt_tokens']} "
            f"gen={row['gen_tokens']}")
    if row["status"] in ("error", "unavailable"):
        return f"{head}: {row['status']}: {row['error']}"
    text = (f"{head}: decode {row['decode_tok_s']:.1f} tok/s [{row['decode_tok_s_min']:.1f}-"
            f"{row['decode_tok_s_max']:.1f}], prefill {row['prefill_tok_s']:.1f} tok/s, TTFT {row['ttft_ms']:.0f} ms, "
            f"load {row['load_s']:.2f} s, peak RSS {row['peak_rss_mib']:.0f} MiB (+{row['rss_growth_mib']:.0f})")
    return text + (f" [{row['error']}]" if row["status"] == "interrupted" else "")
