"""`ondevice sweep` on a real multi-node Ray cluster inside this machine (ray.cluster_utils.Cluster): a head node
without devices and a node tagged `device:tiny-dev`. Tiny GGUF sources, real backends (ondevice's runtime and
llama.cpp), a few tokens per measurement: the whole file takes well under a minute or two on 2 cores."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ondevice.bench.backends import backend_class
from ondevice.bench.store import Store
from ondevice.cli import main as cli

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

GIB = 2**30
DEVICE = "tiny-dev"
NODE = {"num_cpus": 1, "memory": 3 * GIB, "object_store_memory": 80 * 2**20}
BACKENDS = [name for name in ("ondevice", "llama.cpp") if backend_class(name).unavailable_reason() is None]
# The columns that must not depend on where or how the job ran (timings aside).
SAME = ("kind", "status", "backend", "model", "quant", "artifact_kind", "artifact_size_bytes", "threads",
        "prompt_tokens", "gen_tokens", "repeats", "device_id", "eval_tokens")


@pytest.fixture(scope="module")
def sources(tiny_models, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("sweep-src")
    out = []
    for name in ("llama", "qwen2"):
        path = root / f"{name}-f32.gguf"
        assert cli(["convert", str(tiny_models[name]), "--to", "gguf", "--quant", "f32", "-o", str(path),
                    "--no-progress", "--pre", "gpt-2"]) == 0
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def cluster():
    """Head (no device) + one device node; always shut down, whatever the tests did."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        c.add_node(**NODE, resources={f"device:{DEVICE}": 1})
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _sweep(sources: list[str], db: Path, out: Path, *extra: str) -> list[str]:
    if len(BACKENDS) < 2:
        pytest.skip("needs ondevice's runtime and llama-cpp-python")
    return [*sources, "--to", "gguf", "--quant", "q8_0,f16", "--backend", ",".join(BACKENDS), "--bench", "--eval",
            "--devices", DEVICE, "--prompt", "16", "--gen", "8", "--repeat", "2", "--warmup", "0", "--threads", "1",
            "--ctx", "32", "--max-tokens", "64", "--db", str(db), "-o", str(out), "--json", *extra]


def _rows(db: Path) -> dict[str, dict]:
    with Store(db) as store:
        rows = store.measurements()
    by_key = {r["settings"]["sweep"]["key"]: r for r in rows}
    assert len(by_key) == len(rows), "one row per job"
    return by_key


