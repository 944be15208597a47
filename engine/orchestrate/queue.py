"""The run queue and sweeps: what waits to run, in which order, and how each ended.

The CLI (``mediswift sweep``, ``mediswift queue``), the queue runner and the studio's Queue view all
read and change the queue through this one module; its rows live in the run database
(engine.store.queue_rows holds their SQL). No torch, no Qt.

An entry is one ``mediswift train`` to run later: a snapshot of its config file's text (so editing the
file after queueing changes nothing), its ``--set`` overrides, its runs folder and working directory.
An entry may wait for another (``after_id``): it starts only once that one completed, with ``parent``
set to that run (``mediswift sweep --then``); if that one ended otherwise it is skipped.

Statuses: waiting → running → completed | stopped | failed | crashed, or cancelled / skipped without
running. ``running`` with no ``run_id`` yet means the engine is starting. One runner works a database's
queue at a time (a lease like a run's: pid + process start time in ``queue_state``).
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from typing import Any, Iterable

from engine.core.errors import InputError
from engine.core.processes import pid_alive, process_start
from engine.store.queue_rows import ENDED, RUNNING, WAITING, QueueStore
from engine.store.rundb import RunDB

MAX_PARALLEL = 64
HEARTBEAT_FRESH_S = 60  # a runner on another host counts as alive while its heartbeat is this recent

__all__ = ["ENDED", "MAX_PARALLEL", "RUNNING", "WAITING", "Queue", "check_parallel", "describe"]


def check_parallel(n: int) -> None:
    """How many runs at once the queue may allow (``--parallel``, the Queue tab's spin box)."""
    if not isinstance(n, int) or not 1 <= n <= MAX_PARALLEL:
        raise InputError(f"--parallel must be an integer in [1, {MAX_PARALLEL}], got {n!r}", key="parallel")


def describe(e: dict) -> dict[str, Any]:
    """The fields of an entry worth showing (``queue list --json``, the Queue view)."""
    return {k: e[k] for k in ("id", "position", "sweep_id", "label", "stage", "status", "run_id", "after_id",
                              "config_name", "sets", "error", "created_at", "started_at", "finished_at")}


def _live_runner(state: dict) -> int | None:
    """The lease holder's pid if that runner is alive (one on another host: while its heartbeat is fresh)."""
    pid = state["runner_pid"]
    if not pid:
        return None
    if state["runner_host"] != socket.gethostname():
        return pid if time.time() - (state["runner_heartbeat"] or 0) < HEARTBEAT_FRESH_S else None
    return pid if pid_alive(pid, state["runner_pid_start"]) else None


class Queue:
    def __init__(self, db: RunDB):
        self.db = db
        self.rows = QueueStore(db)

    # -- reading ----------------------------------------------------------------------------------
    def entries(self, include_ended: bool = True, sweep_id: str | None = None) -> list[dict]:
        return self.rows.entries(include_ended, sweep_id)

    def entry(self, entry_id: int) -> dict:
        return self.rows.entry(entry_id)

    def state(self) -> dict:
        row = self.rows.state()
        row["runner_alive"] = _live_runner(row) is not None
        return row

    def runner_pid(self) -> int | None:
        """The pid of the live runner of this queue, if any (one on another host counts while its
        heartbeat is fresh)."""
        return _live_runner(self.rows.state())

    # -- sweeps -----------------------------------------------------------------------------------
    def create_sweep(self, name: str, spec: dict) -> str:
        sweep_id = "s" + secrets.token_hex(3)
        self.rows.insert_sweep(sweep_id, name, spec)
        return sweep_id

    def sweeps(self) -> list[dict]:
        return self.rows.sweeps()

    def sweep(self, sweep_id: str) -> dict:
        """A sweep by id or name."""
        rows = [s for s in self.sweeps() if s["id"] == sweep_id or s["name"] == sweep_id]
        if not rows:
            raise InputError(f"no sweep {sweep_id} (see `mediswift queue list`)", key="sweep")
        return rows[0]

    def sweep_of_runs(self) -> dict[str, dict]:
        """run id -> {"id", "name"} of the sweep that queued it."""
        return self.rows.sweep_of_runs()

    # -- adding -----------------------------------------------------------------------------------
    def add(self, items: Iterable[dict]) -> list[int]:
        """Append entries (each: config_text, config_name, sets, runs_dir, cwd, and optionally sweep_id,
        label, point, stage, after, an index into ``items`` of the entry to wait for). An entry that
        waits for another is placed right after it, so a grid point's chain finishes before the next
        point's (with one run at a time)."""
        ids = self.rows.insert(list(items))
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
        self.rows.set_positions((i + 1, e) for i, e in enumerate(order))

    # -- changing ---------------------------------------------------------------------------------
    def set_paused(self, paused: bool) -> None:
        self.rows.set_paused(paused)

    def set_parallel(self, n: int) -> None:
        check_parallel(n)
        self.rows.set_parallel(n)

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
        self.rows.set_positions((base + i, r["id"]) for i, r in enumerate(order))
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
            elif e["status"] == RUNNING:
                self.rows.request_cancel(e["id"])
                pid = self._run_pid(e)
                if pid:
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                lines.append(f"entry {e['id']}: stopping run {e['run_id'] or '(starting)'}")
            else:
                lines.append(f"entry {e['id']}: already {e['status']}")
                continue
            for child in self.rows.waiting_after(e["id"]):
                self._end(child, "cancelled", f"cancelled with entry {e['id']}")
                lines.append(f"entry {child}: cancelled (it waited for entry {e['id']})")
        return lines

    def _run_pid(self, e: dict) -> int | None:
        """The live engine of a running entry: its run's process once the run exists, else the one started."""
        if e["run_id"]:
            run = self.db.get_run(e["run_id"])
            if run and run["status"] in ("running", "paused") and pid_alive(run["pid"], run["pid_start"]):
                return run["pid"]
        return e["pid"] if pid_alive(e["pid"], e["pid_start"]) else None

    # -- the runner's side ------------------------------------------------------------------------
    def claim_runner(self) -> bool:
        """Take the runner lease for this process; False when another live runner holds it."""
        me = os.getpid()

        def held_by_other(state: dict) -> bool:
            holder = _live_runner(state)
            return bool(holder) and holder != me

        return self.rows.claim_runner(me, process_start(me), socket.gethostname(), held_by_other)

    def heartbeat(self) -> None:
        self.rows.heartbeat(os.getpid())

    def release_runner(self) -> None:
        self.rows.release_runner(os.getpid())

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
        self.rows.mark_started(entry_id, pid, process_start(pid), log_path)

    def set_run(self, entry_id: int, run_id: str) -> None:
        self.rows.set_run(entry_id, run_id)

    def finish(self, entry_id: int, status: str, error: str | None = None) -> None:
        """End a running entry as its run ended; one whose cancel was asked for ends cancelled."""
        e = self.entry(entry_id)
        if e["cancel_requested"] and status in ("stopped", "completed", "failed", "crashed"):
            error = f"cancelled while running (the run ended {status})"
            status = "cancelled"
        self._end(entry_id, status, error)

    def _end(self, entry_id: int, status: str, error: str | None) -> None:
        self.rows.end(entry_id, status, error)
