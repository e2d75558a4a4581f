"""The benchmark harness: store (migrations, kill, concurrency, exchange), worker and runner, Ctrl-C, report, fit,
and the harness's own overhead. Real backends on the tiny f32 GGUF (and SmolLM2 where it matters); short runs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ondevice.bench import fit as fitmod
from ondevice.bench.artifacts import describe_artifact
from ondevice.bench.backends import BACKEND_MODULES, backend_class, default_backends
from ondevice.bench.backends.base import ARTIFACT_KINDS, GGUF, Backend
from ondevice.bench.fingerprint import device_id, fingerprint, hardware_facts
from ondevice.bench.prompt import exact_prompt
from ondevice.bench.runner import Job, Settings, plan_jobs, run_jobs, run_worker
from ondevice.bench.store import SCHEMA_VERSION, Store
from ondevice.cli import main as cli
from ondevice.errors import OndeviceError

REPO = Path(__file__).resolve().parent.parent


def _usable(name: str) -> bool:
    if backend_class(name).unavailable_reason() is not None:
        return False
    try:
        backend_class(name)().import_runtime()
    except ImportError:
        return False
    return True


RUNTIMES = [name for name in ("ondevice", "llama.cpp") if _usable(name)]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "tiny-f32.gguf"
    assert cli(["convert", str(tiny_models["llama"]), "--to", "gguf", "--quant", "f32", "-o", str(out),
                "--no-progress", "--pre", "gpt-2"]) == 0
    return out


def _fp() -> dict:
    return fingerprint(measure_bandwidth=False)


def _speed_row(fp: dict, **extra) -> dict:
    row = {"device_id": fp["device_id"], "kind": "speed", "status": "ok", "backend": "llama.cpp",
           "model": "m", "quant": "q8_0", "threads": 1, "prompt_tokens": 16, "gen_tokens": 8}
    row.update(extra)
    return row


# ---------------------------------------------------------------------- store
def test_store_schema_wal_and_version(tmp_path):
    with Store(tmp_path / "r.sqlite") as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in store.conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_migration_from_version_1_keeps_rows(tmp_path):
    db = tmp_path / "old.sqlite"
    fp = _fp()
    with Store(db, target_version=1) as old:
        assert old.schema_version() == 1 and "kl_mean" not in old.columns()
        old.ensure_device(fp)
        uid = old.add_measurement(_speed_row(fp, decode_tok_s=42.0))
    with Store(db) as store:
        assert store.schema_version() == SCHEMA_VERSION and "kl_mean" in store.columns()
        [row] = store.measurements()
        assert row["uid"] == uid and row["decode_tok_s"] == 42.0 and row["kl_mean"] is None
        store.add_measurement({**_speed_row(fp), "kind": "quality", "kl_mean": 0.01})


def test_a_newer_database_is_refused(tmp_path):
    db = tmp_path / "new.sqlite"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(OndeviceError, match="newer ondevice"):
        Store(db)


WRITER = r"""
import sys, time
from ondevice.bench.store import Store
from ondevice.bench.fingerprint import fingerprint
db, writer, batches, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fp = fingerprint(measure_bandwidth=False)
store = Store(db)
store.ensure_device(fp)
if len(sys.argv) > 5:  # a start line: wait for the other writer
    open(sys.argv[5] + "." + writer, "w").close()
    while not __import__("os").path.exists(sys.argv[5]):
        time.sleep(0.01)
batch = 0
while batches < 0 or batch < batches:
    rows = [{"device_id": fp["device_id"], "kind": "speed", "status": "ok", "backend": "null", "model": "m",
             "error": f"{writer}:{batch}", "settings": {"i": i}} for i in range(size)]
    store.add_measurements(rows)
    batch += 1
    print(batch, flush=True)
