"""The Queue view: every queued, running and finished entry of the run queue, in order, each with its
run's step, progress and time left, with pause and resume, how many runs at once, move up/down, cancel,
the way to a run and to its sweep's study, and **New sweep…** (``sweep_dialog``). An empty queue shows
how to fill it instead of an empty table.

The queue lives in the run database and is worked by a runner process of its own (``mediswift queue
work``) that the studio's commands start, detached, whenever entries wait and none works them: closing
the studio changes nothing for the queue, and a reopened studio shows it as it stands. The view follows
the run store's ``queue_changed`` (entries) and ``runs_progressed`` (their runs' steps, at most once a
second); its buttons go through ``studio.commands``.
"""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView, QHBoxLayout, QLabel, QPushButton, QSpinBox, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget,
)

from engine.core.errors import InputError
from studio.commands.run_commands import Commands
from studio.models.labels import STATUS_COLORS
from studio.models.queue_progress import entry_progress
from studio.models.run_store import MAX_PARALLEL, RUNNING, WAITING, RunStore
from studio.models.throttle import Throttle
from studio.widgets.progress_delegate import PROGRESS_ROLE, ProgressDelegate

COLUMNS = ("#", "Sweep", "Point", "Stage", "Status", "Run", "Step", "Progress", "ETA", "Started", "Note")
STEP, PROGRESS, ETA = (COLUMNS.index(c) for c in ("Step", "Progress", "ETA"))
PROGRESS_MS = 1000  # while runs progress, their steps and ETAs are re-read at most this often
EMPTY_HINT = ("<p><b>The queue is empty.</b></p>"
              "<p><b>New sweep…</b> queues a grid of runs (keys and values, an equal-FLOPs budget, chained "
              "fine-tuning or prompting); <b>Add to queue</b> in the New run form queues one run.</p>"
              "<p>From a terminal: <code>mediswift sweep CONFIG --grid KEY=V1,V2</code>.</p>")


