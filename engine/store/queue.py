"""The run queue and sweeps, in the run database: what waits to run, in which order, and how each ended.

Ground floor (no torch, no Qt): the CLI (``mediswift sweep``, ``mediswift queue``), the queue runner and
the studio's Queue view all read and change the queue through this one module.

An entry is one ``mediswift train`` to run later: a snapshot of its config file's text (so editing the
file after queueing changes nothing), its ``--set`` overrides, its runs folder and working directory.
An entry may wait for another (``after_id``): it starts only once that one completed, with ``parent``
set to that run (``mediswift sweep --then``); if that one ended otherwise it is skipped.

Statuses: waiting → running → completed | stopped | failed | crashed, or cancelled / skipped without
running. ``running`` with no ``run_id`` yet means the engine is starting. One runner works a database's
queue at a time (a lease like a run's: pid + process start time in ``queue_state``).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from typing import Any, Iterable

from engine.core.errors import InputError
from engine.store.rundb import RunDB, _process_start, pid_alive

WAITING, RUNNING = "waiting", "running"
ENDED = ("completed", "stopped", "failed", "crashed", "cancelled", "skipped")
MAX_PARALLEL = 64


def check_parallel(n: int) -> None:
    """How many runs at once the queue may allow (``--parallel``, the Queue tab's spin box)."""
    if not isinstance(n, int) or not 1 <= n <= MAX_PARALLEL:
        raise InputError(f"--parallel must be an integer in [1, {MAX_PARALLEL}], got {n!r}", key="parallel")


class Queue:
    def __init__(self, db: RunDB):
        self.db = db
        self.conn = db.db.conn

    # -- reading ----------------------------------------------------------------------------------
    def entries(self, include_ended: bool = True, sweep_id: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM queue", []
        where = []
        if not include_ended:
            where.append(f"status IN ('{WAITING}', '{RUNNING}')")
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

    def state(self) -> dict:
        row = dict(next(iter(self.db.db.query("SELECT * FROM queue_state WHERE id = 1"))))
        row["paused"] = bool(row["paused"])
        row["runner_alive"] = self.runner_pid() is not None
        return row

    def runner_pid(self) -> int | None:
        """The pid of the live runner of this queue, if any (one on another host counts while its
        heartbeat is fresh)."""
        row = next(iter(self.db.db.query("SELECT * FROM queue_state WHERE id = 1")))
        pid = row["runner_pid"]
        if not pid:
            return None
        if row["runner_host"] != socket.gethostname():
            return pid if time.time() - (row["runner_heartbeat"] or 0) < 60 else None
        return pid if pid_alive(pid, row["runner_pid_start"]) else None

    # -- sweeps -----------------------------------------------------------------------------------
    def create_sweep(self, name: str, spec: dict) -> str:
        sweep_id = "s" + secrets.token_hex(3)
        with self.conn:
            self.db.db["sweeps"].insert({"id": sweep_id, "name": name, "spec": json.dumps(spec, sort_keys=True),
                                         "created_at": time.time()})
        return sweep_id

    def sweeps(self) -> list[dict]:
        out = []
        for r in self.db.db.query("SELECT * FROM sweeps ORDER BY created_at DESC"):
            r = dict(r)
            r["spec"] = json.loads(r["spec"] or "{}")
            out.append(r)
        return out

    def sweep(self, sweep_id: str) -> dict:
        rows = [s for s in self.sweeps() if s["id"] == sweep_id or s["name"] == sweep_id]
        if not rows:
            raise InputError(f"no sweep {sweep_id} (see `mediswift queue list`)", key="sweep")
        return rows[0]

    def sweep_of_runs(self) -> dict[str, dict]:
        """run id -> {"id", "name"} of the sweep that queued it."""
        sql = ("SELECT q.run_id, s.id, s.name FROM queue q JOIN sweeps s ON s.id = q.sweep_id "
               "WHERE q.run_id IS NOT NULL")
        return {r[0]: {"id": r[1], "name": r[2]} for r in self.conn.execute(sql).fetchall()}

    # -- adding -----------------------------------------------------------------------------------
    def add(self, items: Iterable[dict]) -> list[int]:
        """Append entries (each: config_text, config_name, sets, runs_dir, cwd, and optionally sweep_id,
        label, point, stage, after, an index into ``items`` of the entry to wait for). An entry that
        waits for another is placed right after it, so a grid point's chain finishes before the next
        point's (with one run at a time)."""
        items = list(items)
        ids: list[int] = []
        with self.conn:
            top = self.conn.execute("SELECT MAX(position) FROM queue").fetchone()[0] or 0.0
            for i, it in enumerate(items):
                after = it.get("after")
                row = {
                    "position": top + 1 + i, "sweep_id": it.get("sweep_id"), "label": it.get("label", ""),
                    "point": json.dumps(it.get("point") or {}), "stage": it.get("stage", ""),
                    "config_name": it["config_name"], "config_text": it["config_text"],
                    "sets": json.dumps(list(it.get("sets") or [])), "runs_dir": it["runs_dir"], "cwd": it["cwd"],
                    "after_id": ids[after] if after is not None else None, "status": WAITING,
                    "created_at": time.time(),
                }
                ids.append(self.db.db["queue"].insert(row).last_pk)
        self._renumber()
        return ids

    def _renumber(self) -> None:
        """Positions 1..n with each waiting chain member right after the entry it waits for."""
        rows = self.entries()
        by_after: dict[int, list[dict]] = {}
        for r in rows:
            if r["after_id"]:
                by_after.setdefault(r["after_id"], []).append(r)
        order: list[int] = []

        def place(r):
            order.append(r["id"])
            for child in by_after.get(r["id"], []):
                place(child)

        ids = {r["id"] for r in rows}
        for r in rows:
            if not r["after_id"] or r["after_id"] not in ids:
                place(r)
        with self.conn:
            self.conn.executemany("UPDATE queue SET position = ? WHERE id = ?", [(i + 1, e) for i, e in enumerate(order)])

    # -- changing ---------------------------------------------------------------------------------
    def set_paused(self, paused: bool) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET paused = ? WHERE id = 1", [int(paused)])

    def set_parallel(self, n: int) -> None:
        check_parallel(n)
        with self.conn:
            self.conn.execute("UPDATE queue_state SET parallel = ? WHERE id = 1", [n])

    def move(self, entry_id: int, to: int) -> int:
        """Move a waiting entry to place ``to`` (1 = next to start) among the waiting ones; its chained
        entries move with it. Returns the place it got."""
        e = self.entry(entry_id)
        if e["status"] != WAITING:
            raise InputError(f"queue entry {entry_id} is {e['status']}; only waiting entries can be moved", key="entry")
        if e["after_id"]:
            raise InputError(f"queue entry {entry_id} runs after entry {e['after_id']} (its parent); move that one",
                             key="entry")
        heads = [r for r in self.entries() if r["status"] == WAITING and not r["after_id"]]
        others = [r for r in heads if r["id"] != e["id"]]
        to = max(1, min(int(to), len(heads)))
        # the new order of the waiting heads; ended and running entries keep their places before them
        order = others[:to - 1] + [e] + others[to - 1:]
        base = min(r["position"] for r in heads)
        with self.conn:
            for i, r in enumerate(order):
                self.conn.execute("UPDATE queue SET position = ? WHERE id = ?", [base + i, r["id"]])
        self._renumber()
        return to

    def cancel(self, entry_ids: Iterable[int]) -> list[str]:
        """Cancel entries: a waiting one (and what waits for it) never starts; a running one's engine is
        asked to stop (SIGTERM: a graceful stop with a final checkpoint) and the entry ends cancelled.
        Returns one line per entry saying what happened."""
        lines = []
        for entry_id in entry_ids:
            e = self.entry(entry_id)
            if e["status"] == WAITING:
                self._end(e["id"], "cancelled", "cancelled before it started")
                lines.append(f"entry {e['id']}: cancelled")
                for child in self._waiting_after(e["id"]):
                    self._end(child, "cancelled", f"cancelled with entry {e['id']}")
                    lines.append(f"entry {child}: cancelled (it waited for entry {e['id']})")
            elif e["status"] == RUNNING:
                with self.conn:
                    self.conn.execute("UPDATE queue SET cancel_requested = 1 WHERE id = ?", [e["id"]])
                pid = self._run_pid(e)
                if pid:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                lines.append(f"entry {e['id']}: stopping run {e['run_id'] or '(starting)'}")
                for child in self._waiting_after(e["id"]):
                    self._end(child, "cancelled", f"cancelled with entry {e['id']}")
                    lines.append(f"entry {child}: cancelled (it waited for entry {e['id']})")
            else:
                lines.append(f"entry {e['id']}: already {e['status']}")
        return lines

    def _run_pid(self, e: dict) -> int | None:
        if e["run_id"]:
            run = self.db.get_run(e["run_id"])
            if run and run["status"] in ("running", "paused") and pid_alive(run["pid"], run["pid_start"]):
                return run["pid"]
        return e["pid"] if pid_alive(e["pid"], e["pid_start"]) else None

    def _waiting_after(self, entry_id: int) -> list[int]:
        out, frontier = [], [entry_id]
        while frontier:
            rows = self.conn.execute(f"SELECT id FROM queue WHERE after_id = ? AND status = '{WAITING}'",
                                     [frontier.pop()]).fetchall()
            for (i,) in rows:
                out.append(i)
                frontier.append(i)
        return out

    # -- the runner's side ------------------------------------------------------------------------
    def claim_runner(self) -> bool:
        """Take the runner lease for this process; False when another live runner holds it."""
        me = os.getpid()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            holder = self.runner_pid()
            if holder and holder != me:
                self.conn.execute("ROLLBACK")
                return False
            self.conn.execute("UPDATE queue_state SET runner_pid = ?, runner_pid_start = ?, runner_host = ?, "
                              "runner_heartbeat = ? WHERE id = 1",
                              [me, _process_start(me), socket.gethostname(), time.time()])
            self.conn.execute("COMMIT")
            return True
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def heartbeat(self) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET runner_heartbeat = ? WHERE id = 1 AND runner_pid = ?",
                              [time.time(), os.getpid()])

    def release_runner(self) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue_state SET runner_pid = NULL, runner_pid_start = NULL WHERE id = 1 "
                              "AND runner_pid = ?", [os.getpid()])

    def ready(self) -> list[dict]:
        """Waiting entries that may start now, in order (those that wait for an unfinished entry are
        left; those whose entry ended otherwise than completed are skipped here)."""
        rows = self.entries()
        by_id = {r["id"]: r for r in rows}
        out = []
        for r in rows:
            if r["status"] != WAITING:
                continue
            dep = by_id.get(r["after_id"]) if r["after_id"] else None
            if r["after_id"] and dep is None:
                self._end(r["id"], "skipped", f"the entry it waited for ({r['after_id']}) is gone")
            elif dep is None:
                out.append(r)
            elif dep["status"] == "completed" and dep["run_id"]:
                out.append({**r, "parent_run": dep["run_id"]})
            elif dep["status"] in ENDED:
                self._end(r["id"], "skipped", f"not started: the run it continues (entry {dep['id']}) ended {dep['status']}")
        return out

    def mark_started(self, entry_id: int, pid: int, log_path: str) -> None:
        with self.conn:
            self.conn.execute(f"UPDATE queue SET status = '{RUNNING}', pid = ?, pid_start = ?, log_path = ?, "
                              "started_at = ?, error = NULL WHERE id = ?",
                              [pid, _process_start(pid), log_path, time.time(), entry_id])

    def set_run(self, entry_id: int, run_id: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue SET run_id = ? WHERE id = ?", [run_id, entry_id])

    def finish(self, entry_id: int, status: str, error: str | None = None) -> None:
        e = self.entry(entry_id)
        if e["cancel_requested"] and status in ("stopped", "completed", "failed", "crashed"):
            error = f"cancelled while running (the run ended {status})"
            status = "cancelled"
        self._end(entry_id, status, error)

    def _end(self, entry_id: int, status: str, error: str | None) -> None:
        with self.conn:
            self.conn.execute("UPDATE queue SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                              [status, error, time.time(), entry_id])


def _decode(r: dict) -> dict:
    r = dict(r)
    r["point"] = json.loads(r.get("point") or "{}")
    r["sets"] = json.loads(r.get("sets") or "[]")
    r["cancel_requested"] = bool(r.get("cancel_requested"))
    return r


def describe(e: dict) -> dict[str, Any]:
    """The fields of an entry worth showing (``queue list --json``, the Queue view)."""
    return {k: e[k] for k in ("id", "position", "sweep_id", "label", "stage", "status", "run_id", "after_id",
                              "config_name", "sets", "error", "created_at", "started_at", "finished_at")}
