"""One model, one worker thread, a bounded FIFO of jobs.

The model is not thread-safe, so one worker thread runs it. With parallel=1 jobs run one at a time in arrival
order (first come, first served: fair, and no request can starve). With parallel=N the worker decodes up to N
jobs together (continuous batching, ondevice.runtime.batch): one pass through the weights gives every running job
its next token, cheaper than a pass each; a job joins between steps when a slot is free, in arrival order, and
leaves when it ends or is cancelled without stalling the others. The queue is bounded: when it is full, submit()
raises QueueFull and the HTTP layer answers 429 at once instead of letting latency grow without limit. A job
carries its own event queue; the worker pushes text pieces into it and checks `cancelled` between tokens (between
steps), so a client that disconnects stops its generation within one token.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ondevice.errors import OndeviceError

MAX_AUTO_PARALLEL = 4  # a desktop app plus a few background jobs; more slots split a small CPU further


def auto_parallel(kv_bytes_per_slot: int, cores: int, ram_bytes: int | None) -> int:
    """Slots for `serve` when --parallel is not given: 4 (2 per core below 2 cores), fewer when the KV caches of
    full-context slots would take more than a quarter of the RAM."""
    slots = min(MAX_AUTO_PARALLEL, max(1, 2 * cores))
    if ram_bytes and kv_bytes_per_slot > 0:
        slots = min(slots, max(1, ram_bytes // 4 // kv_bytes_per_slot))
    return int(slots)


class QueueFull(Exception):
    """The wait queue is at capacity (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down (HTTP 503)."""


@dataclass
class Job:
    prompt: str | list[dict[str, str]]
    generate_kwargs: dict[str, Any]
    json_schema: dict | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass
class JobRecord:
    id: str
    status: str  # "done", "cancelled", "error", "skipped" (cancelled while waiting)
    completion_tokens: int
    wait_s: float
    run_s: float


class Engine:
    def __init__(self, model: Any, *, max_queue: int = 16, history: int = 256, parallel: int = 1) -> None:
        if parallel < 1:
            raise OndeviceError(f"parallel must be >= 1, got {parallel}")
        if parallel > 1 and not hasattr(getattr(model, "transformer", None), "forward_segments"):
            raise OndeviceError("--parallel above 1 needs ondevice's own runtime (a GGUF model); this backend "
                                "decodes one request at a time")
        self.model = model
        self.max_queue = max_queue
        self.parallel = parallel
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self.running_jobs: list[Job] = []
        self.records: deque[JobRecord] = deque(maxlen=history)
        self.served = 0
        self._worker = threading.Thread(target=self._run, name="ondevice-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ API for request handlers
    def submit(self, job: Job) -> Job:
        if self._stopping.is_set():
            raise EngineStopped("the server is shutting down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting; retry shortly") from None
        return job

    @property
    def running(self) -> Job | None:
        """A running job (the oldest), or None when idle."""
        jobs = self.running_jobs
        return jobs[0] if jobs else None

    def waiting(self) -> int:
        return self._jobs.qsize()

    def record(self, job_id: str) -> JobRecord | None:
        for rec in reversed(self.records):
            if rec.id == job_id:
                return rec
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel waiting and running ones, and join the worker."""
        self._stopping.set()
        for job in list(self.running_jobs):
            job.cancelled.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.events.put(("error", 503, "the server is shutting down"))
        try:
            self._jobs.put_nowait(None)  # wake the worker
        except queue.Full:
            pass
        self._worker.join(timeout)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        if self.parallel > 1:
            self._run_batched()
            return
        while not self._stopping.is_set():
            job = self._jobs.get()
            if job is None:
                break
            if job.cancelled.is_set():
                self._skip(job)
                continue
            self.running_jobs = [job]
            try:
                self._execute(job)
            finally:
                self.running_jobs = []

    def _skip(self, job: Job) -> None:
        self.records.append(JobRecord(job.id, "skipped", 0, time.monotonic() - job.submitted_at, 0.0))

    def _token_filter(self, job: Job, kwargs: dict[str, Any]) -> Any:
        if job.json_schema is None:
            return None
        from ondevice.structured import TokenFilter

        return TokenFilter(self.model, json_schema=job.json_schema, max_string_tokens=kwargs.pop("max_string_tokens",
                                                                                                    None))

    def _finish(self, job: Job, stats: Any, token_filter: Any, status: str, start: float) -> None:
        """The job's last event and its record."""
        if status == "done":
            if token_filter is not None and not token_filter.is_accepting():
                job.events.put(("error", 400, f"the reply stopped before the JSON was complete "
                                              f"({stats.finish_reason}); raise max_tokens or bound the "
                                              "schema (maxLength, maxItems, enum)"))
                status = "error"
            else:
                job.events.put(("done", stats.finish_reason, stats.prompt_tokens, stats.generated_tokens,
                                stats.closed_at_limit, stats.cached_tokens))
        self.served += 1
        self.records.append(JobRecord(job.id, status, stats.generated_tokens if stats else 0,
                                      start - job.submitted_at, time.monotonic() - start))

    def _fail(self, job: Job, exc: Exception, start: float) -> None:
        if isinstance(exc, OndeviceError):
            job.events.put(("error", 400, str(exc)))
        else:  # keep serving: one bad request must not take the server down
            job.events.put(("error", 500, f"internal error: {type(exc).__name__}: {exc}"))
        self._finish(job, None, None, "error", start)

    def _run_batched(self) -> None:
        from ondevice.runtime.batch import Batch

        live: dict[Any, tuple[Job, Any, float]] = {}  # sequence -> (job, token filter, start)

        def new_batch() -> Batch:
            # pieces go to their job as soon as they exist: the first of a step's newcomers need not wait for
            # the others' prefill
            return Batch(self.model, self.parallel, on_piece=lambda seq, piece: live[seq][0].events.put(
                ("delta", piece)))

        batch = new_batch()
        while not self._stopping.is_set():
            while len(live) < self.parallel:  # join the batch between steps, in arrival order
                try:
                    job = self._jobs.get(block=not live)
                except queue.Empty:
                    break
                if job is None or self._stopping.is_set():
                    break
                if job.cancelled.is_set():
                    self._skip(job)
                    continue
                start = time.monotonic()
                job.started.set()
                try:
                    kwargs = dict(job.generate_kwargs)
                    token_filter = self._token_filter(job, kwargs)
                    seq = batch.submit(job.prompt, token_filter=token_filter, **kwargs)
                except Exception as exc:  # noqa: BLE001 - reported to the client
                    self._fail(job, exc, start)
                    continue
                live[seq] = (job, token_filter, start)
            self.running_jobs = [job for job, _, _ in live.values()]
            for seq, (job, _, _) in live.items():
                if job.cancelled.is_set():
                    batch.cancel(seq)
            if live:
                try:
                    batch.step()
                except Exception as exc:  # noqa: BLE001 - every running job gets the error; the server goes on
                    for job, _, start in live.values():
                        self._fail(job, exc, start)
                    live.clear()
                    batch = new_batch()
            for seq in [s for s in live if s.done]:
                job, token_filter, start = live.pop(seq)
                self._finish(job, seq.stats, token_filter, "cancelled" if job.cancelled.is_set() else "done", start)
            self.running_jobs = [job for job, _, _ in live.values()]
        for seq, (job, _, start) in live.items():
            batch.cancel(seq)
            self._finish(job, seq.stats, None, "cancelled", start)
        self.running_jobs = []

    def _execute(self, job: Job) -> None:
        start = time.monotonic()
        job.started.set()
        status = "done"
        try:
            kwargs = dict(job.generate_kwargs)
            token_filter = self._token_filter(job, kwargs)
            stream = self.model.generate(job.prompt, token_filter=token_filter, **kwargs)
            for piece in stream:
                if job.cancelled.is_set():
                    stream.close()  # stops the generator: no more tokens are computed
                    status = "cancelled"
                    break
                job.events.put(("delta", piece))
        except Exception as exc:  # noqa: BLE001 - reported to the client
            self._fail(job, exc, start)
            return
        self._finish(job, self.model.last_stats, token_filter, status, start)