class QueueView(QWidget):
    run_activated = Signal(str)    # run id
    study_requested = Signal(str)  # sweep id

    def __init__(self, store: RunStore, commands: Commands, parent: QWidget | None = None):
        super().__init__(parent)
        self.store, self.commands = store, commands
        self.entries: list[dict] = []
        self.paused = False
        self.last_sweep: tuple[str, list[int]] | None = None  # what the New sweep dialog queued last
        self._build()
        self._progress_stale = False  # runs progressed while the view was hidden
        self.progress = Throttle(self._progress_due, PROGRESS_MS, self)
        store.queue_changed.connect(self.refresh)
        store.runs_progressed.connect(self.progress.request)
        store.status_changed.connect(self._run_status)
        commands.runner_failed.connect(self.message.setText)
        self.refresh()

    def _build(self) -> None:
        self.state_label = QLabel(objectName="queue_state")
        self.pause_button = QPushButton("Pause queue", objectName="pause_queue")
        self.pause_button.setToolTip("Start no more runs; running ones go on")
        self.pause_button.clicked.connect(self.toggle_pause)
        self.parallel = QSpinBox(objectName="parallel", minimum=1, maximum=MAX_PARALLEL, prefix="runs at once: ")
        self.parallel.setToolTip("How many queued runs may train at the same time (they share this machine)")
        self.parallel.valueChanged.connect(self._parallel_changed)
        self.sweep_button = QPushButton("New sweep…", objectName="new_sweep")
        self.sweep_button.setToolTip("Queue a grid of runs, as `mediswift sweep` does")
        self.sweep_button.clicked.connect(lambda: self.new_sweep())
        bar = QHBoxLayout()
        bar.addWidget(self.state_label, 1)
        bar.addWidget(self.sweep_button)
        bar.addWidget(self.parallel)
        bar.addWidget(self.pause_button)

        self.tree = QTreeWidget(objectName="queue_entries")
        self.tree.setColumnCount(len(COLUMNS))
        self.tree.setHeaderLabels(list(COLUMNS))
        self.tree.setRootIsDecorated(False)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.tree.itemSelectionChanged.connect(self._selection_changed)
        self.tree.itemDoubleClicked.connect(lambda *_: self.open_selected())
        for i, w in enumerate((40, 150, 200, 80, 80, 72, 80, 130, 80, 70)):
            self.tree.setColumnWidth(i, w)
        self.tree.setItemDelegateForColumn(PROGRESS, ProgressDelegate(self.tree))
        self.empty_hint = QLabel(EMPTY_HINT, objectName="queue_empty")
        self.empty_hint.setWordWrap(True)
        self.empty_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_hint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.up_button = QPushButton("Move up", objectName="move_up")
        self.down_button = QPushButton("Move down", objectName="move_down")
        self.cancel_button = QPushButton("Cancel", objectName="cancel_entries")
        self.cancel_button.setToolTip("A waiting entry never starts; a running one stops with a final checkpoint")
        self.open_button = QPushButton("Open run", objectName="open_run")
        self.study_button = QPushButton("Study sweep", objectName="open_study")
        self.study_button.setToolTip("Validation loss against training FLOPs per sparsity, downstream scores, table")
        self.up_button.clicked.connect(lambda: self.move_selected(-1))
        self.down_button.clicked.connect(lambda: self.move_selected(+1))
        self.cancel_button.clicked.connect(self.cancel_selected)
        self.open_button.clicked.connect(self.open_selected)
        self.study_button.clicked.connect(self._study_selected)
        actions = QHBoxLayout()
        for b in (self.up_button, self.down_button, self.cancel_button):
            actions.addWidget(b)
        actions.addStretch(1)
        actions.addWidget(self.open_button)
        actions.addWidget(self.study_button)
        self.message = QLabel(objectName="queue_message")
        self.message.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(self.tree, 1)
        lay.addWidget(self.empty_hint, 1)
        lay.addLayout(actions)
        lay.addWidget(self.message)
        self._selection_changed()

    # -- reading ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        state = self.store.queue_state()
        self.paused = bool(state["paused"])
        sweeps = {s["id"]: s["name"] for s in self.store.sweeps()}
        self.entries = self.store.queue_entries()
        selected = self.selected_ids()
        self.tree.blockSignals(True)
        self.tree.clear()
        for e in self.entries:
            started = time.strftime("%H:%M:%S", time.localtime(e["started_at"])) if e["started_at"] else ""
            status = e["status"] if e["status"] != RUNNING or e["run_id"] else "starting"
            item = QTreeWidgetItem([str(e["id"]), sweeps.get(e["sweep_id"], ""), e["label"] or e["config_name"],
                                    e["stage"], status, e["run_id"] or "", "", "", "", started,
                                    e["error"] if e["status"] not in (WAITING, RUNNING, "completed") else ""])
            item.setData(0, Qt.ItemDataRole.UserRole, e["id"])
            item.setForeground(4, QColor(STATUS_COLORS.get(e["status"], "#555")))
            item.setToolTip(2, " ".join(e["sets"]))
            self.tree.addTopLevelItem(item)
            item.setSelected(e["id"] in selected)
        self.tree.blockSignals(False)
        self.tree.setVisible(bool(self.entries))
        self.empty_hint.setVisible(not self.entries)
        self.update_progress()
        waiting = sum(1 for e in self.entries if e["status"] == WAITING)
        running = sum(1 for e in self.entries if e["status"] == RUNNING)
        runner = self.store.runner_pid()
        self.state_label.setText(
            f"<b>{'paused' if state['paused'] else 'active'}</b> · {running} running · {waiting} waiting · "
            + (f"runner pid {runner}" if runner else "no runner (none needed)" if not waiting or state["paused"]
               else "starting a runner…"))
        self.pause_button.setText("Resume queue" if state["paused"] else "Pause queue")
        self.parallel.blockSignals(True)
        self.parallel.setValue(state["parallel"])
        self.parallel.blockSignals(False)
        self._selection_changed()

    def _run_status(self, _run_id: str, _status: str) -> None:
        self.progress.request()

    def _progress_due(self) -> None:
        if self.isVisible():
            self.update_progress()
        else:
            self._progress_stale = True

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._progress_stale:
            self.update_progress()

    def update_progress(self) -> None:
        """Each entry's run: step of planned steps, share done, time left at its pace so far (running runs'
        last rows are read in one query; an ended run's come from its summary)."""
        self.progress.cancel()
        self._progress_stale = False
        runs = {e["run_id"]: self.store.known_run(e["run_id"]) for e in self.entries if e["run_id"]}
        live = [rid for rid, r in runs.items() if r is not None and (r["status"] == "running"
                                                                  or "step" not in (r.get("summary") or {}))]
        last = self.store.last_points("loss", live)
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            rid = item.text(COLUMNS.index("Run"))
            p = entry_progress(runs.get(rid), last.get(rid))  # (no run yet: blank cells)
            item.setText(STEP, p.step_text)
            item.setText(PROGRESS, p.percent_text)
            item.setData(PROGRESS, PROGRESS_ROLE, p.fraction)
            item.setText(ETA, p.eta_text)
            item.setToolTip(ETA, "time left at the run's mean pace so far" if p.eta_text else "")

    def selected_ids(self) -> list[int]:
        return [it.data(0, Qt.ItemDataRole.UserRole) for it in self.tree.selectedItems()]

    def select(self, entry_ids) -> None:
        for i in range(self.tree.topLevelItemCount()):
            it = self.tree.topLevelItem(i)
            it.setSelected(it.data(0, Qt.ItemDataRole.UserRole) in set(entry_ids))

    def _selected_entries(self) -> list[dict]:
        ids = set(self.selected_ids())
        return [e for e in self.entries if e["id"] in ids]

    def _selection_changed(self) -> None:
        sel = self._selected_entries()
        self.up_button.setEnabled(len(sel) == 1 and sel[0]["status"] == WAITING and not sel[0]["after_id"])
        self.down_button.setEnabled(self.up_button.isEnabled())
        self.cancel_button.setEnabled(any(e["status"] in (WAITING, RUNNING) for e in sel))
        self.open_button.setEnabled(len(sel) == 1 and bool(sel[0]["run_id"]))
        self.study_button.setEnabled(len(sel) >= 1 and bool(sel[0]["sweep_id"]))

    # -- changing ---------------------------------------------------------------------------------
    def toggle_pause(self) -> None:
        paused = not self.store.queue_state()["paused"]
        self.commands.queue_set_paused(paused)
        self.message.setText("paused: no new runs start; running ones go on" if paused else "resumed")
        self.refresh()

    def _parallel_changed(self, n: int) -> None:
        self.commands.queue_set_parallel(n)
        self.message.setText(f"up to {n} run(s) at once")

    def move_selected(self, delta: int) -> None:
        (e,) = self._selected_entries()
        heads = [x for x in self.entries if x["status"] == WAITING and not x["after_id"]]
        place = next(i for i, x in enumerate(heads) if x["id"] == e["id"]) + 1
        try:
            self.commands.queue_move(e["id"], place + delta)
        except InputError as err:
            self.message.setText(str(err))
        self.refresh()
        self.select([e["id"]])
        self._selection_changed()

    def cancel_selected(self) -> list[str]:
        lines = self.commands.queue_cancel([e["id"] for e in self._selected_entries()
                                            if e["status"] in (WAITING, RUNNING)])
        self.message.setText("; ".join(lines))
        self.refresh()
        return lines

    def open_selected(self) -> None:
        sel = self._selected_entries()
        if len(sel) == 1 and sel[0]["run_id"]:
            self.run_activated.emit(sel[0]["run_id"])

    def _study_selected(self) -> None:
        sel = self._selected_entries()
        if sel and sel[0]["sweep_id"]:
            self.study_requested.emit(sel[0]["sweep_id"])

    def new_sweep(self, runs_dir: str | Path | None = None) -> tuple[str, list[int]] | None:
        """The New sweep dialog; what it queued (sweep id, entry ids), or None when cancelled. ``runs_dir``:
        where the runs' folders go (default: the window's, else next to the database)."""
        from studio.views.sweep_dialog import SweepDialog  # a dialog: imported when asked for

        runs_dir = runs_dir or getattr(self.window(), "runs_dir", None)
        dlg = SweepDialog(self.store, self.commands, runs_dir, self)
        if dlg.exec() != SweepDialog.DialogCode.Accepted or dlg.queued is None:
            return None
        self.last_sweep = dlg.queued
        sweep_id, ids = dlg.queued
        self.message.setText(f"queued sweep {sweep_id} ({dlg.queued_name}): entries {ids[0]}–{ids[-1]}")
        self.refresh()
        return dlg.queued

    def add_run(self, config_text: str, config_name: str, sets: list[str], runs_dir: str, cwd: str) -> int:
        """Queue one run from the form (no sweep); returns its entry id."""
        entry_id = self.commands.queue_add(config_text, config_name, sets, runs_dir, cwd)
        self.message.setText(f"queued as entry {entry_id}")
        self.refresh()
        return entry_id
