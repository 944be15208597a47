"""The run database: the source of truth for runs, metrics, evaluations, checkpoints and artifacts.

SQLite in WAL mode through sqlite-utils, so the studio reads while the engine writes. The schema is
built by ordered migrations recorded in ``schema_migrations``. The store: no torch, no Qt.
The engine process of a run is the only writer of that run's rows.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import secrets
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlite_utils

from engine.core.errors import FileSystemError, InputError
from engine.core.paths import default_db_path
from engine.core.processes import pid_alive, process_start  # pid_alive: also importable from here, as before

FINAL_STATUSES = ("completed", "stopped", "failed", "crashed")
LIVE_STATUSES = ("created", "running", "paused")
# artifacts.kind of the files a run keeps besides its checkpoints
TOKENIZER_ARTIFACT = "tokenizer"
PROMPT_ARTIFACT = "prompt"  # a soft prompt's vectors (a prompt run writes it)
# deferred metric rows (the engine's per-step logging) are committed together at most this far apart; one
# commit per step rewrites a leaf page of the (run, name, step) index per metric name and caps at ~45k rows/s
FLUSH_S = 0.5
# SQLite's primary result codes of a file system that refused the database's files (the database itself is intact)
SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 3, 8, 10, 13, 14
DISK_CODES = (SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN)


def disk_fault(e: BaseException, db_path: str | Path | None = None) -> FileSystemError | None:
    """A database error that is the file system's, not the file's (the disk is full, the file-size
    limit is reached, the folder is read-only or immutable), as a FileSystemError naming the database
    and the errno; None for anything else (a damaged or foreign file keeps its own message).
    SQLite does not pass the errno on: it is read back from the file system (``probe_errno``)."""
    if isinstance(e, FileSystemError):
        return e
    if isinstance(e, OSError):  # a file's (it names one) or the disk's; a closed pipe or socket is neither
        storage = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.EIO)
        return FileSystemError.of(e) if storage or e.filename is not None else None
    if not isinstance(e, sqlite3.Error):
        return None
    code = getattr(e, "sqlite_errorcode", None)
    text = str(e).lower()
    if code is not None:
        if code & 0xFF not in DISK_CODES:
            return None
    elif not any(w in text for w in ("disk i/o error", "database or disk is full", "readonly database",
                                      "unable to open database file")):
        return None
    path = Path(db_path) if db_path else default_db_path()
    return FileSystemError(probe_errno(path, full=code is not None and code & 0xFF == SQLITE_FULL), path)


def probe_errno(path: Path, full: bool = False) -> int:
    """The errno a failed write of the database (``path``, with its -wal and -journal files) most likely
    met: the file-size limit reached, no space left, a read-only file system, a folder or file it may
    not write; EIO when none of these shows."""
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")]
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        for f in files:
            try:
                if f.stat().st_size + 8192 >= soft:
                    return errno.EFBIG
            except OSError:
                pass
    folder = path.parent if path.parent.exists() else Path(path.anchor or "/")
    try:
        st = os.statvfs(folder)
        if st.f_flag & os.ST_RDONLY:
            return errno.EROFS
        if full or st.f_bavail * st.f_frsize < 65536:
            return errno.ENOSPC
    except OSError:
        pass
    if not os.access(folder, os.W_OK | os.X_OK) or any(f.exists() and not os.access(f, os.W_OK) for f in files):
        return errno.EACCES if os.geteuid() != 0 else errno.EPERM
    return errno.EIO


def _m001_initial(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {
            "id": str, "name": str, "stage": str, "parent_id": str, "status": str, "config": str,
            "created_at": float, "started_at": float, "finished_at": float, "heartbeat_at": float,
            "host": str, "pid": int, "pid_start": str, "versions": str, "run_dir": str,
            "summary": str, "meta": str, "error": str, "tags": str, "notes": str, "archived": int,
        },
        pk="id",
        not_null={"stage", "status", "config", "created_at"},
        defaults={"tags": "[]", "notes": "", "archived": 0, "summary": "{}", "meta": "{}"},
    )
    db["runs"].create_index(["status"])
    db["runs"].create_index(["parent_id"])
    db["metrics"].create(
        {"run_id": str, "step": int, "tokens": int, "wall_time": float, "flops": float, "flops_dense": float,
         "name": str, "value": float},
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["metrics"].create_index(["run_id", "name", "step"])
    db["evaluations"].create(
        {"id": int, "run_id": str, "step": int, "task": str, "split": str, "data_path": str,
         "metrics": str, "baselines": str, "created_at": float},
        pk="id", foreign_keys=[("run_id", "runs", "id")],
    )
    db["evaluations"].create_index(["run_id"])
    db["checkpoints"].create(
        {"id": int, "run_id": str, "step": int, "tokens": int, "path": str, "bytes": int,
         "is_final": int, "created_at": float},
        pk="id", foreign_keys=[("run_id", "runs", "id")],
    )
    db["checkpoints"].create_index(["run_id", "step"])
    db["artifacts"].create(
        {"id": int, "run_id": str, "kind": str, "path": str, "meta": str, "created_at": float},
        pk="id", foreign_keys=[("run_id", "runs", "id")],
    )
    db["artifacts"].create_index(["run_id", "kind"])


def _m002_covering_metrics_index(db: sqlite_utils.Database) -> None:
    # charts read (run, name) series ordered by step with every axis column: a covering index
    # answers them from the index alone instead of one table lookup per point
    db.execute("DROP INDEX IF EXISTS idx_metrics_run_id_name_step")
    db.execute(
        "CREATE INDEX IF NOT EXISTS idx_metrics_series ON metrics "
        "(run_id, name, step, tokens, wall_time, flops, flops_dense, value)"
    )


def _m003_checkpoint_hash(db: sqlite_utils.Database) -> None:
    # the SHA-256 of each checkpoint file, written with it and verified before it is used
    db.execute("ALTER TABLE checkpoints ADD COLUMN sha256 TEXT")


def _m004_sweeps_and_queue(db: sqlite_utils.Database) -> None:
    # a sweep is a named group of queued runs; the queue holds what waits to run, what runs and how each
    # ended (engine.store.queue_rows); queue_state is one row: paused, parallelism and the runner's lease
    db["sweeps"].create({"id": str, "name": str, "spec": str, "created_at": float}, pk="id")
    db["queue"].create(
        {"id": int, "position": float, "sweep_id": str, "label": str, "point": str, "stage": str,
         "config_name": str, "config_text": str, "sets": str, "runs_dir": str, "cwd": str, "after_id": int,
         "status": str, "run_id": str, "pid": int, "pid_start": str, "log_path": str, "error": str,
         "cancel_requested": int, "created_at": float, "started_at": float, "finished_at": float},
        pk="id", not_null={"status", "position", "config_text"}, defaults={"cancel_requested": 0},
    )
    db["queue"].create_index(["status", "position"])
    db["queue"].create_index(["run_id"])
    db["queue_state"].create({"id": int, "paused": int, "parallel": int, "runner_pid": int, "runner_pid_start": str,
                              "runner_host": str, "runner_heartbeat": float}, pk="id")
    db["queue_state"].insert({"id": 1, "paused": 0, "parallel": 1})


MIGRATIONS: list[tuple[int, str, Callable[[sqlite_utils.Database], None]]] = [
    (1, "initial schema", _m001_initial),
    (2, "covering index for metric series", _m002_covering_metrics_index),
    (3, "checkpoint hashes", _m003_checkpoint_hash),
    (4, "sweeps and the run queue", _m004_sweeps_and_queue),
]


class RunDB:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous = NORMAL")
        self._pending: list[tuple] = []  # deferred metric rows, written by flush_metrics
        self._flushed_at = float("-inf")  # the first rows go out at once
        self.migrate()

    # -- schema ------------------------------------------------------------------------------------
    def migrate(self) -> None:
        with self.db.conn:
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
        done = {r[0] for r in self.db.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, name, fn in MIGRATIONS:
            if version in done:
                continue
            try:
                with self.db.conn:
                    fn(self.db)
                    self.db.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, name, time.time()])
            except sqlite3.OperationalError as e:
                # another process migrated at the same moment
                if "already exists" not in str(e) and "duplicate column" not in str(e):
                    raise

    def schema_version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return row[0] or 0

    def close(self) -> None:
        self.flush_metrics()
        self.db.conn.close()

    # -- runs --------------------------------------------------------------------------------------
    def create_run(self, *, name: str, stage: str, config: dict, parent_id: str | None = None,
                   run_dir: str = "", versions: dict | None = None, run_id: str | None = None) -> str:
        run_id = run_id or secrets.token_hex(4)
        pid = os.getpid()  # the creating process: a ``created`` row whose process is gone is reaped (reap_crashed)
        self.db["runs"].insert(
            {
                "id": run_id, "name": name, "stage": stage, "parent_id": parent_id or None, "status": "created",
                "config": json.dumps(config, sort_keys=True), "created_at": time.time(), "host": socket.gethostname(),
                "pid": pid, "pid_start": process_start(pid),
                "versions": json.dumps(versions or {}), "run_dir": run_dir, "summary": "{}", "meta": "{}",
                "tags": "[]", "notes": "", "archived": 0,
            }
        )
        return run_id

    def update_run(self, run_id: str, **fields: Any) -> None:
        self.flush_metrics()  # a status, summary or meta change never lands before the metrics logged ahead of it
        for key in ("config", "summary", "meta", "versions", "tags"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key], sort_keys=True)
        self.db["runs"].update(run_id, fields)

    def mark_running(self, run_id: str) -> None:
        """Claim the run for this process (the one-writer lease: status running + pid + process start
        time), atomically: a second engine that tries to claim a run whose holder is alive gets
        InputError "run ID is already running (pid N)"."""
        pid = os.getpid()
        self.flush_metrics()
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")  # the check and the claim in one write transaction
        try:
            row = conn.execute("SELECT status, pid, pid_start, host FROM runs WHERE id = ?", [run_id]).fetchone()
            status, holder, holder_start, host = row
            if (status in LIVE_STATUSES and status != "created" and holder and holder != pid
                    and (host != socket.gethostname() or pid_alive(holder, holder_start))):
                raise InputError(f"run {run_id} is already {status} (pid {holder})", key="resume")
            now = time.time()
            conn.execute("UPDATE runs SET status = 'running', pid = ?, pid_start = ?, host = ?, started_at = ?, "
                         "heartbeat_at = ?, finished_at = NULL, error = NULL WHERE id = ?",
                         [pid, process_start(pid), socket.gethostname(), now, now, run_id])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        fields: dict[str, Any] = {"status": status}
        if status in FINAL_STATUSES:
            fields["finished_at"] = time.time()
        if error is not None:
            fields["error"] = error
        self.update_run(run_id, **fields)

    def merge_meta(self, run_id: str, **items: Any) -> None:
        meta = self.get_run(run_id)["meta"]
        meta.update(items)
        self.update_run(run_id, meta=meta)

    def get_run(self, run_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        if not rows:
            # allow a unique prefix, as git does
            rows = list(self.db.query("SELECT * FROM runs WHERE id LIKE ?", [run_id + "%"])) if len(run_id) >= 3 else []
            if len(rows) != 1:
                return None
        return _decode_run(rows[0])

    def list_runs(self, include_archived: bool = True) -> list[dict]:
        where = "" if include_archived else "WHERE archived = 0"
        return [_decode_run(r) for r in self.db.query(f"SELECT * FROM runs {where} ORDER BY created_at DESC")]

    def delete_run(self, run_id: str) -> None:
        self.flush_metrics()
        with self.db.conn:
            for table in ("metrics", "evaluations", "checkpoints", "artifacts"):
                self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
            self.db.execute("DELETE FROM runs WHERE id = ?", [run_id])

    def reap_crashed(self) -> list[str]:
        """Mark ``running``/``paused`` rows of this host whose process is gone as ``crashed``, and
        ``created`` rows whose creating process is gone (it died before the run started: nothing to
        resume) as ``failed``."""
        host = socket.gethostname()
        crashed = []
        for r in self.db.query("SELECT id, status, pid, pid_start, host FROM runs "
                               "WHERE status IN ('created', 'running', 'paused')"):
            if r["host"] != host or (r["status"] == "created" and not r["pid"]):
                continue  # another machine's, or a created row of an older version (no pid recorded)
            if not pid_alive(r["pid"], r["pid_start"]):
                if r["status"] == "created":
                    self.set_status(r["id"], "failed", error="the engine process ended before the run started")
                else:
                    self.set_status(r["id"], "crashed", error="the engine process ended without finishing the run")
                crashed.append(r["id"])
        return crashed

    def record_failure(self, run_id: str, status: str, error: str) -> bool:
        """End a run whose process met a disk fault: its status and error, written even when the
        database's own writes just failed (the pending rows are dropped, a truncating WAL checkpoint
        gives back what the write-ahead log held and the write is tried again). False when the file
        system still refuses it (the next command then reaps the run)."""
        self._pending = []
        for attempt in range(2):
            try:
                if self.db.conn.in_transaction:
                    self.db.conn.rollback()
                self.set_status(run_id, status, error=error)
                return True
            except sqlite3.Error:
                if attempt:
                    return False
                try:
                    self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
        return False

    # -- metrics -----------------------------------------------------------------------------------
    def log_metrics(self, run_id: str, step: int, tokens: int, wall_time: float, flops: float,
                    flops_dense: float, values: dict[str, float], defer: bool = False) -> None:
        """One step's metric rows. With ``defer`` they may wait up to FLUSH_S for the next commit; any other
        write through this object (status, checkpoint, evaluation, close) and any read of metrics commits them
        first, so a crash loses at most the last FLUSH_S of rows, all past the last checkpoint."""
        self._pending.extend(
            (run_id, step, tokens, wall_time, flops, flops_dense, name, float(v))
            for name, v in values.items() if v is not None
        )
        if not defer or time.monotonic() - self._flushed_at >= FLUSH_S:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Commit deferred metric rows, with a heartbeat for each run they belong to."""
        self._flushed_at = time.monotonic()
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        now = time.time()
        with self.db.conn:
            self.db.conn.executemany(
                "INSERT INTO metrics (run_id, step, tokens, wall_time, flops, flops_dense, name, value) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
            for run_id in {r[0] for r in rows}:
                self.db.conn.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ?", [now, run_id])

    def insert_metric_rows(self, rows: Iterable[tuple]) -> None:
        """Bulk insert of (run_id, step, tokens, wall_time, flops, flops_dense, name, value) tuples."""
        with self.db.conn:
            self.db.conn.executemany(
                "INSERT INTO metrics (run_id, step, tokens, wall_time, flops, flops_dense, name, value) VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )

    def metrics(self, run_id: str, names: Iterable[str] | None = None, after_step: int = -1) -> list[dict]:
        self.flush_metrics()
        sql = "SELECT step, tokens, wall_time, flops, flops_dense, name, value FROM metrics WHERE run_id = ? AND step > ?"
        args: list[Any] = [run_id, after_step]
        if names:
            names = list(names)
            sql += f" AND name IN ({','.join('?' * len(names))})"
            args += names
        return list(self.db.query(sql + " ORDER BY step, rowid", args))

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        """Drop rows past a checkpoint before resuming, so a resumed run does not repeat steps."""
        self.flush_metrics()
        with self.db.conn:
            self.db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, after_step])
            self.db.execute("DELETE FROM evaluations WHERE run_id = ? AND step > ?", [run_id, after_step])

    def metric_names(self, run_id: str) -> list[str]:
        self.flush_metrics()
        return [r[0] for r in self.db.execute("SELECT DISTINCT name FROM metrics WHERE run_id = ?", [run_id]).fetchall()]

    # -- evaluations, checkpoints, artifacts -------------------------------------------------------
    def add_evaluation(self, run_id: str, step: int, task: str, split: str, metrics: dict,
                       baselines: dict | None = None, data_path: str = "") -> int:
        self.flush_metrics()
        with self.db.conn:
            return self.db["evaluations"].insert(
                {"run_id": run_id, "step": step, "task": task, "split": split, "data_path": data_path,
                 "metrics": json.dumps(metrics), "baselines": json.dumps(baselines or {}), "created_at": time.time()}
            ).last_pk

    def evaluations(self, run_id: str) -> list[dict]:
        out = []
        for r in self.db.query("SELECT * FROM evaluations WHERE run_id = ? ORDER BY id", [run_id]):
            r["metrics"] = json.loads(r["metrics"] or "{}")
            r["baselines"] = json.loads(r["baselines"] or "{}")
            out.append(r)
        return out

    def add_checkpoint(self, run_id: str, step: int, tokens: int, path: str, nbytes: int, is_final: bool,
                       sha256: str | None = None) -> None:
        self.flush_metrics()  # a resume replays from here: every metric up to this step must be on disk
        with self.db.conn:
            self.db["checkpoints"].insert(
                {"run_id": run_id, "step": step, "tokens": tokens, "path": path, "bytes": nbytes,
                 "is_final": int(is_final), "created_at": time.time(), "sha256": sha256}
            )

    def replace_checkpoint_file(self, checkpoint_id: int, path: str, nbytes: int, sha256: str) -> None:
        """Point a checkpoint row at a converted file (mediswift migrate-checkpoints)."""
        with self.db.conn:
            self.db["checkpoints"].update(checkpoint_id, {"path": path, "bytes": nbytes, "sha256": sha256})

    def delete_checkpoint(self, checkpoint_id: int) -> None:
        """Forget a checkpoint row (its file was removed by retention, train.keep_checkpoints)."""
        with self.db.conn:
            self.db.execute("DELETE FROM checkpoints WHERE id = ?", [checkpoint_id])

    def checkpoints(self, run_id: str) -> list[dict]:
        return list(self.db.query("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step, id", [run_id]))

    def latest_checkpoint(self, run_id: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY step DESC, id DESC LIMIT 1", [run_id]))
        return rows[0] if rows else None

    def add_artifact(self, run_id: str, kind: str, path: str, meta: dict | None = None) -> None:
        self.flush_metrics()
        with self.db.conn:
            self.db["artifacts"].insert(
                {"run_id": run_id, "kind": kind, "path": path, "meta": json.dumps(meta or {}), "created_at": time.time()}
            )

    def artifacts(self, run_id: str, kind: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM artifacts WHERE run_id = ?", [run_id]
        if kind:
            sql += " AND kind = ?"
            args.append(kind)
        out = []
        for r in self.db.query(sql + " ORDER BY id", args):
            r["meta"] = json.loads(r["meta"] or "{}")
            out.append(r)
        return out


def _decode_run(r: dict) -> dict:
    r = dict(r)
    for key, default in (("config", "{}"), ("summary", "{}"), ("meta", "{}"), ("versions", "{}"), ("tags", "[]")):
        r[key] = json.loads(r.get(key) or default)
    return r