"""


def _writer(db: Path, name: str, batches: int, size: int, start: Path | None = None) -> subprocess.Popen:
    args = [str(db), name, str(batches), str(size)] + ([str(start)] if start else [])
    return subprocess.Popen([sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, text=True, cwd=REPO)


def test_a_killed_writer_leaves_a_consistent_database(tmp_path):
    db = tmp_path / "kill.sqlite"
    proc = _writer(db, "w", -1, 10)  # writes 10-row batches until killed
    assert proc.stdout is not None
    for _ in range(25):
        assert proc.stdout.readline(), "the writer died"
    proc.send_signal(signal.SIGKILL)  # mid-transaction more often than not: it writes continuously
    proc.wait()
    with Store(db) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        batches = Counter(r["error"] for r in store.measurements())
        assert len(batches) >= 25
        assert set(batches.values()) == {10}, "a batch was partly written"
        store.add_measurement(_speed_row(_fp()))  # and it is still writable


def test_two_concurrent_writers_do_not_corrupt(tmp_path):
    db = tmp_path / "concurrent.sqlite"  # does not exist yet: both processes create and migrate it at once
    start = tmp_path / "go"
    procs = [_writer(db, name, 150, 2, start) for name in ("a", "b")]
    deadline = time.monotonic() + 120
    while not all(Path(f"{start}.{name}").exists() for name in ("a", "b")):  # both opened (and migrated) it
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    start.touch()
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    with Store(db) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = store.measurements()
        assert len(rows) == 2 * 150 * 2 and len({r["uid"] for r in rows}) == len(rows)
        writers = [r["error"].split(":")[0] for r in sorted(rows, key=lambda r: r["id"])]
        assert Counter(writers) == {"a": 300, "b": 300}
        assert sum(x != y for x, y in zip(writers, writers[1:], strict=False)) >= 2, "the writers did not overlap"
        assert store.conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION
        assert len(store.devices()) == 1


def test_export_import_round_trip_and_a_phone_file(tmp_path, capsys):
    fp = _fp()
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    with Store(a) as store:
        store.ensure_device(fp)
        run = store.start_run(fp["device_id"], "test")
        store.add_measurements([_speed_row(fp, run_id=run, decode_tok_s=10.0 + i, peak_rss_mib=100.0,
                                           samples=[{"decode_tok_s": 10.0 + i}]) for i in range(3)])
        store.finish_run(run, "complete")
    export = tmp_path / "export.json"
    assert cli(["bench", "export", "--db", str(a), "-o", str(export)]) == 0
    assert cli(["bench", "import", str(export), "--db", str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"devices": 1, "runs": 1, "measurements": 3, "skipped": 0}
    assert cli(["bench", "import", str(export), "--db", str(b), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 3
    with Store(a) as sa, Store(b) as sb:
        strip = lambda rows: [{k: v for k, v in r.items() if k != "id"} for r in rows]  # noqa: E731
        assert strip(sa.measurements()) == strip(sb.measurements())

    # A file recorded elsewhere, as an app would write it: its own device, no run.
    phone = {"format": "ondevice-bench-results", "version": 1,
             "devices": [{"device_id": "pixel8-test", "label": "Pixel 8 (Tensor G3)",
                          "hardware": {"cpu_model": "Tensor G3", "arch": "aarch64", "cores_physical": 9,
                                       "cores_logical": 9, "simd": ["asimd", "asimddp"], "ram_gib": 8}}],
             "measurements": [_speed_row({"device_id": "pixel8-test"}, uid="p1", recorded_at="2025-01-01T00:00:00Z",
                                         decode_tok_s=31.0, prefill_tok_s=120.0, peak_rss_mib=150.0)]}
    bad = {**phone, "measurements": [{**phone["measurements"][0], "uid": "p2", "model": None}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert cli(["bench", "import", str(tmp_path / "bad.json"), "--db", str(b)]) == 1  # rejected as a whole
    (tmp_path / "phone.json").write_text(json.dumps(phone))
    assert cli(["bench", "import", str(tmp_path / "phone.json"), "--db", str(b)]) == 0
    with Store(b) as store:
        assert len(store.devices()) == 2 and len(store.measurements()) == 4
        assert store.measurements(device="Pixel")[0]["decode_tok_s"] == 31.0
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert cli(["bench", "report", "--db", str(b), "-o", str(out)]) == 0
    assert (out / "devices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # devices side by side
    assert "Pixel 8 (Tensor G3)" in (out / "report.md").read_text()


# ---------------------------------------------------------------------- fingerprint and backends
def test_fingerprint_is_stable_and_hashes_hardware_only():
    fp = _fp()
    assert fp["device_id"] == device_id(hardware_facts()) == _fp()["device_id"]
    assert fp["hardware"]["cores_logical"] >= fp["hardware"]["cores_physical"] >= 1
    assert fp["hardware"]["ram_gib"] and fp["hardware"]["cpu_model"]
    assert device_id({**fp["hardware"], "ram_gib": fp["hardware"]["ram_gib"] + 1}) != fp["device_id"]
    assert set(fp["software"]["backends"]) == set(BACKEND_MODULES)


def test_backend_registry_contract():
    for name in BACKEND_MODULES:
        cls = backend_class(name)
        assert cls.name == name and issubclass(cls, Backend)
        assert cls.artifact_kinds and set(cls.artifact_kinds) <= set(ARTIFACT_KINDS)
        assert isinstance(cls.returns_logits, bool)
    assert "null" not in default_backends() and {"ondevice", "llama.cpp"} <= set(default_backends())
    with pytest.raises(OndeviceError, match="unknown backend"):
        backend_class("nope")


class AbsentBackend(Backend):
    """A runtime whose library is not installed (a real import check against a module that does not exist)."""

    name = "absent"
    artifact_kinds = frozenset({GGUF})
    module = "ondevice_test_runtime_that_is_not_installed"
    install_hint = "pip install nothing"

    def load(self, artifact, *, threads, n_ctx, logits=False):
        raise AssertionError("an unavailable backend is never loaded")

    def tokenize(self, text):
        raise AssertionError

    def detokenize(self, ids):
        raise AssertionError

    @property
    def vocab_size(self):
        raise AssertionError

    def generate(self, prompt, n_gen, clock):
        raise AssertionError


BACKEND = AbsentBackend  # what the registry imports from this module


# ---------------------------------------------------------------------- prompts, worker, runner
@pytest.mark.parametrize("backend", RUNTIMES)
def test_exact_prompt_lengths(smollm2, backend):
    engine = backend_class(backend)()
    engine.import_runtime()
    engine.load(smollm2, threads=1, n_ctx=64)
    try:
        for n in (1, 2, 17, 128, 2100):  # 2100 is longer than the bundled text: it is repeated
            prompt = exact_prompt(engine, n)
            assert len(prompt.ids) == n and engine.tokenize(prompt.text) == prompt.ids
    finally:
        engine.close()


def _mystery_gguf(path: Path) -> Path:
    """A well-formed GGUF of an architecture no runtime knows: the parent can describe it, backends must fail."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "mystery")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.mystery.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_failing_and_missing_backends_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKEND_MODULES, "absent", __name__)
    artifact = describe_artifact(_mystery_gguf(tmp_path / "mystery.gguf"))
    jobs, notes = plan_jobs([artifact], [*RUNTIMES, "absent", "null"], threads=[1], prompts=[8], gen_tokens=4,
                            repeat=1, warmup=0)
    recorded: list[dict] = []
    outcome = run_jobs(jobs, record=recorded.append, environment={}, progress=False)
    assert not outcome.interrupted and recorded == outcome.rows
    by_backend = {r["backend"]: r for r in recorded}
    for name in RUNTIMES:
        assert by_backend[name]["status"] == "error" and by_backend[name]["error"].startswith("load: ")
        assert "\n" not in by_backend[name]["error"]
    assert by_backend["absent"]["status"] == "unavailable"
    assert "not installed" in by_backend["absent"]["error"]
    assert by_backend["null"]["status"] == "ok"  # after the failures, the run went on


