"""Tags, free-text notes, archive and delete for one run.

Tags (runs.tags, a JSON list) and notes (runs.notes) are the user's annotations: the only run
columns the studio writes, besides the ``archived`` flag. Archiving hides a run from default lists
and keeps everything (rows and folder); deleting removes its database rows *and* its run folder,
after a confirmation, and is refused while the run's engine process is alive (it is the writer).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QMessageBox, QPlainTextEdit, QPushButton, QVBoxLayout,
    QWidget,
)

from engine.store.rundb import LIVE_STATUSES, RunDB, pid_alive


class RunBusyError(RuntimeError):
    pass


# -- database operations (no widgets; the CLI or tests can call them) -------------------------------


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


def search_runs(db: RunDB, text: str, include_archived: bool = False) -> list[dict]:
    """Runs whose id, name, stage, status, tags or notes contain every word of ``text`` (case-insensitive)."""
    words = text.lower().split()
    out = []
    for r in db.list_runs(include_archived=include_archived):
        hay = " ".join([r["id"], r.get("name") or "", r["stage"], r["status"], " ".join(r.get("tags") or []),
                        r.get("notes") or ""]).lower()
        if all(w in hay for w in words):
            out.append(r)
    return out


def children(db: RunDB, run_id: str) -> list[dict]:
    return [r for r in db.list_runs() if r.get("parent_id") == run_id]


def is_live(run: dict) -> bool:
    return run["status"] in LIVE_STATUSES and pid_alive(run.get("pid"), run.get("pid_start"))


def run_folder(run: dict) -> Path | None:
    """The run's folder, only if it is one: named after the run id, so a bad run_dir never deletes more."""
    p = Path(run.get("run_dir") or "")
    return p if run.get("run_dir") and p.name == run["id"] and p.is_dir() else None


def delete_run(db: RunDB, run_id: str, remove_folder: bool = True) -> Path | None:
    """Delete the run's rows (metrics, evaluations, checkpoints, artifacts, run) and its folder."""
    run = db.get_run(run_id)
    if run is None:
        raise KeyError(run_id)
    if is_live(run):
        raise RunBusyError(f"run {run['id']} is {run['status']} (pid {run['pid']}); stop it before deleting it")
    folder = run_folder(run) if remove_folder else None
    db.delete_run(run["id"])
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


# -- widget -----------------------------------------------------------------------------------------


def _ask(parent: QWidget, title: str, text: str) -> bool:
    answer = QMessageBox.question(parent, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
                                  QMessageBox.StandardButton.Cancel)
    return answer == QMessageBox.StandardButton.Yes


class RunNotesEditor(QWidget):
    """Edit one run's tags and notes; archive/unarchive; delete (confirmed).

    Signals: ``saved(str)``, ``archived_changed(str, bool)``, ``deleted(str)`` with the run id.
    ``confirm`` is the yes/no question asked before deleting or archiving (replaceable in tests).
    """

    saved = Signal(str)
    archived_changed = Signal(str, bool)
    deleted = Signal(str)

    def __init__(self, db: RunDB, run_id: str | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.db = db
        self.run_id: str | None = None
        self.confirm: Callable[[QWidget, str, str], bool] = _ask
        self.title = QLabel()
        self.tags = QLineEdit(placeholderText="comma-separated, e.g. sparse, baseline", objectName="tags")
        self.notes = QPlainTextEdit(objectName="notes")
        self.notes.setPlaceholderText("What was this run for? What did it show?")
        self.save_button = QPushButton("Save", objectName="save")
        self.save_button.clicked.connect(self.save)
        self.archive_button = QPushButton("Archive", objectName="archive")
        self.archive_button.clicked.connect(self.toggle_archive)
        self.delete_button = QPushButton("Delete…", objectName="delete")
        self.delete_button.setStyleSheet("color: #c9302c")
        self.delete_button.clicked.connect(self.delete)
        form = QFormLayout()
        form.addRow("Tags", self.tags)
        form.addRow("Notes", self.notes)
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addStretch(1)
        buttons.addWidget(self.archive_button)
        buttons.addWidget(self.delete_button)
        lay = QVBoxLayout(self)
        lay.addWidget(self.title)
        lay.addLayout(form)
        lay.addLayout(buttons)
        self.set_run(run_id)

    def set_run(self, run_id: str | None) -> None:
        run = self.db.get_run(run_id) if run_id else None
        self.run_id = run["id"] if run else None
        for w in (self.tags, self.notes, self.save_button, self.archive_button, self.delete_button):
            w.setEnabled(run is not None)
        if run is None:
            self.title.setText("no run selected")
            self.tags.clear()
            self.notes.clear()
            return
        self.title.setText(f"<b>{run.get('name') or run['id']}</b> [{run['id']}] · {run['stage']} · {run['status']}"
                           + (" · <i>archived</i>" if run.get("archived") else ""))
        self.tags.setText(", ".join(run.get("tags") or []))
        self.notes.setPlainText(run.get("notes") or "")
        self.archive_button.setText("Unarchive" if run.get("archived") else "Archive")

    def save(self) -> None:
        if self.run_id:
            save_annotations(self.db, self.run_id, parse_tags(self.tags.text()), self.notes.toPlainText())
            self.saved.emit(self.run_id)

    def toggle_archive(self) -> None:
        run = self.db.get_run(self.run_id) if self.run_id else None
        if run is None:
            return
        archive = not run.get("archived")
        if archive and not self.confirm(self, "Archive run",
                                        f"Archive run {run['id']} ({run.get('name')})?\nIt is hidden from run lists "
                                        "(\"show archived\" brings it back); its data and folder are kept."):
            return
        set_archived(self.db, run["id"], archive)
        self.set_run(run["id"])
        self.archived_changed.emit(run["id"], archive)

    def delete(self) -> bool:
        run = self.db.get_run(self.run_id) if self.run_id else None
        if run is None:
            return False
        if is_live(run):
            QMessageBox.warning(self, "Delete run", f"Run {run['id']} is {run['status']}; stop it before deleting it.")
            return False
        folder = run_folder(run)
        kids = children(self.db, run["id"])
        text = (f"Delete run {run['id']} ({run.get('name')}) for good?\n\n"
                f"Its metrics, evaluations, checkpoint records and artifacts are removed from the database"
                + (f", and its folder is deleted:\n{folder}" if folder else " (it has no run folder)") + ".")
        if kids:
            text += (f"\n\n{len(kids)} run(s) started from it ({', '.join(k['id'] for k in kids[:5])}) keep their own "
                     "data but lose this link in their lineage.")
        if not self.confirm(self, "Delete run", text):
            return False
        try:
            delete_run(self.db, run["id"])
        except RunBusyError as e:
            QMessageBox.warning(self, "Delete run", str(e))
            return False
        rid = run["id"]
        self.set_run(None)
        self.deleted.emit(rid)
        return True


class RunNotesDialog(QDialog):
    """``RunNotesEditor`` in a dialog; closes itself after a delete."""

    def __init__(self, db: RunDB, run_id: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Run notes")
        self.editor = RunNotesEditor(db, run_id, self)
        self.editor.deleted.connect(lambda _rid: self.accept())
        self.editor.saved.connect(lambda _rid: self.accept())
        lay = QVBoxLayout(self)
        lay.addWidget(self.editor)
        self.resize(520, 360)
