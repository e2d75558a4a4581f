"""The results store: one SQLite file (default under the user data dir; `--db PATH` overrides).

- Versioned schema: MIGRATIONS are applied in order, each recorded in `schema_migrations`, inside one
  write transaction, so two processes opening an old file at once migrate it once.
- WAL journal + busy_timeout: concurrent writers wait for each other instead of failing, readers never block.
- Every write is one transaction (BEGIN IMMEDIATE ... COMMIT): a run killed at any instant leaves every row
  either fully there or not there at all.
- Export/import as JSON (EXPORT_FORMAT) to merge results measured elsewhere, e.g. by an app on a phone.

The exchange file, as an app writes it (every measurement column of the schema is accepted; these are needed):

    {"format": "ondevice-bench-results", "version": 1,
     "devices": [{"device_id": "any-stable-id", "label": "Pixel 8 (Tensor G3)",
                  "hardware": {"cpu_model": ..., "arch": ..., "cores_physical": ..., "ram_gib": ...}}],
     "measurements": [{"uid": "unique-per-measurement", "device_id": "any-stable-id", "kind": "speed",
                       "status": "ok", "backend": "llama.cpp", "model": "smollm2-135m-instruct", "quant": "q4_0",
                       "recorded_at": "2025-01-01T12:00:00+00:00", "threads": 4, "prompt_tokens": 128,
                       "gen_tokens": 128, "decode_tok_s": 31.0, "prefill_tok_s": 120.0, "peak_rss_mib": 150.0}]}
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ondevice.errors import OndeviceError

EXPORT_FORMAT = "ondevice-bench-results"
EXPORT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "devices, runs and speed measurements", """
        CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            label TEXT NOT NULL,
            hardware TEXT NOT NULL,          -- JSON: the hashed hardware facts
            first_seen TEXT NOT NULL
        );
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            device_id TEXT NOT NULL REFERENCES devices (device_id),
            started_at TEXT NOT NULL,
            finished_at TEXT,
            status TEXT NOT NULL,            -- running | complete | interrupted | failed
            command TEXT
        );
        CREATE TABLE measurements (
            id INTEGER PRIMARY KEY,
            uid TEXT NOT NULL UNIQUE,        -- stable across export/import: merging twice adds nothing
            run_id TEXT REFERENCES runs (run_id),
            device_id TEXT NOT NULL REFERENCES devices (device_id),
            recorded_at TEXT NOT NULL,
            kind TEXT NOT NULL,              -- speed | quality
            status TEXT NOT NULL,            -- ok | error | unavailable | interrupted
            error TEXT,
            backend TEXT NOT NULL,
            backend_version TEXT,
            model TEXT NOT NULL,
            quant TEXT,
            artifact TEXT,
            artifact_kind TEXT,
            artifact_size_bytes INTEGER,
            weight_bytes_per_token INTEGER,
            threads INTEGER,
            prompt_tokens INTEGER,
            gen_tokens INTEGER,
            repeats INTEGER,                 -- repeats measured (warmups excluded)
            load_s REAL,
            ttft_ms REAL, ttft_ms_min REAL, ttft_ms_max REAL,
            prefill_tok_s REAL, prefill_tok_s_min REAL, prefill_tok_s_max REAL,
            decode_tok_s REAL, decode_tok_s_min REAL, decode_tok_s_max REAL,
            peak_rss_mib REAL,
            baseline_rss_mib REAL,
            rss_growth_mib REAL,
            settings TEXT NOT NULL,          -- JSON: the exact settings of the measurement
            environment TEXT NOT NULL,       -- JSON: OS, Python, library versions, measured memory bandwidth
            samples TEXT                     -- JSON: per-repeat timings
        );
    """),
    (2, "quality columns (ondevice eval) and a lookup index", """
        ALTER TABLE measurements ADD COLUMN reference TEXT;
        ALTER TABLE measurements ADD COLUMN eval_tokens INTEGER;
        ALTER TABLE measurements ADD COLUMN perplexity REAL;
        ALTER TABLE measurements ADD COLUMN ref_perplexity REAL;
        ALTER TABLE measurements ADD COLUMN kl_mean REAL;
        ALTER TABLE measurements ADD COLUMN kl_max REAL;
        ALTER TABLE measurements ADD COLUMN top1_agreement REAL;
        CREATE INDEX measurements_lookup ON measurements (device_id, model, quant, backend);
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
JSON_COLUMNS = ("settings", "environment", "samples")


