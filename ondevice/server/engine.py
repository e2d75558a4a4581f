"""One model, one worker thread, a bounded FIFO of jobs.

The model is not thread-safe (one KV cache) and two generations at once would only halve each other's speed
on a small CPU, so jobs run one at a time in arrival order (first come, first served: fair, and no request
can starve). The queue is bounded: when it is full, submit() raises QueueFull and the HTTP layer answers 429
at once instead of letting latency grow without limit. A job carries its own event queue; the worker
pushes text pieces into it and checks `cancelled` between tokens, so a client that disconnects stops its
generation within one token.
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
    def __init__(self, model: Any, *, max_queue: int = 16, history: int = 256) -> None:
        self.model = model
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self.running: Job | None = None
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
        if self.running is not None:
            self.running.cancelled.set()
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
        while not self._stopping.is_set():
            job = self._jobs.get()
            if job is None:
                break
            if job.cancelled.is_set():
                self.records.append(JobRecord(job.id, "skipped", 0, time.monotonic() - job.submitted_at, 0.0))
                continue
            self.running = job
            try:
                self._execute(job)
            finally:
                self.running = None

    def _execute(self, job: Job) -> None:
        from ondevice.structured import TokenFilter

        start = time.monotonic()
        job.started.set()
        status, tokens = "done", 0
        try:
            kwargs = dict(job.generate_kwargs)
            token_filter = None
            if job.json_schema is not None:
                token_filter = TokenFilter(self.model, json_schema=job.json_schema,
                                           max_string_tokens=kwargs.pop("max_string_tokens", None))
            stream = self.model.generate(job.prompt, token_filter=token_filter, **kwargs)
            for piece in stream:
                if job.cancelled.is_set():
                    stream.close()  # stops the generator: no more tokens are computed
                    status = "cancelled"
                    break
                job.events.put(("delta", piece))
            stats = self.model.last_stats
            tokens = stats.generated_tokens
            if status == "done":
                if token_filter is not None and not token_filter.is_accepting():
                    job.events.put(("error", 400, f"the reply stopped before the JSON was complete "
                                                  f"({stats.finish_reason}); raise max_tokens or bound the "
                                                  "schema (maxLength, maxItems, enum)"))
                    status = "error"
                else:
                    job.events.put(("done", stats.finish_reason, stats.prompt_tokens, tokens, stats.closed_at_limit))
        except OndeviceError as exc:
            status = "error"
            job.events.put(("error", 400, str(exc)))
        except Exception as exc:  # keep serving: one bad request must not take the server down
            status = "error"
            job.events.put(("error", 500, f"internal error: {type(exc).__name__}: {exc}"))
        self.served += 1
        self.records.append(JobRecord(job.id, status, tokens, start - job.submitted_at, time.monotonic() - start))