def _run(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    code = cli(["sweep", *args])
    data = json.loads(capsys.readouterr().out)
    assert code == 0, data
    return data


def test_cluster_sweep_equals_a_serial_run_and_a_rerun_skips_everything(sources, cluster, tmp_path, capsys):
    serial_db, ray_db = tmp_path / "serial.sqlite", tmp_path / "ray.sqlite"
    serial = _run(capsys, _sweep(sources, serial_db, tmp_path / "serial-art"))
    assert len(serial["results"]) == 16  # 2 models x 2 schemes x 2 backends, each evaluated and benchmarked
    on_ray = _run(capsys, _sweep(sources, ray_db, tmp_path / "ray-art", "--ray", cluster.address))
    assert len(on_ray["results"]) == 16 and not on_ray["convert_errors"]

    a, b = _rows(serial_db), _rows(ray_db)
    assert set(a) == set(b)
    for key, row in a.items():
        other = b[key]
        assert row["status"] == "ok", row["error"]
        assert {c: row[c] for c in SAME} == {c: other[c] for c in SAME}
        assert row["settings"]["sweep"] == {**other["settings"]["sweep"]}  # same artifact bytes (content hash)
        if row["kind"] == "quality":
            assert other["perplexity"] == pytest.approx(row["perplexity"], rel=1e-3)
            assert other["top1_agreement"] == pytest.approx(row["top1_agreement"], abs=0.05)
        else:
            assert row["settings"]["sweep"]["device"] == DEVICE and other["decode_tok_s"] > 0
    with Store(ray_db) as store:
        [device] = store.devices()  # every node is this machine: one fingerprint, on every row
        assert {r["device_id"] for r in store.measurements()} == {device["device_id"]}

    again = _run(capsys, _sweep(sources, ray_db, tmp_path / "ray-art", "--ray", cluster.address))
    assert again["results"] == [] and again["skipped"] == 16
    assert len(_rows(ray_db)) == 16


def test_devices_lists_what_the_cluster_offers_and_an_absent_device_is_refused(cluster, sources, tmp_path, capsys):
    assert _run(capsys, ["--devices", "--ray", cluster.address, "--json"])["devices"] == {DEVICE: 1}
    capsys.readouterr()
    args = _sweep(sources, tmp_path / "x.sqlite", tmp_path / "art", "--ray", cluster.address)
    args[args.index(DEVICE)] = "pixel-8"
    assert cli(["sweep", *args]) == 1
    err = capsys.readouterr().err
    assert "no node offers device(s) pixel-8" in err and f"the cluster has: {DEVICE}" in err
    assert not (tmp_path / "art").exists()


def test_a_node_removed_mid_sweep_loses_no_result(sources, cluster, tmp_path, capsys):
    """Once speed results arrive from the only device node (so it is busy with the next bench job), a second
    device node joins and the first is killed. Its jobs are retried on the other (or recorded as errors): every
    job of the sweep has its row, and a re-run completes what failed."""
    doomed = cluster.list_all_nodes()[1]
    db = tmp_path / "sweep.sqlite"
    args = _sweep(sources, db, tmp_path / "art", "--ray", cluster.address, "--repeat", "4")
    codes: list[int] = []
    # The sweep runs in a thread: Ray adds nodes only from the main thread (it installs signal handlers).
    sweeping = threading.Thread(target=lambda: codes.append(cli(["sweep", *args])), daemon=True)
    capsys.readouterr()
    sweeping.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sweeping.is_alive():
        if db.exists():
            with Store(db) as store:
                if store.measurements(kind="speed"):
                    break
        time.sleep(0.1)
    assert sweeping.is_alive(), "the sweep ended before the node could be removed"
    cluster.add_node(**NODE, resources={f"device:{DEVICE}": 1})
    cluster.remove_node(doomed, allow_graceful=False)
    sweeping.join(timeout=150)
    assert not sweeping.is_alive() and codes
    rows = _rows(db)
    assert len(rows) == 16  # none lost: each an ok row or an error row naming why
    assert all(r["status"] == "ok" or r["error"] for r in rows.values())
    again = _run(capsys, args)
    with Store(db) as store:
        ok = {r["settings"]["sweep"]["key"] for r in store.measurements(status="ok")}
    assert ok == set(rows) and again["skipped"] + len(again["results"]) == 16


def test_ctrl_c_on_the_driver_keeps_finished_results(sources, tmp_path):
    """`--ray local` in its own process, interrupted once results arrive: exit 130, the finished rows stay, the
    run is marked interrupted, and a re-run does only what is missing."""
    import os
    import signal
    import subprocess
    import sys

    db = tmp_path / "sweep.sqlite"
    args = [a for a in _sweep(sources, db, tmp_path / "art", "--ray", "local", "--num-cpus", "1", "--repeat", "4")
            if a != "--json"]
    args[args.index(DEVICE)] = "local"
    proc = subprocess.Popen([sys.executable, "-m", "ondevice", "sweep", *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with Store(db) as store:
                    if store.measurements(kind="speed"):
                        break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; the results above were kept" in err
    kept = _rows(db)
    assert 0 < len(kept) < 16 and all(r["status"] == "ok" for r in kept.values())
    with Store(db) as store:
        assert [r[0] for r in store.conn.execute("SELECT status FROM runs")] == ["interrupted"]


def test_ray_local_converts_here_while_ray_starts_and_gives_the_serial_rows(sources, tmp_path):
    """`--ray local`: while Ray starts (seconds), the driver runs the conversions itself (tiny ones take
    milliseconds, so the first results arrive before Ray is up); eval and bench jobs then go to Ray. The rows are
    the serial run's, including a source whose conversion fails (its jobs become error rows, none is lost)."""
    from ondevice.bench import sweep
    from ondevice.bench.runner import Settings

    if len(BACKENDS) < 2:
        pytest.skip("needs ondevice's runtime and llama-cpp-python")
    broken = tmp_path / "broken-f32.gguf"
    broken.write_bytes(Path(sources[0]).read_bytes()[:4096])  # a valid header, its tensors cut off

    def plan(out: Path) -> list[sweep.SweepJob]:
        return sweep.plan_sweep([*sources, str(broken)], targets=["gguf"], quants=["q8_0", "f16"], backends=BACKENDS,
                                devices=[sweep.LOCAL_DEVICE], artifact_dir=out, settings=Settings(1, 16, 8, 2, 0),
                                eval_setup={"ctx": 32, "max_tokens": 64, "threads": 1}, done_keys=set()).jobs

    if ray.is_initialized():
        ray.shutdown()
    serial = sweep.run_serial(plan(tmp_path / "serial"), lambda done: None)
    arrivals: list[tuple[str, bool]] = []  # (job kind, was Ray up when its result was recorded)
    local = sweep.LocalRay([sweep.LOCAL_DEVICE], 2)
    try:
        on_ray = sweep.run_ray(plan(tmp_path / "local"), lambda done: arrivals.append((done.job.kind, local.ready)),
                               local=local)
    finally:
        local.stop()
    assert not ray.is_initialized()
    assert not serial.interrupted and not on_ray.interrupted
    assert arrivals[0] == ("convert", False), "the driver converts while Ray starts"
    assert all(up for kind, up in arrivals if kind != "convert") and any(kind == "bench" for kind, _ in arrivals)

    def rows(outcome: sweep.SweepOutcome) -> dict[str, tuple]:
        return {d.job.key: (d.row["status"], d.row["kind"], d.row.get("artifact_size_bytes"), d.row.get("perplexity"),
                            (d.row.get("error") or "").split(":")[0]) for d in outcome.finished if d.row is not None}

    a, b = rows(serial), rows(on_ray)
    assert a.keys() == b.keys() and len(a) == 24  # 3 sources x 2 schemes x 2 backends x (eval + bench)
    for key, row in a.items():
        assert row[:3] == b[key][:3] and row[4] == b[key][4]
        assert row[3] == b[key][3] or row[3] == pytest.approx(b[key][3], rel=1e-3)
    assert sum(r[0] == "error" for r in b.values()) == 8  # the broken source's jobs, each with its reason
