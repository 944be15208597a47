"""Tags, free-text notes, archive and delete for one run: the editor under the runs browser, or a dialog.

What the buttons change is written by ``studio.commands`` (``Commands.save_annotations``, ``set_archived``,
``trash_run`` or ``delete_run``); this view asks first where there is no way back and shows the result.
Under the runs browser, Delete puts the run in the trash at once (Undo brings it back, nothing is removed
until the trash is emptied); elsewhere it deletes for good after a yes. Deleting is refused while the
run's engine process is alive (it is the writer).
"""
from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QMessageBox, QPlainTextEdit, QPushButton, QVBoxLayout,
    QWidget,
)

from studio.commands.run_commands import Commands, RunBusyError, is_live, parse_tags, run_folder
from studio.models.run_store import RunStore


def ask(parent: QWidget, title: str, text: str) -> bool:
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

    def __init__(self, store: RunStore, commands: Commands, run_id: str | None = None, parent: QWidget | None = None,
                 *, use_trash: bool = False):
        super().__init__(parent)
        self.store, self.commands = store, commands
        self.use_trash = use_trash  # Delete puts the run in the trash (with Undo) instead of asking, then deleting
        self.run_id: str | None = None
        self.confirm: Callable[[QWidget, str, str], bool] = ask
        self.title = QLabel()
        self.tags = QLineEdit(placeholderText="comma-separated, e.g. sparse, baseline", objectName="tags")
        self.notes = QPlainTextEdit(objectName="notes")
        self.notes.setPlaceholderText("What was this run for? What did it show?")
        self.save_button = QPushButton("Save", objectName="save")
        self.save_button.clicked.connect(self.save)
        self.archive_button = QPushButton("Archive", objectName="archive")
        self.archive_button.clicked.connect(self.toggle_archive)
        self.delete_button = QPushButton("Delete" if use_trash else "Delete…", objectName="delete")
        self.delete_button.setToolTip("To the trash: Undo brings it back; its rows and folder go when the trash is "
                                      "emptied" if use_trash else "Delete the run's rows and folder for good")
        self.delete_button.setStyleSheet("QPushButton:enabled { color: #c9302c; }")  # greyed like any button when off
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
        run = self.store.run(run_id) if run_id else None
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
            self.commands.save_annotations(self.run_id, parse_tags(self.tags.text()), self.notes.toPlainText())
            self.saved.emit(self.run_id)

    def toggle_archive(self) -> None:
        run = self.store.run(self.run_id) if self.run_id else None
        if run is None:
            return
        archive = not run.get("archived")
        if archive and not self.confirm(self, "Archive run",
                                        f"Archive run {run['id']} ({run.get('name')})?\nIt is hidden from run lists "
                                        "(\"show archived\" brings it back); its data and folder are kept."):
            return
        self.commands.set_archived(run["id"], archive)
        self.set_run(run["id"])
        self.archived_changed.emit(run["id"], archive)

    def delete(self) -> bool:
        run = self.store.run(self.run_id) if self.run_id else None
        if run is None:
            return False
        if is_live(run):
            QMessageBox.warning(self, "Delete run", f"Run {run['id']} is {run['status']}; stop it before deleting it.")
            return False
        if self.use_trash:
            return self._trash(run)
        folder = run_folder(run)
        kids = self.store.children(run["id"])
        text = (f"Delete run {run['id']} ({run.get('name')}) for good?\n\n"
                f"Its metrics, evaluations, checkpoint records and artifacts are removed from the database"
                + (f", and its folder is deleted:\n{folder}" if folder else " (it has no run folder)") + ".")
        if kids:
            text += (f"\n\n{len(kids)} run(s) started from it ({', '.join(k['id'] for k in kids[:5])}) keep their own "
                     "data but lose this link in their lineage.")
        if not self.confirm(self, "Delete run", text):
            return False
        try:
            self.commands.delete_run(run["id"])
        except RunBusyError as e:
            QMessageBox.warning(self, "Delete run", str(e))
            return False
        rid = run["id"]
        self.set_run(None)
        self.deleted.emit(rid)
        return True

    def _trash(self, run: dict) -> bool:
        try:
            self.commands.trash_run(run["id"])
        except (RunBusyError, KeyError) as e:
            QMessageBox.warning(self, "Delete run", str(e))
            return False
        self.set_run(None)
        self.deleted.emit(run["id"])
        return True


class RunNotesDialog(QDialog):
    """``RunNotesEditor`` in a dialog; closes itself after a delete."""

    def __init__(self, store: RunStore, commands: Commands, run_id: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Run notes")
        self.editor = RunNotesEditor(store, commands, run_id, self)
        self.editor.deleted.connect(lambda _rid: self.accept())
        self.editor.saved.connect(lambda _rid: self.accept())
        lay = QVBoxLayout(self)
        lay.addWidget(self.editor)
        self.resize(520, 360)
