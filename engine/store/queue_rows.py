"""The rows of the run queue and of sweeps (tables ``queue``, ``queue_state``, ``sweeps``): their SQL
and nothing else.

What the rows mean (the order chains run in, cancelling a running engine, who holds the runner
lease) is engine.orchestrate.queue's business; this module reads and writes rows as it is told, so a
schema change stays inside the store. JSON columns (``point``, ``sets``, ``spec``) are decoded here.

Statuses: waiting → starting → running → completed | stopped | failed | crashed, or cancelled / skipped
without running. ``starting``: a runner claimed the entry (``runner_pid``, ``runner_pid_start``,
``runner_host``) and is starting its engine; ``running`` with no ``run_id`` yet means the engine has not
written its run_started event yet.

Schema: the queue tables come from the run database's migration 4 (engine.store.rundb); the claim
columns are added here (``_ensure_claim_columns``), once per database, the first time a QueueStore opens it.
"""
from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable, Iterable

from engine.core.errors import InputError
from engine.store.rundb import RunDB

WAITING, STARTING, RUNNING = "waiting", "starting", "running"
LIVE = (WAITING, STARTING, RUNNING)
ENDED = ("completed", "stopped", "failed", "crashed", "cancelled", "skipped")
_INSERT_ENTRY = ("INSERT INTO queue (position, sweep_id, label, point, stage, config_name, config_text, sets, runs_dir, "
                 "cwd, after_id, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# who claimed an entry that is starting (the two-phase start: claimed, then its engine started and recorded)
_CLAIM_COLUMNS = (("runner_pid", "INTEGER"), ("runner_pid_start", "TEXT"), ("runner_host", "TEXT"))


def _ensure_claim_columns(conn: sqlite3.Connection) -> None:
    """Add the claim columns to a queue table that lacks them (a database made before the two-phase
    start); two processes adding them at once is harmless."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(queue)").fetchall()}
    for column, kind in _CLAIM_COLUMNS:
        if column in have:
            continue
        try:
            with conn:
                conn.execute(f"ALTER TABLE queue ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):
                raise


class QueueStore:
    """The queue's rows in one run database."""

    def __init__(self, db: RunDB):
        self.db = db
        self.conn = db.db.conn
        _ensure_claim_columns(self.conn)

    # -- entries ----------------------------------------------------------------------------------
    def entries(self, include_ended: bool = True, sweep_id: str | None = None) -> list[dict]:
        """Entries in queue order (position, then id)."""
        sql, args = "SELECT * FROM queue", []
        where = []
        if not include_ended:
            where.append(f"status IN ('{WAITING}', '{STARTING}', '{RUNNING}')")
        if sweep_id:
            where.append("sweep_id = ?")
            args.append(sweep_id)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_decode(r) for r in self.db.db.query(sql + " ORDER BY position, id", args)]

    def entry(self, entry_id: int) -> dict:
        rows = list(self.db.db.query("SELECT * FROM queue WHERE id = ?", [int(entry_id)]))
        if not rows:
            raise InputError(f"no queue entry {entry_id} (see `mediswift queue list`)", key="entry")
        return _decode(rows[0])

    def insert(self, rows: list[dict]) -> list[int]:
        """Append entries after the last position; ``after`` in a row is an index into ``rows`` of the
        entry it waits for (its id is filled in here). Returns the new ids, in order.

        All of them in one transaction with one prepared statement (a 10,000-point sweep: well under a
        second; through sqlite-utils' per-row insert, which inspects the table each time, it took many)."""
        ids: list[int] = []
        now = time.time()
        with self.conn:
            top = self.conn.execute("SELECT MAX(position) FROM queue").fetchone()[0] or 0.0
            for i, it in enumerate(rows):
                after = it.get("after")
                row = (top + 1 + i, it.get("sweep_id"), it.get("label", ""), json.dumps(it.get("point") or {}),
                       it.get("stage", ""), it["config_name"], it["config_text"], json.dumps(list(it.get("sets") or [])),
                       it["runs_dir"], it["cwd"], ids[after] if after is not None else None, WAITING, now)
                ids.append(self.conn.execute(_INSERT_ENTRY, row).lastrowid)
        return ids

    def set_positions(self, positions: Iterable[tuple[float, int]]) -> None:
        """(position, entry id) pairs, in one transaction."""
        with self.conn:
            self.conn.executemany("UPDATE queue SET position = ? WHERE id = ?", list(positions))

    def waiting_after(self, entry_id: int) -> list[int]:
        """Ids of the waiting entries that wait for this one, directly or through others."""
        out, frontier = [], [entry_id]
        while frontier:
            rows = self.conn.execute(f"SELECT id FROM queue WHERE after_id = ? AND status = '{WAITING}'",
                                     [frontier.pop()]).fetchall()
            for (i,) in rows:
                out.append(i)
                frontier.append(i)
        return out

    def request_cancel(self, entry_id: int) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue SET cancel_requested = 1 WHERE id = ?", [entry_id])

    # -- the two-phase start --------------------------------------------------------------------------
    def claim(self, entry_id: int, runner_pid: int, runner_pid_start: str, host: str, log_path: str,
              parallel: int) -> bool:
        """Phase one: take a waiting entry for this runner (status starting) while fewer than ``parallel``
        entries are starting or running; one write transaction, so of two runners only one ever gets it.
        False when it is no longer waiting or the queue is full."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            cur = self.conn.execute(
                f"UPDATE queue SET status = '{STARTING}', runner_pid = ?, runner_pid_start = ?, runner_host = ?, "
                "log_path = ?, pid = NULL, pid_start = NULL, run_id = NULL, started_at = ?, error = NULL "
                f"WHERE id = ? AND status = '{WAITING}' AND "
                f"(SELECT COUNT(*) FROM queue WHERE status IN ('{STARTING}', '{RUNNING}')) < ?",
                [runner_pid, runner_pid_start, host, log_path, time.time(), entry_id, parallel])
            self.conn.execute("COMMIT")
            return cur.rowcount == 1
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def record_engine(self, entry_id: int, runner_pid: int, pid: int, pid_start: str) -> bool:
        """Phase two: the engine this runner started for its claimed entry (still held at its gate)."""
        with self.conn:
            cur = self.conn.execute(f"UPDATE queue SET pid = ?, pid_start = ? WHERE id = ? AND status = '{STARTING}' "
                                    "AND runner_pid = ?", [pid, pid_start, entry_id, runner_pid])
        return cur.rowcount == 1

    def mark_running(self, entry_id: int, runner_pid: int, run_id: str | None = None) -> bool:
        """A starting entry of ``runner_pid`` (this runner's, or one a dead runner left whose engine is
        adopted) is running."""
        with self.conn:
            cur = self.conn.execute(f"UPDATE queue SET status = '{RUNNING}', run_id = COALESCE(?, run_id) "
                                    f"WHERE id = ? AND status = '{STARTING}' AND runner_pid = ?",
                                    [run_id, entry_id, runner_pid])
        return cur.rowcount == 1

    def roll_back(self, entry_id: int, runner_pid: int) -> bool:
        """A starting entry whose runner died before its engine ran waits again, as if never claimed."""
        with self.conn:
            cur = self.conn.execute(
                f"UPDATE queue SET status = '{WAITING}', runner_pid = NULL, runner_pid_start = NULL, runner_host = NULL, "
                "pid = NULL, pid_start = NULL, log_path = NULL, started_at = NULL, run_id = NULL "
                f"WHERE id = ? AND status = '{STARTING}' AND runner_pid = ? AND run_id IS NULL", [entry_id, runner_pid])
        return cur.rowcount == 1

    def set_run(self, entry_id: int, run_id: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue SET run_id = ? WHERE id = ?", [run_id, entry_id])

    def end(self, entry_id: int, status: str, error: str | None) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                              [status, error, time.time(), entry_id])

    # -- the queue's state: paused, parallelism, the runner's lease --------------------------------
    def state(self) -> dict:
        """The one ``queue_state`` row (``paused`` as a bool)."""
        row = dict(next(iter(self.db.db.query("SELECT * FROM queue_state WHERE id = 1"))))
        row["paused"] = bool(row["paused"])
        return row

    def set_paused(self, paused: bool) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET paused = ? WHERE id = 1", [int(paused)])

    def set_parallel(self, n: int) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET parallel = ? WHERE id = 1", [n])

    def claim_runner(self, pid: int, pid_start: str, host: str, held_by_other: Callable[[dict], bool]) -> bool:
        """Write this runner into the lease unless ``held_by_other(state row)`` says a live runner holds
        it; the check and the write are one write transaction, so two runners never both win."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if held_by_other(self.state()):
                self.conn.execute("ROLLBACK")
                return False
            self.conn.execute("UPDATE queue_state SET runner_pid = ?, runner_pid_start = ?, runner_host = ?, "
                              "runner_heartbeat = ? WHERE id = 1", [pid, pid_start, host, time.time()])
            self.conn.execute("COMMIT")
            return True
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def heartbeat(self, pid: int) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET runner_heartbeat = ? WHERE id = 1 AND runner_pid = ?",
                              [time.time(), pid])

    def release_runner(self, pid: int) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET runner_pid = NULL, runner_pid_start = NULL WHERE id = 1 "
                              "AND runner_pid = ?", [pid])

    # -- sweeps -----------------------------------------------------------------------------------
    def insert_sweep(self, sweep_id: str, name: str, spec: dict) -> None:
        with self.conn:
            self.db.db["sweeps"].insert({"id": sweep_id, "name": name, "spec": json.dumps(spec, sort_keys=True),
                                         "created_at": time.time()})

    def sweeps(self) -> list[dict]:
        """Every sweep, newest first (``spec`` decoded)."""
        out = []
        for r in self.db.db.query("SELECT * FROM sweeps ORDER BY created_at DESC"):
            r = dict(r)
            r["spec"] = json.loads(r["spec"] or "{}")
            out.append(r)
        return out

    def sweep_of_runs(self) -> dict[str, dict]:
        """run id -> {"id", "name"} of the sweep that queued it."""
        sql = ("SELECT q.run_id, s.id, s.name FROM queue q JOIN sweeps s ON s.id = q.sweep_id "
               "WHERE q.run_id IS NOT NULL")
        return {r[0]: {"id": r[1], "name": r[2]} for r in self.conn.execute(sql).fetchall()}


def _decode(r: dict) -> dict:
    r = dict(r)
    r["point"] = json.loads(r.get("point") or "{}")
    r["sets"] = json.loads(r.get("sets") or "[]")
    r["cancel_requested"] = bool(r.get("cancel_requested"))
    return r
