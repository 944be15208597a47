"""The studio's one reader of the run database: ``RunStore`` polls it on one timer and says what changed
through Qt signals, which every view follows instead of polling on its own.

What one tick of the timer (``POLL_MS``) reads, cheapest first:

* the runs it knows to be live (``created``, ``running``, ``paused``) and the runs a view watches, each
  by its id: a status change is seen within a tick, a moved heartbeat means new rows;
* how many runs there are and the newest one's rowid (one cheap read): a run added or deleted elsewhere
  (a queue runner, the CLI) has the whole list read at once, so it shows within a tick too;
* for the runs a view follows (a re-attached run's tab): the metric rows after the last step it got and
  the evaluations it has not seen;
* every other tick, the queue (entries, state, runner);
* the whole run list only every few seconds (a run added, removed or edited elsewhere): often while a
  view that lists runs is on screen (``want_list``), seldom otherwise, and never more than a small share
  of the time (reading thousands of rows costs a good part of a second).

Runs put in the studio's trash (``hide_run``: deleted, with Undo) are left out of ``runs()`` until they
are brought back or the trash is emptied (``studio.commands`` deletes them then).

The store only reads. What it finds that needs a write (a run whose engine died without marking it, a
queue with waiting entries and no runner) it reports as a signal that ``studio.commands`` acts on; a
command that wrote calls ``refresh()`` so every view sees the change at once.

Everything the views read goes through a method here, so this module is the only studio module that
imports the store's read API (``engine.store``, ``engine.orchestrate``).
"""
from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal

from engine.core.processes import pid_alive
from engine.orchestrate.queue import MAX_PARALLEL, RUNNING, WAITING, Queue
from engine.orchestrate.study import study_csv, sweep_study
from engine.store import queries
from engine.store.queries import SERIES_DTYPE, config_diff, disk_usage, numeric_metrics
from engine.store.rundb import FINAL_STATUSES, LIVE_STATUSES, PROMPT_ARTIFACT, RunDB

__all__ = ["FINAL_STATUSES", "LIVE_STATUSES", "MAX_PARALLEL", "PROMPT_ARTIFACT", "RUNNING", "SERIES_DTYPE", "WAITING",
           "RunStore", "config_diff", "disk_usage", "numeric_metrics", "study_csv"]

POLL_MS = 250  # a status change shows within about a tick
QUEUE_EVERY = 2  # ticks between two reads of the queue
LIST_MS, IDLE_LIST_MS = 3000, 15000  # the whole run list: while a view lists runs / otherwise
LIST_SHARE, IDLE_LIST_SHARE = 0.05, 0.01  # at most this share of the time goes to reading the run list
ENGINE_STATUSES = ("running", "paused")  # a row that names a live engine process
# a created row is an engine about to start (from the queue, a CLI): read every tick while this young, as
# running ones are (older ones are left to the list reads: rows of dead engines that nothing reaped)
CREATED_HOT_S = 600
# the fields of a run row that views show; a change to any of them is a change of the run list
SHOWN = ("name", "stage", "status", "parent_id", "tags", "notes", "archived", "error", "summary", "run_dir",
         "started_at", "finished_at", "pid")


class _Follow:
    """What a followed run's view already has: metric rows up to ``after``, the evaluations in ``seen``."""

    def __init__(self, after: int, seen: Iterable[Any] = ()):
        self.after = after
        self.seen = set(seen)
        self.fresh = True  # its evaluations are read on the first tick, then when it moves