def test_bench_cli_end_to_end_then_report_and_fit(tiny_gguf, tmp_path, capsys):
    db = tmp_path / "bench.sqlite"
    capsys.readouterr()
    assert cli(["bench", tiny_gguf.as_posix(), "--backend", ",".join(["null", *RUNTIMES]), "--prompt", "16",
                "--gen", "8", "--repeat", "2", "--warmup", "1", "--threads", "1", "--db", str(db), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["backend"]: r for r in result["measurements"]}
    assert set(rows) == {"null", *RUNTIMES}
    for r in rows.values():
        assert r["status"] == "ok", r["error"]
        assert r["prompt_tokens"] == 16 and r["gen_tokens"] == 8 and r["repeats"] == 2 and len(r["samples"]) == 2
        assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["prefill_tok_s_min"] <= r["prefill_tok_s"] <= r["prefill_tok_s_max"]
        assert r["peak_rss_mib"] >= r["baseline_rss_mib"] > 0 and r["load_s"] >= 0
        assert r["artifact_size_bytes"] == tiny_gguf.stat().st_size and r["quant"] == "f32"
    for name in RUNTIMES:  # a model was loaded: the process grew
        assert rows[name]["rss_growth_mib"] > 0 and rows[name]["load_s"] > 0
    with Store(db) as store:
        [run] = store.conn.execute("SELECT status FROM runs").fetchall()
        assert run[0] == "complete" and len(store.measurements()) == len(rows)

    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert cli(["bench", "report", "--db", str(db), "-o", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| model | quant | backend |" in text and "Harness overhead" in text
    for chart in ("speed.png", "rss_vs_speed.png"):
        data = (out / chart).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000 and f"]({chart})" in text
    for fmt in ("html", "csv", "json"):
        assert cli(["bench", "report", "--db", str(db), "--format", fmt, "--no-charts"]) == 0
    csv_text = capsys.readouterr().out
    assert csv_text.count("\n") > len(rows)

    if RUNTIMES:
        capsys.readouterr()
        assert cli(["fit", tiny_gguf.as_posix(), "--device", "pixel-8", "--db", str(db), "--json"]) == 0
        est = json.loads(capsys.readouterr().out)
        assert est["estimate"] is True and est["fits"] is True
        assert {b["backend"] for b in est["backends"]} == set(RUNTIMES)
        for b in est["backends"]:
            assert b["calibrated"] and b["tok_s"] > 0 and b["ram_need_bytes"] > tiny_gguf.stat().st_size


def test_ctrl_c_keeps_what_was_measured(tiny_gguf, tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("watches the worker's CPU time through /proc")
    db = tmp_path / "int.sqlite"
    # The null backend with huge generations: each repeat takes a fraction of a second, the run would take hours.
    cmd = [sys.executable, "-m", "ondevice", "bench", str(tiny_gguf), "--backend", "null", "--prompt", "8",
           "--gen", "400000", "--repeat", "100000", "--warmup", "0", "--db", str(db), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_worker_cpu(proc, 2.0)  # seconds of worker CPU: imports take a fraction of one
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, err = proc.communicate(timeout=60)
    finally:  # a failed run must not leave the bench or its worker running
        _kill_group(proc)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    with Store(db) as store:
        [row] = store.measurements()
        assert row["status"] == "interrupted" and row["repeats"] >= 1 and row["decode_tok_s"] > 0
        assert store.conn.execute("SELECT status FROM runs").fetchone()[0] == "interrupted"


def test_a_killed_bench_takes_its_worker_with_it(tiny_gguf, tmp_path):
    """SIGKILL of `ondevice bench` (no chance to clean up): the worker dies too instead of running on (Linux's
    parent-death signal, set by the worker for the pid it was started by)."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("watches the worker through /proc")
    # One repeat that takes minutes: the worker writes nothing meanwhile, so no broken pipe would stop it.
    cmd = [sys.executable, "-m", "ondevice", "bench", str(tiny_gguf), "--backend", "null", "--prompt", "8",
           "--gen", "400000000", "--repeat", "1", "--warmup", "0", "--db", str(tmp_path / "k.sqlite"),
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        _wait_for_worker_cpu(proc, 0.5)
        workers = list(_workers(proc.pid))
        assert workers
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
            assert time.monotonic() < deadline, "the worker outlived its killed parent"
            time.sleep(0.1)
    finally:
        _kill_group(proc)


def _wait_for_worker_cpu(proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + 120
    while _worker_cpu_seconds(proc.pid) < seconds:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _workers(parent: int):
    """Pids of the bench workers whose parent is `parent`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent and b"ondevice.bench.worker" in cmdline:
            yield int(entry.name)


def _worker_cpu_seconds(parent: int) -> float:
    total = 0.0
    for pid in _workers(parent):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def test_harness_overhead_is_under_one_percent_of_a_128_token_decode(smollm2, tmp_path):
    """Timing an empty backend for 128 tokens costs < 1% of what decoding 128 tokens of SmolLM2 takes."""
    if not RUNTIMES:
        pytest.skip("no real runtime to compare with")
    artifact = describe_artifact(smollm2)
    null = run_worker(Job("null", artifact, Settings(1, 16, 128, 5, 0)))
    # The median of the repeats, as the harness reports it (a preempted repeat on a busy machine is an outlier).
    null_decode_s = float(np.median([e["decode_s"] for e in null.events if e["event"] == "repeat"]))
    real = run_worker(Job(RUNTIMES[0], artifact, Settings(2, 16, 16, 1, 0)))
    [repeat] = [e for e in real.events if e["event"] == "repeat"]
    real_decode_128_s = repeat["decode_s"] / 15 * 127  # 15 measured intervals -> 127
    share = null_decode_s / real_decode_128_s
    print(f"harness: {null_decode_s * 1e6:.0f} us per 128 tokens = {share:.5%} of a {RUNTIMES[0]} decode "
          f"({real_decode_128_s:.2f} s)")
    assert share < 0.01


# ---------------------------------------------------------------------- fit
def test_bundled_profiles_are_complete_and_sourced():
    profiles = fitmod.load_profiles()
    for name in ("iphone-15-pro", "pixel-8", "galaxy-s24", "macbook-air-m2", "macbook-pro-m3-pro", "raspberry-pi-5",
                 "cloud-x86-2vcpu"):
        p = profiles[name]
        assert p.ram_gb > 0 and p.memory_bandwidth_gbs > 0 and p.data.get("bandwidth_basis")
        assert p.data["sources"] and all(s.get("fact") for s in p.data["sources"])
    assert fitmod.find_profile(profiles, "iphone").name == "iphone-15-pro"
    with pytest.raises(OndeviceError, match="no device profile"):
        fitmod.find_profile(profiles, "nokia-3310")


def test_calibration_and_roofline_arithmetic(tmp_path):
    row = _speed_row(_fp(), decode_tok_s=50.0, weight_bytes_per_token=100_000_000, prompt_tokens=0, gen_tokens=0,
                     peak_rss_mib=200.0, artifact_size_bytes=100 * 2**20,
                     environment={"mem_read_gbs": 10.0}, settings={"kv_bytes_per_position": 0})
    slower = {**row, "threads": 2, "decode_tok_s": 40.0}  # the best thread count counts
    cal = fitmod.calibrate([row, slower], row["device_id"])["llama.cpp"]
    assert cal.efficiency == pytest.approx(0.5) and cal.overhead_mib == pytest.approx(100.0)
    profile = tmp_path / "dev.json"
    profile.write_text(json.dumps({"name": "my-board", "title": "My board", "ram_gb": 1, "usable_ram_fraction": 0.5,
                                   "memory_bandwidth_gbs": 40, "sustained_bandwidth_gbs": 20}))
    board = fitmod.load_profiles([profile])["my-board"]
    est = fitmod.estimate(_artifact(100_000_000, 150_000_000), board, {"llama.cpp": cal}, ctx=1000,
                          prompt_tokens=0, gen_tokens=0)
    [b] = est.per_backend
    assert b["tok_s"] == pytest.approx(0.5 * 20e9 / 100e6)  # 100 tok/s
    assert est.ceiling_tok_s == pytest.approx(40e9 / 100e6)
    assert b["ram_need_bytes"] == pytest.approx(150e6 + 100 * 2**20)
    assert est.fits is True  # 255 MB of 500 MB usable
    assert "ESTIMATE" in fitmod.render_text(est)


def test_fit_accounts_for_slots(tmp_path):
    """--slots N: N KV caches in the RAM need; each decode step reads the weights once and every slot's cache."""
    profile = tmp_path / "dev.json"
    profile.write_text(json.dumps({"name": "b", "title": "B", "ram_gb": 1, "usable_ram_fraction": 0.5,
                                   "memory_bandwidth_gbs": 40, "sustained_bandwidth_gbs": 20}))
    board = fitmod.load_profiles([profile])["b"]
    cal = fitmod.Calibration("llama.cpp", 0.5, 0.0, 1, True)
    from ondevice.bench.artifacts import ModelShape

    artifact = dataclasses.replace(_artifact(100_000_000, 150_000_000),
                                   shape=ModelShape(135_000_000, 30, 3, 64, 576, 49152, 8192))
    kv = artifact.shape.kv_bytes_per_position(2)
    assert kv > 0
    one, four = (fitmod.estimate(artifact, board, {"llama.cpp": cal}, ctx=1000, prompt_tokens=100, gen_tokens=0,
                                 slots=n).per_backend[0] for n in (1, 4))
    assert four["kv_cache_bytes"] == 4 * one["kv_cache_bytes"] == 4 * kv * 1000
    assert four["ram_need_bytes"] - one["ram_need_bytes"] == pytest.approx(3 * kv * 1000)
    assert four["tok_s"] == pytest.approx(0.5 * 20e9 / (100e6 + 4 * kv * 100))
    assert four["aggregate_tok_s"] == pytest.approx(4 * four["tok_s"]) and four["aggregate_tok_s"] > one["tok_s"]
    # a bench row that says it decoded 4 slots is calibrated with 4 caches read per step
    row = _speed_row(_fp(), decode_tok_s=50.0, weight_bytes_per_token=100_000_000, prompt_tokens=100, gen_tokens=0,
                     peak_rss_mib=200.0, artifact_size_bytes=100 * 2**20, environment={"mem_read_gbs": 10.0},
                     settings={"kv_bytes_per_position": 1000, "slots": 4})
    got = fitmod.calibrate([row], row["device_id"])["llama.cpp"].efficiency
    assert got == pytest.approx(50.0 * (100e6 + 1000 * 100 * 4) / 10e9)


def test_fit_and_bench_take_ondevice_kv_bytes_from_the_runtime(smollm2, tmp_path, capsys):
    """The runtime's default cache is f16: SmolLM2 keeps 2 x 30 layers x 3 KV heads x 64 x 2 bytes = 23,040 bytes
    per position (not f32's 46,080), and `fit` with no bench data shows ondevice's own line with that figure."""
    import ondevice

    with ondevice.load(smollm2, n_ctx=64) as model:
        per_position = model.kv_bytes_per_position
    with ondevice.load(smollm2, n_ctx=64, kv_cache="f32") as model:
        assert model.kv_bytes_per_position == 2 * per_position
    assert per_position == 23_040
    shape = describe_artifact(smollm2).shape
    # What a bench row records in settings.kv_bytes_per_position (runner.py) for the ondevice backend.
    assert shape.kv_bytes_per_position(backend_class("ondevice").kv_bytes_per_element) == per_position
    assert cli(["fit", str(smollm2), "--device", "iphone-15-pro", "--db", str(tmp_path / "none.db"), "--json"]) == 0
    rows = {b["backend"]: b for b in json.loads(capsys.readouterr().out)["backends"]}
    assert list(rows)[0] == "ondevice" and not rows["ondevice"]["calibrated"]
    assert rows["ondevice"]["kv_bytes_per_position"] == per_position
    assert rows["ondevice"]["kv_cache_bytes"] == per_position * 2048
    assert cli(["fit", str(smollm2), "--device", "iphone-15-pro", "--db", str(tmp_path / "none.db")]) == 0
    assert any(line.strip().startswith("ondevice ") for line in capsys.readouterr().out.splitlines())
    assert not (tmp_path / "none.db").exists()


def _artifact(weights: int, size: int):
    from ondevice.bench.artifacts import Artifact

    return Artifact(path=Path("x.gguf"), kind=GGUF, model="m", quant="q8_0", size_bytes=size,
                    weight_bytes_per_token=weights, shape=None)


def test_bad_profile_files_are_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "title": "X", "ram_gb": 4}))
    with pytest.raises(OndeviceError, match="memory_bandwidth_gbs"):
        fitmod.load_profiles([bad])
    bad.write_text("{not json")
    with pytest.raises(OndeviceError, match="JSON"):
        fitmod.load_profiles([bad])


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    assert cli(["bench"]) == 2  # no MODEL: the help, not a traceback
    assert cli(["bench", "report", "--db", str(tmp_path / "empty.sqlite")]) == 1
    assert "no measurements" in capsys.readouterr().err
    assert cli(["bench", str(tmp_path / "missing.gguf"), "--db", str(tmp_path / "x.sqlite")]) == 1
    assert cli(["fit", "--list"]) == 0 and "raspberry-pi-5" in capsys.readouterr().out
    assert cli(["fit", "smollm2-135m-instruct", "--device", "nokia"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no device profile" in err