def default_db_path() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("ondevice")) / "bench.sqlite"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


_SCALAR = (str, int, float, bool, type(None))
_IMPORT_KEYS = {"devices": ("device_id",), "runs": ("run_id", "device_id", "started_at"), "measurements": ()}


def _check_import_shape(data: dict[str, Any]) -> None:
    """Every section a list of objects, keys of the right type, values SQLite can store: checked before any write."""
    def bad(why: str) -> OndeviceError:
        return OndeviceError(f"not a valid ondevice results file: {why}; nothing was imported")

    if not isinstance(data.get("version", 0), int) or isinstance(data.get("version", 0), bool):
        raise bad("\"version\" must be an integer")
    for section, keys in _IMPORT_KEYS.items():
        items = data.get(section, [])
        if not isinstance(items, list):
            raise bad(f"\"{section}\" must be a list")
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad(f"{section}[{index}] must be an object")
            for key in keys:
                if not isinstance(item.get(key), str) or not item[key]:
                    raise bad(f"{section}[{index}].{key} must be a non-empty string")
            for key, value in item.items():
                if key in JSON_COLUMNS or (section == "devices" and key == "hardware"):
                    continue  # stored as JSON text whatever its shape
                if not isinstance(value, _SCALAR):
                    raise bad(f"{section}[{index}].{key} must be a string or a number, not {type(value).__name__}")