class RunStore(QObject):
    """The run database for the studio: reads on demand, one polling timer, signals on change.

    Signals (run ids are strings):
      ``runs_changed()`` — a run appeared or went, or a field a view shows changed (status, name, tags, ...);
      ``runs_progressed()`` — live runs wrote rows (their heartbeats moved);
      ``status_changed(run_id, status)``;
      ``run_updated(run_id, row)`` — a live or watched run's row, re-read, differs;
      ``metrics_added(run_id, rows)`` / ``evaluations_added(run_id, rows)`` — for followed runs, in order;
      ``queue_changed()`` — queue entries, the pause, the parallelism or the runner changed;
      ``engines_gone(run_ids)`` — rows still ``running``/``paused`` whose engine process has ended;
      ``runner_needed()`` — the queue has waiting entries, is not paused and no runner works it.
    """

    runs_changed = Signal()
    runs_progressed = Signal()
    status_changed = Signal(str, str)
    run_updated = Signal(str, dict)
    metrics_added = Signal(str, list)
    evaluations_added = Signal(str, list)
    queue_changed = Signal()
    engines_gone = Signal(list)
    runner_needed = Signal()

    def __init__(self, db: RunDB | str | Path | None = None, parent: QObject | None = None, *,
                 interval_ms: int = POLL_MS, start: bool = True):
        super().__init__(parent)
        self.db = db if isinstance(db, RunDB) else RunDB(db)
        self._queue = Queue(self.db)
        self.host = socket.gethostname()
        self._known: dict[str, dict] = {}  # run id -> {"shown": {...}, "beat": heartbeat, "row": last row read}
        self._watched: Counter[str] = Counter()
        self._followed: dict[str, _Follow] = {}
        self._gone: set[str] = set()  # engines already reported gone (until their row changes)
        self._list_wanted: set[int] = set()
        self._list_cost = 0.0
        self._next_list_at = 0.0  # when the whole list is read next (time.monotonic())
        self._list_cache: list[dict] | None = None  # the list just read, while its signals are out
        self._list_sig: tuple[int, int] | None = None  # runs_signature at the last whole-list read
        self._hidden: dict[str, dict] = {}  # run id -> its row when it went to the trash (in that order)
        self._queue_sig: Any = None
        self._ticks = 0
        self._polling = False
        self._again: tuple[bool, list[str]] | None = None  # a poll asked for while one was running
        self.polls = 0  # ticks done (tests, benchmarks)
        self._seed()
        self.timer = QTimer(self, interval=interval_ms)  # the studio's one timer that reads the database
        self.timer.timeout.connect(self._tick)
        if start:
            self.timer.start()

    @property
    def path(self) -> Path:
        return self.db.path

    def stop(self) -> None:
        """No more polling (the window is closing)."""
        self.timer.stop()

    # -- what views ask for ------------------------------------------------------------------------------
    def watch(self, run_id: str) -> None:
        """Poll this run every tick while it is live (a run's tab), from the next tick on."""
        self._watched[run_id] += 1

    def unwatch(self, run_id: str) -> None:
        self._watched[run_id] -= 1
        if self._watched[run_id] <= 0:
            del self._watched[run_id]

    def follow(self, run_id: str, after_step: int = -1, seen_evaluations: Iterable[Any] = ()) -> None:
        """Also deliver this live run's new metric rows (after ``after_step``) and evaluations (not in
        ``seen_evaluations``) as they are written: a run followed from the database, not from its events."""
        if run_id not in self._followed:
            self.watch(run_id)
        self._followed[run_id] = _Follow(after_step, seen_evaluations)

    def unfollow(self, run_id: str) -> None:
        if self._followed.pop(run_id, None) is not None:
            self.unwatch(run_id)

    def want_list(self, owner: QObject, wanted: bool) -> None:
        """A view that lists runs is on screen (or no longer): the whole list is then read every few seconds."""
        was = bool(self._list_wanted)
        (self._list_wanted.add if wanted else self._list_wanted.discard)(id(owner))
        if wanted and not was:
            self._next_list_at = min(self._next_list_at, time.monotonic() + LIST_MS / 1000)

    def refresh(self, full: bool = True) -> None:
        """Poll now (after a command wrote): every signal for what changed goes out before this returns."""
        self._poll(full=full)

    def refresh_run(self, run_id: str) -> None:
        """Re-read one run (and the live ones) now; the signals for what changed go out before this returns."""
        self._poll(full=False, queue=False, extra=[run_id])

    # -- reads on demand ---------------------------------------------------------------------------------
    def run(self, run_id: str) -> dict | None:
        """A run's row by id or unique id prefix; None if there is none."""
        return self.db.get_run(run_id)

    def runs(self, include_archived: bool = True) -> list[dict]:
        """Every run but those in the trash, newest first (the list the poll just read, while its signals are out)."""
        rows = self._list_cache if self._list_cache is not None else self.db.list_runs(include_archived=True)
        return [r for r in rows if r["id"] not in self._hidden and (include_archived or not r.get("archived"))]

    # -- the trash (what the studio deleted, kept whole until it is emptied) ------------------------------
    def hide_run(self, run_id: str, row: dict) -> None:
        """Leave this run out of ``runs()`` (it went to the trash); every view hears ``runs_changed`` now."""
        self._hidden[run_id] = row
        self.runs_changed.emit()

    def unhide_runs(self, run_ids: Iterable[str]) -> None:
        """Back in ``runs()`` (out of the trash: restored, or deleted for good)."""
        back = [self._hidden.pop(rid) for rid in list(run_ids) if rid in self._hidden]
        if back:
            self.runs_changed.emit()

    def hidden_runs(self) -> list[dict]:
        """The runs in the trash, as they were when they went there, oldest first."""
        return list(self._hidden.values())

    def children(self, run_id: str) -> list[dict]:
        return [r for r in self.runs() if r.get("parent_id") == run_id]

    def metrics(self, run_id: str, after_step: int = -1, names: Iterable[str] | None = None) -> list[dict]:
        return self.db.metrics(run_id, names=names, after_step=after_step)

    def evaluations(self, run_id: str) -> list[dict]:
        return self.db.evaluations(run_id)

    def artifacts(self, run_id: str, kind: str | None = None) -> list[dict]:
        return self.db.artifacts(run_id, kind)

    def checkpoints(self, run_id: str) -> list[dict]:
        return self.db.checkpoints(run_id)

    def latest_checkpoint(self, run_id: str) -> dict | None:
        return self.db.latest_checkpoint(run_id)

    def evaluations_by_run(self) -> dict[str, list[dict]]:
        return queries.evaluations_by_run(self.db)

    def last_values(self, name: str) -> dict[str, tuple[float, int]]:
        return queries.last_values(self.db, name)

    def last_points(self, name: str, run_ids: Iterable[str] | None = None) -> dict[str, dict]:
        """Run id -> {value, step, flops, wall_time} at each run's last row of metric ``name``."""
        return queries.last_points(self.db, name, run_ids)

    def known_run(self, run_id: str) -> dict | None:
        """A run's row as the last poll read it (a live run's is at most a tick old), else read now."""
        known = self._known.get(run_id)
        return known["row"] if known is not None else self.db.get_run(run_id)

    def last_eval_metrics(self, split: str, metric: str) -> dict[str, float | None]:
        return queries.last_eval_metrics(self.db, split, metric)

    def series(self, run_id: str, name: str, max_points: int | None = None,
               steps: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
        """One metric of one run as a SERIES_DTYPE array, thinned to about ``max_points``, and its row count."""
        return queries.load_series_counted(self.db, run_id, name, max_points, steps=steps)

    def metric_names(self, run_ids: Iterable[str]) -> list[str]:
        return queries.metric_names(self.db, run_ids)

    def has_task_evaluations(self, run_id: str) -> bool:
        return queries.has_task_evaluations(self.db, run_id)

    def eval_series(self, run_id: str, frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return queries.eval_series(self.db, run_id, frames)

    def summary_rows(self, run_ids: Iterable[str]) -> list[dict]:
        return queries.summary_rows(self.db, run_ids)

    def queue_state(self) -> dict:
        return self._queue.state()

    def queue_entries(self) -> list[dict]:
        return self._queue.entries()

    def sweeps(self) -> list[dict]:
        return self._queue.sweeps()

    def runner_pid(self) -> int | None:
        return self._queue.runner_pid()

    def sweep_study(self, sweep_id: str) -> dict:
        return sweep_study(self.db, sweep_id)

    # -- polling -----------------------------------------------------------------------------------------
    def _seed(self) -> None:
        """Know every run before the first tick (nothing is reported for what was there already)."""
        t0 = time.monotonic()
        for row in self.db.list_runs(include_archived=True):
            self._record(row)
        self._list_cost = time.monotonic() - t0
        self._schedule_list(t0)
        self._list_sig = queries.runs_signature(self.db)
        self._queue_sig = self._queue_signature(*self._read_queue())

    def _record(self, row: dict) -> tuple[dict | None, dict]:
        old = self._known.get(row["id"])
        self._known[row["id"]] = new = {"shown": {k: row.get(k) for k in SHOWN}, "beat": row.get("heartbeat_at"),
                                        "row": row}
        return old, new

    def _hot(self) -> list[str]:
        """Runs read every tick: those with an engine (running, paused), and watched ones not yet ended."""
        out = []
        young = time.time() - CREATED_HOT_S
        for rid, k in self._known.items():
            status = k["shown"]["status"]
            if (status in ENGINE_STATUSES or (status in LIVE_STATUSES and rid in self._watched)
                    or (status == "created" and (k["row"].get("created_at") or 0) > young)):
                out.append(rid)
        return out + [rid for rid in self._watched if rid not in self._known]

    def _schedule_list(self, read_at: float) -> None:
        wanted = bool(self._list_wanted)
        gap = max((LIST_MS if wanted else IDLE_LIST_MS) / 1000,
                  self._list_cost / (LIST_SHARE if wanted else IDLE_LIST_SHARE))
        self._next_list_at = read_at + gap

    def _tick(self) -> None:
        self._ticks += 1
        self._poll(queue=self._ticks % QUEUE_EVERY == 0)

    def _poll(self, full: bool | None = None, queue: bool = True, extra: Iterable[str] = ()) -> None:
        if self._polling:  # a slot wrote and asked again: once more when this round is done
            was_full, was_extra = self._again or (False, [])
            self._again = (was_full or bool(full), [*was_extra, *extra])
            return
        self._polling = True
        try:
            self._poll_once(full, queue, list(extra))
            for _ in range(3):  # (a bound: a slot that writes on every round cannot keep the loop going)
                if not self._again:
                    break
                again_full, again_extra = self._again
                self._again = None
                self._poll_once(again_full, True, again_extra)
        finally:
            self._polling = False
            self._again = None
        self.polls += 1

    def _read_rows(self, full: bool, extra: list[str]) -> tuple[dict[str, dict], list[str], bool, list[dict] | None]:
        """(rows read by id, the hot runs among them, whether a run went away, the whole list if read)."""
        listed = None
        gone = False
        hot = list(dict.fromkeys(self._hot() + extra))
        if full:
            t0 = time.monotonic()
            self._list_sig = queries.runs_signature(self.db)  # (before the list: a run added meanwhile is read next tick)
            listed = self.db.list_runs(include_archived=True)
            self._list_cost = time.monotonic() - t0
            self._schedule_list(t0)
            rows = {r["id"]: r for r in listed}
            for rid in set(self._known) - set(rows):
                del self._known[rid]
                gone = True
            return rows, [rid for rid in hot if rid in rows], gone, listed
        rows = {}
        for rid in hot:
            row = self.db.get_run(rid)
            if row is not None:
                rows[row["id"]] = row
            elif self._known.pop(rid, None) is not None:
                gone = True
        return rows, [rid for rid in hot if rid in rows], gone, None

    def _poll_once(self, full: bool | None, queue: bool, extra: list[str]) -> None:
        full = bool(full) or (full is None and (time.monotonic() >= self._next_list_at or self._list_moved()))
        rows, hot, changed, listed = self._read_rows(full, extra)
        progressed = False
        statuses: dict[str, str] = {}
        moved: set[str] = set()
        updated: list[tuple[str, dict]] = []
        for rid, row in rows.items():
            old, new = self._record(row)
            if old is None:
                changed = True
                if rid in self._watched:  # a watched run's status is news to its view even when first seen
                    statuses[rid] = new["shown"]["status"]
                continue
            if old["shown"] != new["shown"]:
                changed = True
                if old["shown"]["status"] != new["shown"]["status"]:
                    statuses[rid] = new["shown"]["status"]
                    self._gone.discard(rid)
            if old["beat"] != new["beat"]:
                moved.add(rid)
            if (rid in hot or rid in self._watched) and (old["shown"] != new["shown"] or rid in moved):
                updated.append((rid, row))
        progressed = bool(moved)
        # rows for followed runs go out before their status: a view that sees "completed" has the last step
        news = [(rid, *self._follow_news(rid, rows[rid], rid in statuses, rid in moved))
                for rid in list(self._followed) if rid in rows]
        gone_engines = [rid for rid in hot if rid not in self._gone and self._engine_gone(rows[rid])]
        self._gone.update(gone_engines)
        self._list_cache = listed
        try:
            for rid, metric_rows, evals in news:
                if metric_rows:
                    self.metrics_added.emit(rid, metric_rows)
                if evals:
                    self.evaluations_added.emit(rid, evals)
            for rid, row in updated:
                self.run_updated.emit(rid, row)
            for rid, status in statuses.items():
                self.status_changed.emit(rid, status)
            if changed:
                self.runs_changed.emit()
            if progressed:
                self.runs_progressed.emit()
        finally:
            self._list_cache = None
        if gone_engines:
            self.engines_gone.emit(gone_engines)
        if queue:
            self._poll_queue()

    def _list_moved(self) -> bool:
        """A run was added or deleted since the whole list was last read (one cheap read)."""
        return queries.runs_signature(self.db) != self._list_sig

    def _follow_news(self, run_id: str, row: dict, status_moved: bool,
                     beat_moved: bool) -> tuple[list[dict], list[dict]]:
        """New metric rows and evaluations of a followed run (read while it is live, and once as it ends)."""
        f = self._followed[run_id]
        if row["status"] not in LIVE_STATUSES and not status_moved:
            return [], []
        metric_rows = self.db.metrics(run_id, after_step=f.after)
        if metric_rows:
            f.after = int(metric_rows[-1]["step"])
        evals = []
        if metric_rows or status_moved or beat_moved or f.fresh:
            f.fresh = False
            evals = [e for e in self.db.evaluations(run_id) if e["id"] not in f.seen]
            f.seen.update(e["id"] for e in evals)
        return metric_rows, evals

    def _engine_gone(self, row: dict) -> bool:
        return (row["status"] in ENGINE_STATUSES and row.get("host") == self.host
                and not pid_alive(row.get("pid"), row.get("pid_start")))

    # -- the queue ---------------------------------------------------------------------------------------
    def _read_queue(self) -> tuple[dict, list[dict], int | None]:
        return self._queue.state(), self._queue.entries(), self._queue.runner_pid()

    @staticmethod
    def _queue_signature(state: dict, entries: list[dict], runner: int | None) -> tuple:
        return (bool(state["paused"]), state["parallel"], runner,
                tuple((e["id"], e["position"], e["status"], e["run_id"], e["error"], e["started_at"], e["label"])
                      for e in entries))

    def _poll_queue(self) -> None:
        state, entries, runner = self._read_queue()
        sig = self._queue_signature(state, entries, runner)
        if sig != self._queue_sig:
            self._queue_sig = sig
            self.queue_changed.emit()
        if not state["paused"] and runner is None and any(e["status"] == WAITING for e in entries):
            self.runner_needed.emit()
