"""Bad --db files and bad imports: one-line errors through the CLI, and the files are never modified."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from ondevice.bench.store import Store
from ondevice.cli import main


def _sqlite_file(path: Path, statements: list[str]) -> Path:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path


def _store_file(path: Path) -> Path:
    with Store(path) as store:
        device = store.ensure_device({"device_id": "dev1", "label": "box", "hardware": {"cpu": "x"}})
        store.add_measurement({"device_id": device, "kind": "speed", "status": "ok", "backend": "ondevice",
                               "model": "m"})
    return path


def _truncated(path: Path) -> Path:
    _sqlite_file(path, ["CREATE TABLE t (x TEXT)"] + [f"INSERT INTO t VALUES ('{'y' * 3000}')" for _ in range(20)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_json_row(path: Path) -> Path:
    _store_file(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE measurements SET settings = '{not json'")
    conn.commit()
    conn.close()
    return path


BAD_DBS = {
    "random bytes": lambda p: (p.write_bytes(os.urandom(4096)), p)[1],
    "text file": lambda p: (p.write_text("hello, this is not a database\n"), p)[1],
    "truncated sqlite": _truncated,
    "another program's sqlite": lambda p: _sqlite_file(p, ["CREATE TABLE moz_places (url TEXT)"]),
    "a directory": lambda p: (p.mkdir(), p)[1],
}


def _snapshot(path: Path) -> tuple[bytes | None, int]:
    return (None if path.is_dir() else path.read_bytes()), path.stat().st_mtime_ns


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("kind", list(BAD_DBS))
@pytest.mark.parametrize("command", [["report"], ["export"]])
def test_bad_db_is_a_one_line_error_and_untouched(kind, command, tmp_path, capsys):
    db = BAD_DBS[kind](tmp_path / "results.sqlite")
    before = _snapshot(db)
    code, err = _run(["bench", *command, "--db", str(db)], capsys)
    assert code != 0 and "internal error" not in err and "Traceback" not in err
    assert "is not an ondevice results store" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.sqlite"]  # no -wal/-shm left beside it


def test_bad_json_in_a_row(tmp_path, capsys):
    db = _bad_json_row(tmp_path / "results.sqlite")
    code, err = _run(["bench", "export", "--db", str(db)], capsys)
    assert code != 0 and "internal error" not in err
    assert "not an ondevice results store" in err and "invalid JSON" in err, err


GOOD = {"format": "ondevice-bench-results", "version": 1, "devices": [{"device_id": "d", "label": "x"}],
        "runs": [], "measurements": [{"uid": "u1", "device_id": "d", "kind": "speed", "status": "ok",
                                      "backend": "b", "model": "m", "recorded_at": "2026-01-01"}]}

BAD_IMPORTS = {
    "invalid json": "{not json",
    "a list": "[]",
    "devices not a list": {**GOOD, "devices": {"d": 1}},
    "device not an object": {**GOOD, "devices": [1]},
    "device id a number": {**GOOD, "devices": [{"device_id": 7}]},
    "run without started_at": {**GOOD, "runs": [{"run_id": "r", "device_id": "d"}]},
    "measurement value a list": {**GOOD, "measurements": [{**GOOD["measurements"][0], "model": ["m"]}]},
    "version a string": {**GOOD, "version": "x"},
    "huge int": {**GOOD, "measurements": [{**GOOD["measurements"][0], "prompt_tokens": 10 ** 30}]},
}


@pytest.mark.parametrize("kind", list(BAD_IMPORTS))
def test_bad_import_is_a_one_line_error_and_imports_nothing(kind, tmp_path, capsys):
    from ondevice.bench.store import EXPORT_FORMAT

    db = _store_file(tmp_path / "results.sqlite")
    payload = BAD_IMPORTS[kind]
    if isinstance(payload, dict):
        payload = json.dumps({**payload, "format": EXPORT_FORMAT})
    source = tmp_path / "in.json"
    source.write_text(payload)
    with Store(db) as store:
        before = store.export_json()["measurements"]
    code, err = _run(["bench", "import", str(source), "--db", str(db)], capsys)
    assert code != 0 and "internal error" not in err and len(err.strip().splitlines()) == 1, err
    with Store(db) as store:
        assert store.export_json()["measurements"] == before


def test_good_import_still_works(tmp_path, capsys):
    from ondevice.bench.store import EXPORT_FORMAT

    source = tmp_path / "in.json"
    source.write_text(json.dumps({**GOOD, "format": EXPORT_FORMAT}))
    assert main(["bench", "import", str(source), "--db", str(tmp_path / "r.sqlite")]) == 0
