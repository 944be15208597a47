"""The run queue and sweeps: what waits to run, in which order, and how each ended.

The CLI (``mediswift sweep``, ``mediswift queue``), the queue runner and the studio's Queue view all
read and change the queue through this one module; its rows live in the run database
(engine.store.queue_rows holds their SQL). No torch, no Qt.

An entry is one ``mediswift train`` to run later: a snapshot of its config file's text (so editing the
file after queueing changes nothing), its ``--set`` overrides, its runs folder and working directory.
Paths are made absolute when an entry is stored (``add``: the runs folder, and every path-valued ``--set``
key, ``data.corpus`` and ``task.train``/``dev``/``splits``, against the entry's working directory), so
where a runner or its engine runs never changes what an entry names.
An entry may wait for another (``after_id``): it starts only once that one completed, with ``parent``
set to that run (``mediswift sweep --then``); if that one ended otherwise it is skipped.

Statuses: waiting → starting → running → completed | stopped | failed | crashed, or cancelled / skipped
without running. One runner works a database's queue at a time (a lease like a run's: pid + process start
time in ``queue_state``), and an entry starts in two phases, so it never runs twice even if that runner
is killed at any point or a second runner works the queue too:

1. ``claim``: one write transaction takes a waiting entry for this runner (status ``starting``, the
   runner's pid, process start time and host), only while it is waiting and the queue has room;
2. the runner starts the engine held at a gate, records its pid (``record_engine``), then lets it go
   and marks the entry ``running``. An engine whose runner dies before letting it go exits unstarted.

``settle_starts`` (every ``ready()``) finishes a ``starting`` entry whose runner is gone: its engine
alive or its run started (the run_started event in the entry's log): adopted, ``running``; otherwise it
never ran and waits again.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from engine.core.config import field_docs, parse_value
from engine.core.errors import InputError
from engine.core.processes import pid_alive, process_start
from engine.store.queue_rows import ENDED, LIVE, RUNNING, STARTING, WAITING, QueueStore
from engine.store.rundb import RunDB

MAX_PARALLEL = 64
HEARTBEAT_FRESH_S = 60  # a runner on another host counts as alive while its heartbeat is this recent

GATE_MARK = "mediswift-queue-gate"  # in the command line of an engine still held at its gate (engine.orchestrate.runner)

__all__ = ["ENDED", "LIVE", "MAX_PARALLEL", "RUNNING", "STARTING", "WAITING", "Queue", "absolute_sets",
           "check_parallel", "describe", "started_run"]


def check_parallel(n: int) -> None:
    """How many runs at once the queue may allow (``--parallel``, the Queue tab's spin box)."""
    if not isinstance(n, int) or not 1 <= n <= MAX_PARALLEL:
        raise InputError(f"--parallel must be an integer in [1, {MAX_PARALLEL}], got {n!r}", key="parallel")


def describe(e: dict) -> dict[str, Any]:
    """The fields of an entry worth showing (``queue list --json``, the Queue view)."""
    return {k: e[k] for k in ("id", "position", "sweep_id", "label", "stage", "status", "run_id", "after_id",
                              "config_name", "sets", "error", "created_at", "started_at", "finished_at")}


def _path_keys() -> dict[str, str]:
    """Config keys whose values are paths (field metadata kind "path" or "corpus") -> their type name."""
    return {k: info["type"] for k, info in field_docs().items() if info.get("kind") in ("path", "corpus")}


def _absolute(value: str, cwd: str) -> str:
    """A path as the engine would open it from ``cwd``; embedded corpora (``builtin:...``) and empty values
    stay as they are."""
    if not isinstance(value, str) or not value.strip() or value.startswith("builtin:"):
        return value
    return str((Path(cwd) / Path(value).expanduser()).resolve())


def absolute_sets(sets: Iterable[str], cwd: str) -> list[str]:
    """``--set`` items with path-valued keys (``data.corpus`` items, ``task.train``, ``task.dev``,
    ``task.splits``) made absolute against ``cwd``; every other item as given."""
    keys = _path_keys()
    out = []
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq or key.strip() not in keys:
            out.append(item)
            continue
        value = parse_value(text.strip())
        if keys[key.strip()] == "str" and not isinstance(value, str):
            value = text.strip()  # as parse_overrides reads a text key: bare text as typed (task.train=2024)
        if isinstance(value, list):
            fixed = [_absolute(v, cwd) for v in value]
            out.append(item if fixed == value else f"{key.strip()}={json.dumps(fixed)}")
        elif isinstance(value, str):
            fixed = _absolute(value, cwd)
            # bare text reads back as itself unless it parses as another TOML value: then quote it
            out.append(item if fixed == value else
                       f"{key.strip()}={fixed if parse_value(fixed) == fixed else json.dumps(fixed)}")
        else:
            out.append(item)  # not a path (a number, a boolean): the config refuses it, as given
    return out


def started_run(log_path: str | None) -> str | None:
    """The run id from an engine's run_started event in its events log, once it has written it."""
    if not log_path or not Path(log_path).is_file():
        return None
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if '"run_started"' in line:
                try:
                    return json.loads(line).get("run_id")
                except json.JSONDecodeError:
                    return None
    return None


def _at_gate(pid: int) -> bool:
    """Whether a process is an engine still held at its gate (its runner has not let it go)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return GATE_MARK.encode() in fh.read()
    except OSError:
        return False


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
        rows = []
        for it in items:
            cwd = str(Path(it.get("cwd") or os.getcwd()).expanduser().resolve())
            rows.append({**it, "cwd": cwd, "runs_dir": _absolute(str(it["runs_dir"]), cwd),
                         "sets": absolute_sets(it.get("sets") or [], cwd)})
        ids = self.rows.insert(rows)
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
            elif e["status"] in (STARTING, RUNNING):  # a starting one is stopped once its engine is let go
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
        return e["pid"] if pid_alive(e["pid"], e["pid_start"]) and not _at_gate(e["pid"]) else None

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
        self.settle_starts()  # a start a dead runner left half done: adopted, or waiting again
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

    def claim(self, e: dict, log_path: str) -> bool:
        """Phase one of a start: this runner takes the waiting entry (status starting) if it is still
        waiting and fewer than ``parallel`` entries are starting or running; False otherwise."""
        me = os.getpid()
        return self.rows.claim(e["id"], me, process_start(me), socket.gethostname(), log_path,
                               self.rows.state()["parallel"])

    def record_engine(self, entry_id: int, pid: int) -> bool:
        """Phase two: the engine started (held at its gate) for an entry this runner claimed."""
        return self.rows.record_engine(entry_id, os.getpid(), pid, process_start(pid))

    def mark_running(self, entry_id: int) -> bool:
        """The engine of this runner's starting entry was let go."""
        return self.rows.mark_running(entry_id, os.getpid())

    def _claimer_alive(self, e: dict) -> bool:
        pid = e["runner_pid"]
        if not pid:
            return False
        if e["runner_host"] and e["runner_host"] != socket.gethostname():
            return _live_runner(self.rows.state()) == pid  # another machine's: while it holds the lease, fresh
        return pid_alive(pid, e["runner_pid_start"])

    def settle_starts(self) -> list[str]:
        """Finish the starts a dead runner left half done (entries ``starting`` whose runner is gone):
        one whose engine is alive or whose run started is adopted (``running``, watched by the runner
        from now on); one whose engine never ran waits again. One line per entry settled."""
        lines = []
        for e in self.entries(include_ended=False):
            if e["status"] != STARTING or self._claimer_alive(e):
                continue
            alive = pid_alive(e["pid"], e["pid_start"])  # first: once it is dead, its log is complete
            if alive and _at_gate(e["pid"]):
                continue  # its runner died before letting it go: it exits by itself, then this entry waits again
            run_id = started_run(e["log_path"])
            if run_id or alive:
                if self.rows.mark_running(e["id"], e["runner_pid"], run_id):
                    lines.append(f"entry {e['id']}: adopted its engine (pid {e['pid']})"
                                 + (f", run {run_id}" if run_id else "") + f"; runner {e['runner_pid']} is gone")
            elif self.rows.roll_back(e["id"], e["runner_pid"]):
                lines.append(f"entry {e['id']}: waiting again (runner {e['runner_pid']} died before its engine ran)")
        return lines

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
