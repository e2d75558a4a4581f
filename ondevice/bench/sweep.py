"""`ondevice sweep`: a models x targets x schemes x backends x devices matrix as jobs (convert -> eval -> bench per
device), run in order here or as Ray tasks on a cluster, every result written by the driver to the one results
store (the same rows `ondevice bench` and `ondevice eval` write, from the same functions).

- Jobs. A convert job makes one artifact; eval and bench jobs depend on it (Ray waits for it). A bench job runs
  `runner.run_worker` (a fresh process per measurement, as `ondevice bench` does) and returns the node's
  fingerprint with its row, so every speed row keeps the device it was measured on.
- Resources per kind (RESOURCES): converts ask for memory by target and, for the heavy exports (ExecuTorch,
  Core ML), also hold a per-machine file lock, so a node never runs two of them at once whatever its size.
  A bench job for device D asks for the custom resource `device:D` (1 per device node): it runs only there, and
  one at a time, so timings are not shared with another measurement. Under `--ray local` (the machine is the
  device) it also holds every CPU: nothing else runs beside a measurement, as in the serial run.
- `--ray local` starts Ray in a thread (LocalRay) while the driver runs the first conversions itself, so Ray's
  start-up overlaps useful work instead of preceding it (see run_ray).
- Artifacts are shared by content hash, not copied: a node that lacks an artifact converts it itself (the name
  under ARTIFACT_DIR is the source's content hash, target and scheme; conversion is deterministic and atomic).
  Nodes therefore need the sources (a path on a shared or synced folder, or an alias in their model cache).
- Resumable: each job has a key (source content hash, target, scheme, backend, settings, device); a job whose
  key has an `ok` row in the store is skipped. A node that dies takes its tasks with it: Ray retries them
  elsewhere (MAX_RETRIES); a job that still fails, or that no remaining node can run, is recorded as an error row
  (never dropped), so a re-run retries exactly those. Ctrl-C keeps what finished; ray.shutdown() ends the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ondevice.bench.backends.base import COREML, GGUF, HF, MLX, ONNX, PTE
from ondevice.bench.runner import Job, Settings, measurement_row, run_worker
from ondevice.errors import OndeviceError, UnsupportedError

GIB = 2**30
# Memory a job of each kind needs (Ray's `memory` resource): the converters' measured peaks with headroom.
CONVERT_MEMORY = {"executorch": 6 * GIB, "coreml": 4 * GIB, "onnx": 2 * GIB, "mlx": 2 * GIB, "gguf": 1 * GIB}
HEAVY_EXPORTS = ("executorch", "coreml")  # never two at once on one machine (a file lock on top of memory)
EVAL_MEMORY = 2 * GIB
BENCH_MEMORY = 1 * GIB
MAX_RETRIES = 2  # Ray re-runs a task this many times after its node or worker died
DEVICE_PREFIX = "device:"
LOCAL_DEVICE = "local"
TARGET_KINDS = {"gguf": GGUF, "mlx": MLX, "executorch": PTE, "onnx": ONNX, "coreml": COREML, "hf": HF}


@dataclass(frozen=True)
class SweepJob:
    kind: str  # convert | eval | bench
    source: str  # the MODEL argument as given (path or alias)
    source_sha256: str
    label: str
    target: str
    scheme: str
    artifact_dir: str
    backend: str | None = None
    device: str | None = None
    settings: Settings | None = None
    eval_setup: dict[str, int] = field(default_factory=dict)  # ctx, max_tokens, threads

    @property
    def key(self) -> str:
        """What makes two jobs the same measurement (what `resume` compares)."""
        facts = {"kind": self.kind, "source": self.source_sha256, "label": self.label, "target": self.target,
                 "scheme": self.scheme, "backend": self.backend, "device": self.device,
                 "settings": asdict(self.settings) if self.settings else None, "eval": self.eval_setup}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def artifact_id(self) -> tuple[str, str, str]:
        return (self.source_sha256, self.target, self.scheme)

    def describe(self) -> str:
        head = f"{self.kind} {self.label} {self.target} {self.scheme}"
        if self.backend:
            head += f" {self.backend}"
        return head + (f" on {self.device}" if self.device else "")

    def resources(self, machine_cpus: int | None = None) -> dict[str, Any]:
        """Ray task options for this job's kind. `machine_cpus` (`--ray local`: the one node is this machine, whose
        CPU is the device): a bench then holds every CPU, so a measurement runs alone, as in the serial run."""
        if self.kind == "convert":
            return {"num_cpus": 1, "memory": CONVERT_MEMORY.get(self.target, 2 * GIB)}
        if self.kind == "eval":
            return {"num_cpus": 1, "memory": EVAL_MEMORY}
        return {"num_cpus": machine_cpus or 1, "memory": BENCH_MEMORY,
                "resources": {DEVICE_PREFIX + str(self.device): 1}}


@dataclass
class SweepPlan:
    jobs: list[SweepJob]  # converts first, then their dependents; skipped jobs already removed
    skipped: list[SweepJob]
    notes: list[str]


def plan_sweep(models: list[str], *, targets: list[str], quants: list[str], backends: list[str] | None,
               devices: list[str], artifact_dir: Path, settings: Settings | None, eval_setup: dict[str, int] | None,
               done_keys: set[str], label: str | None = None) -> SweepPlan:
    """Expand the matrix. `settings` None: no bench jobs; `eval_setup` None: no eval jobs."""
    from ondevice.bench.artifacts import _label_for, content_hash
    from ondevice.bench.backends import BACKEND_MODULES, backend_class
    from ondevice.converters import get_target
    from ondevice.hub import resolve_model

    for name in backends or []:
        backend_class(name)  # unknown names fail before anything runs
    wanted: list[SweepJob] = []
    notes: list[str] = []
    for model in models:
        src = resolve_model(model)
        source_sha = content_hash(src)
        model_label = label or _label_for(model, src) or src.name.removesuffix(".gguf")
        for target in targets:
            writer = get_target(target)
            kind = TARGET_KINDS.get(target, target)
            for quant in quants or [writer.TARGET.default_quant]:
                scheme, _note = writer.TARGET.resolve_quant(quant)
                base = SweepJob("convert", model, source_sha, model_label, target, scheme, str(artifact_dir))
                names = backends or list(BACKEND_MODULES)
                runs = [n for n in names if backend_class(n).accepts(kind)]
                if backends:
                    notes += [f"{n} does not run {kind} artifacts: skipped {target} {scheme}"
                              for n in names if n not in runs]
                if eval_setup is not None:
                    for name in [n for n in runs if backend_class(n).returns_logits] or runs[:1]:
                        wanted.append(replace(base, kind="eval", backend=name, eval_setup=eval_setup))
                if settings is not None:
                    for name in [n for n in runs if backend_class(n).timed]:
                        for device in devices:
                            wanted.append(replace(base, kind="bench", backend=name, device=device, settings=settings))
                wanted.append(base)
    skipped = [j for j in wanted if j.kind != "convert" and j.key in done_keys]
    todo = [j for j in wanted if j.kind != "convert" and j.key not in done_keys]
    needed = {j.artifact_id for j in todo}
    converts = [j for j in wanted if j.kind == "convert" and j.artifact_id in needed]
    return SweepPlan(converts + todo, skipped, notes)


# ---------------------------------------------------------------------------------------------- one job
@contextmanager
def _heavy_export_lock(target: str) -> Iterator[None]:
    """One ExecuTorch / Core ML export per machine: a lock file in the machine's temp dir, whatever Ray schedules."""
    if target not in HEAVY_EXPORTS:
        yield
        return
    with open(Path(tempfile.gettempdir()) / "ondevice-heavy-export.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _artifact(job: SweepJob):  # type: ignore[no-untyped-def]
    """This node's copy of the job's artifact, converted here if the node lacks it (same name = same content)."""
    from ondevice.bench.artifacts import converted_artifact

    with _heavy_export_lock(job.target):
        return converted_artifact(job.source, job.target, job.scheme, progress=False, label=job.label,
                                  out_dir=Path(job.artifact_dir))


def node_environment(fp: dict[str, Any]) -> dict[str, Any]:
    software = fp["software"]
    return {"os": software["os"], "python": software["python"], "ondevice": software["ondevice"],
            "mem_read_gbs": fp.get("mem_read_gbs")}


def execute(job: SweepJob, *_after: Any, node_fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job on this node; {"fingerprint", "row" (None for a convert), "sha256"}. `_after`: the results of
    the jobs this one waits for (Ray resolves them before the call). `node_fingerprint`: this node's, when the
    caller has it (`--ray local`: the driver's machine is the node), so a Ray worker does not measure the memory
    bandwidth again (~1 s per worker process)."""
    from ondevice.bench.artifacts import content_hash
    from ondevice.bench.fingerprint import fingerprint

    fp = node_fingerprint or fingerprint()  # cached per process; bandwidth measured once, as `ondevice bench` does
    artifact = _artifact(job)
    sha = content_hash(artifact.path)
    sweep = {"key": job.key, "device": job.device, "source_sha256": job.source_sha256, "artifact_sha256": sha,
             "target": job.target}
    row: dict[str, Any] | None = None
    if job.kind == "eval":
        from ondevice.bench.artifacts import describe_artifact
        from ondevice.bench.evaluate import EvalWindowing, evaluate, quality_row
        from ondevice.hub import resolve_model

        reference = describe_artifact(resolve_model(job.source))
        setup = dict(job.eval_setup)
        threads = setup.pop("threads", None) or fp["hardware"]["cores_physical"]
        result = evaluate(artifact, reference, backend=job.backend, threads=threads, setup=EvalWindowing(**setup),
                          progress=False)
        row = {**quality_row(artifact, reference, result, node_environment(fp)), "threads": threads}
    elif job.kind == "bench":
        assert job.settings is not None and job.backend is not None
        bench_job = Job(job.backend, artifact, job.settings)
        row = measurement_row(bench_job, run_worker(bench_job), node_environment(fp))
        if row is None:
            raise KeyboardInterrupt
    if row is not None:
        row["settings"] = {**row["settings"], "sweep": sweep}
    return {"fingerprint": fp, "row": row, "sha256": sha}


def failed_row(job: SweepJob, error: str) -> dict[str, Any]:
    """The row of a job that could not give a result: recorded, so it is never lost and a re-run retries it."""
    return {"kind": "quality" if job.kind == "eval" else "speed", "status": "error",
            "error": " ".join(error.split())[:500], "backend": job.backend or job.target, "model": job.label,
            "quant": job.scheme, "artifact_kind": job.target,
            "settings": {**(asdict(job.settings) if job.settings else job.eval_setup),
                         "sweep": {"key": job.key, "device": job.device, "source_sha256": job.source_sha256,
                                   "target": job.target}}}


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Finished:
    job: SweepJob
    row: dict[str, Any] | None  # None for a convert
    fingerprint: dict[str, Any] | None  # of the node that ran it (None: it did not run)
    error: str | None = None  # a convert's failure (an eval's or bench's is in its row)


@dataclass
class SweepOutcome:
    finished: list[Finished]
    interrupted: bool


Record = Callable[[Finished], None]


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def _failed(job: SweepJob, error: str) -> Finished:
    if job.kind == "convert":
        return Finished(job, None, None, error=" ".join(error.split())[:500])
    return Finished(job, failed_row(job, error), None)


def _run_here(job: SweepJob, failed_artifacts: dict[tuple[str, str, str], str]) -> Finished:
    """One job in this process, as a Ray task would run it: a failure is recorded and the sweep goes on."""
    if job.artifact_id in failed_artifacts and job.kind != "convert":
        return Finished(job, failed_row(job, f"convert failed: {failed_artifacts[job.artifact_id]}"), None)
    try:
        result = execute(job)
        return Finished(job, result["row"], result["fingerprint"])
    except Exception as exc:
        error = str(exc) if isinstance(exc, OndeviceError) else _error_text(exc)
        if job.kind == "convert":
            failed_artifacts[job.artifact_id] = error
        return _failed(job, error)


def run_serial(jobs: list[SweepJob], record: Record) -> SweepOutcome:
    """The same jobs, here, in order (no Ray)."""
    finished: list[Finished] = []
    failed_artifacts: dict[tuple[str, str, str], str] = {}
    try:
        for job in jobs:
            done = _run_here(job, failed_artifacts)
            record(done)
            finished.append(done)
            if done.row is not None and done.row["status"] == "interrupted":  # Ctrl-C inside a bench worker
                return SweepOutcome(finished, True)
    except KeyboardInterrupt:
        return SweepOutcome(finished, True)
    return SweepOutcome(finished, False)


def connect(address: str, devices: list[str], *, num_cpus: int | None = None) -> None:
    """`local`: a one-machine Ray (this machine is each device named); else join the cluster at ADDRESS."""
    ray = import_ray()
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
    if address == "local":
        # address="local" explicitly: without it ray.init joins whatever cluster RAY_ADDRESS names (Ray sets it in
        # every driver's environment, so a sweep started from one would join that cluster, or a dead one).
        # worker_niceness 0: Ray starts its workers at nice 15 by default, so a bench (and its worker process)
        # would run at a lower priority than the serial run's, which on a shared machine changes the timings.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=100 * 2**20,
                 resources={DEVICE_PREFIX + d: 1 for d in devices}, _system_config={"worker_niceness": 0}, **quiet)
    else:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError) as exc:
            raise OndeviceError(f"cannot join the Ray cluster at {address}: {_error_text(exc)}") from None


class LocalRay:
    """`--ray local`'s one-machine Ray, started in a thread so that this process can run the first conversions
    while Ray's processes come up (~3 s here, longer on a loaded machine). The thread stays alive until stop():
    Ray forks its processes with PR_SET_PDEATHSIG, which on Linux fires when the forking *thread* ends."""

    def __init__(self, devices: list[str], num_cpus: int | None = None, *, targets: tuple[str, ...] = ()) -> None:
        if importlib.util.find_spec("ray") is None:  # fail here, in one line, not inside the thread
            import_ray()
        from ondevice.bench.fingerprint import fingerprint

        self.num_cpus = num_cpus or os.cpu_count() or 1
        # This machine's fingerprint, bandwidth included, measured before Ray's start-up can disturb it (the serial
        # run measures it at its first job); the driver's jobs and Ray's tasks all record it.
        self.fingerprint = fingerprint()
        self._ready = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._warming: list[Any] = []
        self._thread = threading.Thread(target=self._start, args=(devices, targets), name="ondevice-ray-start",
                                        daemon=True)
        self._thread.start()

    def _start(self, devices: list[str], targets: tuple[str, ...]) -> None:
        try:
            # Ray warns that a non-main thread cannot install its SIGTERM handler; the driver's own default
            # (terminate) is what a sweep wants, so the warning is noise.
            with _quiet_logger("ray._private.worker", "SIGTERM handler is not set"), _lean_head_node():
                connect("local", devices, num_cpus=self.num_cpus)
            # Each worker imports what a job needs (~0.3 s) now, beside the driver's conversion, rather than at
            # its first job. Fire and forget: a bench (which holds every CPU) waits for these to end.
            warm = import_ray().remote(_warm_worker)
            self._warming = [warm.options(num_cpus=1).remote(targets) for _ in range(self.num_cpus)]
        except BaseException as exc:  # handed to the main thread by wait()
            self._error = exc
        finally:
            self._ready.set()
        self._release.wait()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait(self) -> None:
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Shut Ray down (once it is up) and end the thread."""
        self._ready.wait()
        try:
            if self._error is None:
                import_ray().shutdown()
        finally:
            self._release.set()
            self._thread.join()


def _warm_worker(targets: tuple[str, ...]) -> None:
    """The imports every job makes (execute's, and the converters of the sweep's targets)."""
    from ondevice.bench import artifacts, fingerprint  # noqa: F401
    from ondevice.converters import get_target

    for target in targets:
        get_target(target)


@contextmanager
def _quiet_logger(name: str, text: str) -> Iterator[None]:
    import logging

    logger = logging.getLogger(name)

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@contextmanager
def _lean_head_node() -> Iterator[None]:
    """A one-machine Ray without three services a sweep never uses, each a Python process importing Ray (~0.5-1
    CPU-second of start-up on a machine whose cores the driver is converting on meanwhile): the autoscaler monitor
    (one machine: nothing to scale; it also spent 1.0 of ray.shutdown()'s 1.6 s dying), the log monitor
    (log_to_driver is off) and the dashboard API server (include_dashboard is off; a minimal Ray install loads no
    dashboard modules). Ray's internals (ray==2.60.*, see pyproject) are reached defensively: a missing name
    means that service starts as usual."""
    try:
        from ray._private.node import Node
    except ImportError:
        yield
        return
    saved = {name: Node.__dict__[name] for name in ("start_monitor", "start_log_monitor", "start_api_server")
             if callable(Node.__dict__.get(name))}
    for name in saved:
        setattr(Node, name, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


def import_ray():  # type: ignore[no-untyped-def]
    try:
        import ray
    except ImportError:
        raise UnsupportedError("--ray needs Ray: pip install 'ondevice[ray]'") from None
    return ray


def cluster_devices() -> dict[str, int]:
    """device name -> how many alive nodes offer it."""
    ray = import_ray()
    out: dict[str, int] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name in node.get("Resources", {}):
                if name.startswith(DEVICE_PREFIX):
                    out[name[len(DEVICE_PREFIX):]] = out.get(name[len(DEVICE_PREFIX):], 0) + 1
    return out


def _feasible(options: dict[str, Any], nodes: list[dict[str, Any]]) -> bool:
    """Can some alive node ever run a task with these options (its totals, not what is free now)?"""
    need = {"CPU": options.get("num_cpus", 1), "memory": options.get("memory", 0), **options.get("resources", {})}
    return any(all(node.get("Resources", {}).get(k, 0) >= v for k, v in need.items() if v)
               for node in nodes if node.get("Alive"))


def run_ray(jobs: list[SweepJob], record: Record, *, poll_s: float = 2.0, local: LocalRay | None = None
            ) -> SweepOutcome:
    """Every job as a Ray task (dependents wait on their convert); results recorded here as they arrive.

    `local` (a Ray still starting on this machine): until it is up, this process runs the conversions itself, in
    order, as the serial run would; then the rest go to Ray. Only conversions: a bench must not share the CPU with
    Ray's start-up, and the eval and bench jobs of an artifact converted here find it on disk (one machine), so
    they need no dependency. Ray becoming ready mid-conversion waits for that conversion to end, so no job ever
    runs beside one that Ray does not know about."""
    jobs = list(jobs)
    machine_cpus = local.num_cpus if local is not None else None
    finished: list[Finished] = []
    failed_artifacts: dict[tuple[str, str, str], str] = {}
    if local is not None:
        try:
            while jobs and jobs[0].kind == "convert" and not local.ready:
                done = _run_here(jobs.pop(0), failed_artifacts)
                record(done)
                finished.append(done)
            local.wait()
        except KeyboardInterrupt:
            return SweepOutcome(finished, True)
        for job in [j for j in jobs if j.artifact_id in failed_artifacts]:
            done = _run_here(job, failed_artifacts)  # its convert failed here: recorded as that, not run
            record(done)
            finished.append(done)
        jobs = [j for j in jobs if j.artifact_id not in failed_artifacts]
    ray = import_ray()
    task = ray.remote(execute)
    same_machine = {"node_fingerprint": local.fingerprint} if local is not None else {}
    convert_refs: dict[tuple[str, str, str], Any] = {}
    pending: dict[Any, SweepJob] = {}
    for job in jobs:
        after = [convert_refs[job.artifact_id]] if job.kind != "convert" and job.artifact_id in convert_refs else []
        options = {**job.resources(machine_cpus), "max_retries": MAX_RETRIES, "retry_exceptions": False}
        ref = task.options(**options).remote(job, *after, **same_machine)
        if job.kind == "convert":
            convert_refs[job.artifact_id] = ref
        pending[ref] = job
    next_check = time.monotonic() + poll_s
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                    done = Finished(job, result["row"], result["fingerprint"])
                except (ray.exceptions.RayError, OndeviceError) as exc:
                    cause = getattr(exc, "cause", None) or exc
                    done = _failed(job, str(cause) if isinstance(cause, OndeviceError) else _error_text(exc))
                record(done)
                finished.append(done)
            if time.monotonic() >= next_check:  # jobs no alive node can run would wait forever: fail them
                next_check = time.monotonic() + poll_s
                nodes = ray.nodes()
                for ref, job in list(pending.items()):
                    if not _feasible(job.resources(machine_cpus), nodes):
                        ray.cancel(ref)  # never scheduled (nowhere to go): a plain cancel suffices
                        pending.pop(ref)
                        done = _failed(job, f"no node in the cluster can run it (needs {job.resources(machine_cpus)})")
                        record(done)
                        finished.append(done)
    except KeyboardInterrupt:
        # No ray.cancel here: force-cancelling tasks that wait on others aborts Ray 2.60's driver ("Tried to
        # complete task that was not pending"); the caller's ray.shutdown() ends this driver's tasks instead.
        return SweepOutcome(finished, True)
    return SweepOutcome(finished, False)


def done_keys(measurements: list[dict[str, Any]]) -> set[str]:
    """Keys of the sweep jobs that already have an ok row."""
    return {m["settings"]["sweep"]["key"] for m in measurements
            if isinstance(m.get("settings"), dict) and isinstance(m["settings"].get("sweep"), dict)}


def format_finished(done: Finished) -> str:
    row = done.row
    if row is None:
        return f"{done.job.describe()}: " + (f"error: {done.error}" if done.error else "converted")
    if row["status"] != "ok":
        return f"{done.job.describe()}: {row['status']}: {row['error']}"
    if row["kind"] == "quality":
        return (f"{done.job.describe()}: PPL {row['perplexity']:.3f} (reference {row['ref_perplexity']:.3f}), "
                f"KL {row['kl_mean']:.5f}, top-1 {row['top1_agreement']:.1%}")
    return (f"{done.job.describe()}: decode {row['decode_tok_s']:.1f} tok/s, prefill {row['prefill_tok_s']:.1f} "
            f"tok/s, peak RSS {row['peak_rss_mib']:.0f} MiB")


def summary_table(finished: list[Finished]) -> str:
    """Markdown table of the eval and bench results."""
    lines = ["| kind | model | target | quant | backend | device | status | result |",
             "|---|---|---|---|---|---|---|---|"]
    for done in finished:
        row, job = done.row, done.job
        if row is None:
            continue
        if row["status"] != "ok":
            result = str(row.get("error") or "")[:60]
        elif row["kind"] == "quality":
            result = f"PPL {row['perplexity']:.3f}, KL {row['kl_mean']:.5f}, top-1 {row['top1_agreement']:.1%}"
        else:
            result = f"decode {row['decode_tok_s']:.1f} tok/s, prefill {row['prefill_tok_s']:.1f} tok/s"
        device = job.device or (done.fingerprint or {}).get("label", "")
        lines.append(f"| {job.kind} | {job.label} | {job.target} | {job.scheme} | {job.backend} | {device} | "
                     f"{row['status']} | {result} |")
    return "\n".join(lines) + "\n"


def progress_bar(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    return tqdm(total=total, unit="job", file=sys.stderr, disable=not enabled or None, dynamic_ncols=True,
                leave=False, desc="sweep")