class Store:
    def __init__(self, path: str | Path | None = None, *, target_version: int = SCHEMA_VERSION,
                 busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = self._check_header()
        try:
            # isolation_level=None: no implicit transactions; every write below opens its own explicitly.
            self.conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise OndeviceError(f"cannot open the results database {self.path}: {exc}") from None
        self.conn.row_factory = sqlite3.Row
        if existing:
            self._check_contents()  # before anything below writes to the file
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        self._enable_wal(busy_timeout_s)
        self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: committed data survives a killed process
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.migrate(target_version)

    def _not_a_store(self, why: str) -> OndeviceError:
        return OndeviceError(f"{self.path} is not an ondevice results store ({why}); pass another --db")

    def _check_header(self) -> bool:
        """True if the file exists with content; refuses what cannot be one of our SQLite files."""
        if self.path.is_dir():
            raise self._not_a_store("it is a directory")
        try:
            with open(self.path, "rb") as file:
                header = file.read(100)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise OndeviceError(f"cannot read the results database {self.path}: {exc.strerror}") from None
        if not header:
            return False
        if not header.startswith(SQLITE_MAGIC):
            raise self._not_a_store("not an SQLite database")
        return True

    def _check_contents(self) -> None:
        """Read-only checks of an existing file: intact, and ours (or empty of tables)."""
        try:
            tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            verdict = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise self._not_a_store(f"damaged or truncated SQLite file: {exc}") from None
        if verdict != "ok":
            self.conn.close()
            raise self._not_a_store(f"damaged or truncated SQLite file: {verdict}")
        if tables and "schema_migrations" not in tables:
            self.conn.close()
            raise self._not_a_store(f"an SQLite database of another program, tables {', '.join(sorted(tables)[:5])}")

    def _json_value(self, text: str, where: str) -> Any:
        try:
            return json.loads(text)
        except (ValueError, TypeError):
            raise self._not_a_store(f"{where} holds invalid JSON") from None

    def _enable_wal(self, timeout_s: float) -> None:
        # Switching the journal mode needs a moment with no other writer; busy_timeout does not cover it.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise OndeviceError(f"cannot open the results database {self.path}: {exc}") from None
                time.sleep(0.05)
        if str(mode).lower() != "wal":
            raise OndeviceError(f"{self.path}: the results database cannot use WAL mode (got {mode}); "
                                "put it on a local file system")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken up front so concurrent writers queue, never deadlock."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int:
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone()
        if not exists:
            return 0
        return int(self.conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])

    def migrate(self, target_version: int = SCHEMA_VERSION) -> None:
        if self.schema_version() >= target_version:
            if self.schema_version() > SCHEMA_VERSION:
                raise OndeviceError(f"{self.path} was written by a newer ondevice (schema "
                                    f"{self.schema_version()} > {SCHEMA_VERSION}); upgrade ondevice to read it")
            return
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                         "description TEXT NOT NULL, applied_at TEXT NOT NULL)")
            current = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0])
            for version, description, script in MIGRATIONS:
                if current < version <= target_version:  # re-checked under the lock: another process may have won
                    for statement in _statements(script):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, description, now_iso()))

    def columns(self) -> list[str]:
        return [row[1] for row in self.conn.execute("PRAGMA table_info(measurements)")]

    # ------------------------------------------------------------------ writes
    def ensure_device(self, fingerprint: dict[str, Any]) -> str:
        device = fingerprint["device_id"]
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO devices VALUES (?, ?, ?, ?)",
                         (device, fingerprint["label"], json.dumps(fingerprint["hardware"], sort_keys=True),
                          now_iso()))
        return device

    def start_run(self, device_id: str, command: str) -> str:
        run_id = uuid.uuid4().hex
        with self.transaction() as conn:
            conn.execute("INSERT INTO runs VALUES (?, ?, ?, NULL, 'running', ?)", (run_id, device_id, now_iso(), command))
        return run_id

    def finish_run(self, run_id: str, status: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", (status, now_iso(), run_id))

    def add_measurement(self, row: dict[str, Any]) -> str:
        """Insert one measurement (a dict of column values; JSON columns may be dicts). Returns its uid."""
        return self.add_measurements([row])[0]

    def add_measurements(self, rows: list[dict[str, Any]]) -> list[str]:
        """Insert measurements in one transaction: all of them or, if anything fails or the process dies, none."""
        columns = set(self.columns()) - {"id"}
        prepared = []
        for row in rows:
            data = {k: v for k, v in row.items() if k != "id"}
            data.setdefault("uid", uuid.uuid4().hex)
            data.setdefault("recorded_at", now_iso())
            for column in JSON_COLUMNS:
                if column in data and not isinstance(data[column], (str, type(None))):
                    data[column] = json.dumps(data[column], sort_keys=True)
            data.setdefault("settings", "{}")
            data.setdefault("environment", "{}")
            unknown = set(data) - columns
            if unknown:
                raise OndeviceError(f"unknown measurement fields: {', '.join(sorted(unknown))}")
            prepared.append(data)
        with self.transaction() as conn:
            for data in prepared:
                names = list(data)
                conn.execute(f"INSERT INTO measurements ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                             [data[n] for n in names])
        return [data["uid"] for data in prepared]

    # ------------------------------------------------------------------ reads
    def devices(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM devices ORDER BY first_seen").fetchall()
        return [{**dict(r), "hardware": self._json_value(r["hardware"], f"device {r['device_id']}'s hardware")}
                for r in rows]

    def measurements(self, *, kind: str | None = None, device: str | None = None, model: str | None = None,
                     status: str | None = None) -> list[dict[str, Any]]:
        """Measurements with their device label; `device` matches an id prefix or a label substring, `model` a
        model name substring (case-insensitive)."""
        sql = ("SELECT m.*, d.label AS device_label FROM measurements m JOIN devices d USING (device_id) "
               "WHERE 1 = 1")
        params: list[Any] = []
        if kind:
            sql += " AND m.kind = ?"
            params.append(kind)
        if status:
            sql += " AND m.status = ?"
            params.append(status)
        if device:
            sql += " AND (m.device_id LIKE ? OR d.label LIKE ?)"
            params += [f"{device}%", f"%{device}%"]
        if model:
            sql += " AND m.model LIKE ?"
            params.append(f"%{model}%")
        sql += " ORDER BY m.recorded_at, m.id"
        out = []
        for row in self.conn.execute(sql, params).fetchall():
            item = dict(row)
            for column in JSON_COLUMNS:
                if item.get(column):
                    item[column] = self._json_value(item[column], f"measurement {item['uid']}'s {column}")
            out.append(item)
        return out

    # ------------------------------------------------------------------ exchange
    def export_json(self) -> dict[str, Any]:
        measurements = self.measurements()
        for item in measurements:
            item.pop("id", None)
            item.pop("device_label", None)
        runs = [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY started_at")]
        return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "schema_version": self.schema_version(),
                "exported_at": now_iso(), "devices": self.devices(), "runs": runs, "measurements": measurements}

    def import_json(self, data: dict[str, Any]) -> dict[str, int]:
        """Merge an export (from here or elsewhere). Rows already present (same uid) are skipped. All or nothing."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise OndeviceError(f"not an ondevice results file (expected \"format\": \"{EXPORT_FORMAT}\")")
        _check_import_shape(data)
        if data.get("version", 0) > EXPORT_VERSION:
            raise OndeviceError(f"results file version {data.get('version')} is newer than this ondevice reads "
                                f"({EXPORT_VERSION}); upgrade ondevice")
        columns = set(self.columns()) - {"id"}
        required = ("uid", "device_id", "kind", "status", "backend", "model", "recorded_at")
        counts = {"devices": 0, "runs": 0, "measurements": 0, "skipped": 0}
        try:
            self._import_rows(data, columns, required, counts)
        except (sqlite3.Error, OverflowError) as exc:  # e.g. a value SQLite cannot bind; the transaction was rolled back
            raise OndeviceError(f"cannot import the results file: {exc}; nothing was imported") from None
        return counts

    def _import_rows(self, data: dict[str, Any], columns: set[str], required: tuple[str, ...],
                     counts: dict[str, int]) -> None:
        with self.transaction() as conn:
            for device in data.get("devices", []):
                hardware = device.get("hardware", {})
                cur = conn.execute("INSERT OR IGNORE INTO devices VALUES (?, ?, ?, ?)", (
                    device["device_id"], device.get("label") or device["device_id"],
                    json.dumps(hardware, sort_keys=True), device.get("first_seen") or now_iso()))
                counts["devices"] += cur.rowcount
            known_devices = {r[0] for r in conn.execute("SELECT device_id FROM devices")}
            for run in data.get("runs", []):
                cur = conn.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?)", (
                    run["run_id"], run["device_id"], run["started_at"], run.get("finished_at"),
                    run.get("status", "complete"), run.get("command")))
                counts["runs"] += cur.rowcount
            known_runs = {r[0] for r in conn.execute("SELECT run_id FROM runs")}
            for index, item in enumerate(data.get("measurements", [])):
                missing = [key for key in required if item.get(key) in (None, "")]
                if missing:
                    raise OndeviceError(f"measurement {index} lacks {', '.join(missing)}; nothing was imported")
                if item["device_id"] not in known_devices:
                    raise OndeviceError(f"measurement {index} names device {item['device_id']} that the file does "
                                        "not describe; nothing was imported")
                row = {k: v for k, v in item.items() if k in columns}
                if row.get("run_id") not in known_runs:
                    row["run_id"] = None  # a run the file does not describe: keep the measurement, drop the link
                for column in JSON_COLUMNS:
                    if column in row and not isinstance(row[column], (str, type(None))):
                        row[column] = json.dumps(row[column], sort_keys=True)
                row.setdefault("settings", "{}")
                row.setdefault("environment", "{}")
                names = list(row)
                cur = conn.execute(f"INSERT OR IGNORE INTO measurements ({', '.join(names)}) "
                                   f"VALUES ({', '.join('?' * len(names))})", [row[n] for n in names])
                counts["measurements" if cur.rowcount else "skipped"] += 1

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
