"""The studio's writes to the run database, all of them: crashed runs reaped, tags and notes saved,
archive, delete (through the trash, ``run_trash``), and the queue's changes (add a run or a sweep, pause,
parallelism, order, cancel, its runner started).

Tags (runs.tags, a JSON list) and notes (runs.notes) are the user's annotations: the only run columns
the studio writes, besides the ``archived`` flag and a crashed run's status. Archiving hides a run from
default lists and keeps everything (rows and folder); deleting removes its database rows *and* its run
folder, and is refused while the run's engine process is alive (it is the writer).

The functions take the ``RunDB`` (the CLI or tests can call them); ``Commands`` calls them for the
studio and then has the run store re-read, so every view sees the change through the store's signals.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from PySide6.QtCore import QCoreApplication, QObject, QProcess, Signal

from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB
from studio.commands import run_trash
from studio.commands.engine_process import engine_env
from studio.commands.run_trash import RunBusyError, delete_run, is_live, run_folder
from studio.models.run_store import RunStore

__all__ = ["Commands", "RunBusyError", "delete_run", "is_live", "parse_tags", "run_folder", "save_annotations",
           "set_archived"]

RUNNER_RETRY_S = 5.0  # a runner just started needs a moment to take its lease; don't start a second meanwhile


def parse_tags(text: str) -> list[str]:
    """'sparse, 75%,  sparse' -> ['sparse', '75%']: trimmed, de-duplicated, order kept."""
    out: list[str] = []
    for t in text.replace(";", ",").split(","):
        t = t.strip()
        if t and t not in out:
            out.append(t)
    return out


def save_annotations(db: RunDB, run_id: str, tags: list[str], notes: str) -> None:
    db.update_run(run_id, tags=list(tags), notes=notes)


def set_archived(db: RunDB, run_id: str, archived: bool) -> None:
    db.update_run(run_id, archived=1 if archived else 0)


class Commands(QObject):
    """The studio's writes, each followed by a re-read of the run store (whose signals the views follow).

    It acts on what the store reports: an engine gone without marking its run (the run is reaped as
    crashed) and a queue that waits with no runner (one is started, detached, so it outlives the studio).
    ``runner_failed(message)``: the queue runner could not be started.
    """

    runner_failed = Signal(str)

    def __init__(self, store: RunStore, parent: QObject | None = None, *, act_on_store: bool = True):
        super().__init__(parent)
        self.store = store
        self.queue = Queue(store.db)
        self.runner_started_at = float("-inf")
        self.runner_pids: list[int] = []  # runners started here (the lease in the database names the live one)
        if act_on_store:  # one Commands per store does (the main window's); a dialog's borrows the writes only
            store.engines_gone.connect(self._engines_gone)
            store.runner_needed.connect(self.ensure_runner)
            app = QCoreApplication.instance()
            if app is not None:  # what was deleted this session goes for good when the studio quits
                app.aboutToQuit.connect(self.empty_trash)

    @property
    def db(self) -> RunDB:
        return self.store.db

    # -- runs ----------------------------------------------------------------------------------------
    def reap_crashed(self) -> list[str]:
        """Mark live rows of this host whose engine process has ended as crashed."""
        crashed = self.db.reap_crashed()
        if crashed:
            self.store.refresh(full=False)
        return crashed

    def _engines_gone(self, _run_ids: list) -> None:
        self.reap_crashed()

    def save_annotations(self, run_id: str, tags: list[str], notes: str) -> None:
        save_annotations(self.db, run_id, tags, notes)
        self.store.refresh()

    def set_archived(self, run_id: str, archived: bool) -> None:
        set_archived(self.db, run_id, archived)
        self.store.refresh()

    def delete_run(self, run_id: str, remove_folder: bool = True) -> Path | None:
        """Raises RunBusyError while the run's engine is alive, KeyError for an unknown run."""
        folder = delete_run(self.db, run_id, remove_folder)
        self.store.refresh()
        return folder

    # -- the trash (Delete with Undo) ----------------------------------------------------------------
    def trash_run(self, run_id: str) -> dict:
        """Delete with Undo: the run leaves every list, rows and folder kept until the trash is emptied.
        Raises RunBusyError while its engine is alive, KeyError for an unknown run."""
        return run_trash.trash_run(self.store, run_id)

    def restore_run(self, run_id: str | None = None) -> dict | None:
        """Undo a delete (the last one by default)."""
        return run_trash.restore_run(self.store, run_id)

    def empty_trash(self) -> tuple[list[str], list[str]]:
        """Delete the trashed runs for good: (deleted ids, ids kept because their engine is alive)."""
        out = run_trash.empty_trash(self.store)
        if out[0]:
            self.store.refresh()
        return out

    # -- the queue -----------------------------------------------------------------------------------
    def queue_add(self, config_text: str, config_name: str, sets: list[str], runs_dir: str, cwd: str) -> int:
        """Queue one run from the form (no sweep); returns its entry id."""
        (entry_id,) = self.queue.add([{"config_text": config_text, "config_name": config_name, "sets": sets,
                                       "runs_dir": runs_dir, "cwd": cwd, "label": config_name}])
        self.store.refresh(full=False)
        return entry_id

    def queue_sweep(self, request) -> tuple[str, list[int]]:
        """Queue a sweep exactly as ``mediswift sweep`` would (``sweep_commands.SweepRequest``): its id and
        entry ids. Raises InputError, with nothing written, for what the command would refuse."""
        from studio.commands.sweep_commands import queue_sweep

        try:
            return queue_sweep(self.db, request)
        finally:
            self.store.refresh(full=False)

    def queue_set_paused(self, paused: bool) -> None:
        self.queue.set_paused(paused)
        self.store.refresh(full=False)

    def queue_set_parallel(self, n: int) -> None:
        self.queue.set_parallel(n)
        self.store.refresh(full=False)

    def queue_move(self, entry_id: int, to: int) -> None:
        """Raises InputError for a place the entry cannot take."""
        try:
            self.queue.move(entry_id, to)
        finally:
            self.store.refresh(full=False)

    def queue_cancel(self, entry_ids: list[int]) -> list[str]:
        lines = self.queue.cancel(entry_ids)
        self.store.refresh(full=False)
        return lines

    def ensure_runner(self) -> int | None:
        """Start ``mediswift queue work`` detached (it outlives the studio) when entries may start, unless
        one was just started."""
        if time.monotonic() - self.runner_started_at < RUNNER_RETRY_S:
            return None
        if not self.queue.ready():  # (it also ends entries whose predecessor ended otherwise)
            return None
        self.runner_started_at = time.monotonic()
        proc = QProcess()
        proc.setProgram(sys.executable)
        proc.setArguments(["-m", "engine", "queue", "work", "--db", str(self.db.path)])
        proc.setProcessEnvironment(engine_env())
        log = str(self.db.path.with_name("queue-runner.log"))
        proc.setStandardOutputFile(log, QProcess.OpenModeFlag.Append)
        proc.setStandardErrorFile(log, QProcess.OpenModeFlag.Append)
        started = proc.startDetached()  # PySide6: a bool, or (bool, pid) in some versions
        ok, pid = started if isinstance(started, tuple) else (started, None)
        if not ok:
            self.runner_failed.emit("could not start the queue runner (mediswift queue work)")
            return None
        if pid:
            self.runner_pids.append(pid)
        return pid
