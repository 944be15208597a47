"""Every run in the database: status, stage, lineage (parent → child tree), tags and notes, with filter
and search. Opening a run shows its charts from the database; a live one keeps filling (re-attach).
"""
from __future__ import annotations

import json
import time

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox, QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QPushButton,
    QSplitter, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget,
)

from engine.config import ConfigError, from_dict
from engine.rundb import RunDB

from . import formatting as fmt
from .run_form import STAGE_LABELS
from .run_view import STATUS_COLORS

COLUMNS = ("Name", "Id", "Stage", "Status", "Steps", "Loss", "Val loss", "Created", "Tags", "Notes")
REFRESH_MS = 3000


def run_matches(run: dict, text: str, status: str, stage: str) -> bool:
    if status and run["status"] != status:
        return False
    if stage and run["stage"] != stage:
        return False
    if not text:
        return True
    hay = " ".join([run["id"], run.get("name") or "", run.get("notes") or "", " ".join(run.get("tags") or []),
                    run["stage"], run["status"]]).lower()
    return all(word in hay for word in text.lower().split())


class RunsBrowser(QWidget):
    open_requested = Signal(str)
    clone_requested = Signal(str)
    resume_requested = Signal(str)

    def __init__(self, db: RunDB, parent: QWidget | None = None):
        super().__init__(parent)
        self.db = db
        self.runs: dict[str, dict] = {}
        self._current: str | None = None
        self._build()
        self.timer = QTimer(self, interval=REFRESH_MS)
        self.timer.timeout.connect(self._auto_refresh)
        self.timer.start()
        self.refresh()

    def _build(self) -> None:
        bar = QHBoxLayout()
        self.search = QLineEdit(placeholderText="search name, id, tags, notes…", objectName="search")
        self.search.textChanged.connect(self.refresh)
        self.status_filter = QComboBox(objectName="status_filter")
        self.status_filter.addItem("any status", "")
        for s in ("running", "paused", "completed", "stopped", "failed", "crashed", "created"):
            self.status_filter.addItem(s, s)
        self.status_filter.currentIndexChanged.connect(self.refresh)
        self.stage_filter = QComboBox(objectName="stage_filter")
        self.stage_filter.addItem("any stage", "")
        for k, label in STAGE_LABELS.items():
            self.stage_filter.addItem(label, k)
        self.stage_filter.currentIndexChanged.connect(self.refresh)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        bar.addWidget(self.search, 1)
        bar.addWidget(self.status_filter)
        bar.addWidget(self.stage_filter)
        bar.addWidget(refresh)

        self.tree = QTreeWidget(objectName="runs_tree")
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.setAlternatingRowColors(True)
        self.tree.setSortingEnabled(False)
        self.tree.setUniformRowHeights(True)
        self.tree.itemDoubleClicked.connect(lambda item, _c: self.open_requested.emit(item.data(0, Qt.ItemDataRole.UserRole)))
        self.tree.currentItemChanged.connect(self._selected)
        for i, w in enumerate((170, 72, 130, 76, 50, 60, 64, 112, 110)):
            self.tree.setColumnWidth(i, w)

        # details of the selected run
        side = QWidget()
        form = QFormLayout(side)
        self.detail = QLabel(objectName="run_detail")
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.tags_edit = QLineEdit(placeholderText="comma-separated", objectName="tags")
        self.notes_edit = QPlainTextEdit(objectName="notes")
        self.notes_edit.setMaximumHeight(90)
        save = QPushButton("Save tags and notes")
        save.clicked.connect(self.save_meta)
        self.config_view = QPlainTextEdit(objectName="run_config")
        self.config_view.setReadOnly(True)
        self.config_view.setStyleSheet("font-family: monospace; font-size: 11px;")
        actions = QHBoxLayout()
        self.action_buttons = {}
        for key, text, sig in (("open", "Open charts", self.open_requested), ("clone", "Clone config", self.clone_requested),
                               ("resume", "Resume", self.resume_requested)):
            b = QPushButton(text, objectName=f"browser:{key}")
            b.clicked.connect(lambda _=False, s=sig: self._current and s.emit(self._current))
            b.setEnabled(False)
            self.action_buttons[key] = b
            actions.addWidget(b)
        form.addRow(self.detail)
        form.addRow(actions)
        form.addRow("Tags", self.tags_edit)
        form.addRow("Notes", self.notes_edit)
        form.addRow(save)
        form.addRow(QLabel("<b>Configuration</b>"))
        form.addRow(self.config_view)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.tree)
        split.addWidget(side)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setSizes([1000, 560])
        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(split, 1)

    # -- data ------------------------------------------------------------------------------------------
    def _auto_refresh(self) -> None:
        if self.isVisible():
            self.refresh()

    def _last_values(self) -> dict[tuple[str, str], float]:
        """Latest loss per run in one query (the browser must stay fast with thousands of runs)."""
        sql = ("SELECT m.run_id, m.name, m.value, m.step FROM metrics m JOIN (SELECT run_id, name, MAX(step) s FROM "
               "metrics WHERE name = 'loss' GROUP BY run_id, name) t ON m.run_id = t.run_id AND m.name = t.name "
               "AND m.step = t.s")
        return {(r[0], r[1]): (r[2], r[3]) for r in self.db.db.execute(sql).fetchall()}

    def refresh(self) -> None:
        self.db.reap_crashed()
        runs = self.db.list_runs()
        self.runs = {r["id"]: r for r in runs}
        last = self._last_values()
        vals = {}
        for r in self.db.db.execute("SELECT run_id, metrics FROM evaluations WHERE split = 'val' ORDER BY id").fetchall():
            vals[r[0]] = json.loads(r[1] or "{}").get("loss")
        text = self.search.text().strip()
        status, stage = self.status_filter.currentData(), self.stage_filter.currentData()
        shown = {rid for rid, r in self.runs.items() if run_matches(r, text, status, stage)}
        # keep ancestors of matches so lineage stays readable
        for rid in list(shown):
            p = self.runs[rid].get("parent_id")
            while p and p in self.runs and p not in shown:
                shown.add(p)
                p = self.runs[p].get("parent_id")
        current = self._current
        self.tree.clear()
        items: dict[str, QTreeWidgetItem] = {}
        for r in sorted((self.runs[i] for i in shown), key=lambda r: r["created_at"]):
            loss = last.get((r["id"], "loss"))
            item = QTreeWidgetItem([
                r.get("name") or "", r["id"], STAGE_LABELS.get(r["stage"], r["stage"]), r["status"],
                f"{loss[1]:,}" if loss else "", f"{loss[0]:.4f}" if loss else "",
                f"{vals[r['id']]:.4f}" if vals.get(r["id"]) is not None else "",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])), ", ".join(r.get("tags") or []),
                (r.get("notes") or "").splitlines()[0] if r.get("notes") else "",
            ])
            item.setData(0, Qt.ItemDataRole.UserRole, r["id"])
            item.setForeground(3, QColor(STATUS_COLORS.get(r["status"], "#333")))
            parent = items.get(r.get("parent_id") or "")
            (parent.addChild(item) if parent else self.tree.addTopLevelItem(item))
            items[r["id"]] = item
        self.tree.expandAll()
        if current in items:
            self.tree.setCurrentItem(items[current])

    def item_for(self, run_id: str) -> QTreeWidgetItem | None:
        for i in range(self.tree.topLevelItemCount()):
            stack = [self.tree.topLevelItem(i)]
            while stack:
                it = stack.pop()
                if it.data(0, Qt.ItemDataRole.UserRole) == run_id:
                    return it
                stack.extend(it.child(j) for j in range(it.childCount()))
        return None

    def _selected(self, item: QTreeWidgetItem | None, _prev=None) -> None:
        run_id = item.data(0, Qt.ItemDataRole.UserRole) if item else None
        same = run_id == self._current
        self._current = run_id
        run = self.runs.get(run_id) if run_id else None
        for b in self.action_buttons.values():
            b.setEnabled(run is not None)
        if run is None:
            self.detail.setText("")
            return
        self.action_buttons["resume"].setEnabled(run["status"] in ("stopped", "crashed", "failed"))
        ckpts = self.db.checkpoints(run_id)
        summary = run.get("summary") or {}
        lines = [f"<b>{run.get('name') or run_id}</b> ({run_id}) — {STAGE_LABELS.get(run['stage'], run['stage'])}",
                 f"status <b style='color:{STATUS_COLORS.get(run['status'], '#333')}'>{run['status']}</b>",
                 f"parent: {run.get('parent_id') or '—'}",
                 f"checkpoints: {len(ckpts)}" + (f", last at step {ckpts[-1]['step']}" if ckpts else ""),
                 f"folder: {run.get('run_dir') or '—'}"]
        if run.get("started_at") and run.get("finished_at"):
            lines.append(f"duration: {fmt.duration(run['finished_at'] - run['started_at'])}")
        if summary:
            lines.append("summary: " + ", ".join(f"{k} {fmt.number(v) if isinstance(v, (int, float)) else v}"
                                                 for k, v in list(summary.items())[:8]))
        if run.get("error"):
            lines.append(f"<span style='color:#c9302c'>error: {run['error']}</span>")
        self.detail.setText("<br>".join(lines))
        if not (same and (self.tags_edit.hasFocus() or self.notes_edit.hasFocus())):  # a refresh must not eat typing
            self.tags_edit.setText(", ".join(run.get("tags") or []))
            self.notes_edit.setPlainText(run.get("notes") or "")
        self.config_view.setPlainText(config_text(run.get("config") or {}))

    def select(self, run_id: str) -> None:
        item = self.item_for(run_id)
        if item is not None:
            self.tree.setCurrentItem(item)

    def save_meta(self) -> None:
        """Tags and notes are the user's annotations: the only columns the studio writes."""
        if not self._current:
            return
        tags = [t.strip() for t in self.tags_edit.text().split(",") if t.strip()]
        self.db.update_run(self._current, tags=tags, notes=self.notes_edit.toPlainText())
        self.refresh()


def config_text(config: dict) -> str:
    """TOML, as the user writes it; JSON if the current engine no longer accepts this old config."""
    try:
        return from_dict(config).to_toml()
    except ConfigError:
        return json.dumps(config, indent=2, sort_keys=True)


def pick_run(parent: QWidget, db: RunDB, title: str) -> str | None:
    """A small modal list of runs (for Clone…)."""
    dlg = QDialog(parent)
    dlg.setWindowTitle(title)
    dlg.resize(900, 500)
    browser = RunsBrowser(db, dlg)
    chosen: list[str] = []
    browser.open_requested.connect(lambda rid: (chosen.append(rid), dlg.accept()))
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(lambda: (browser._current and chosen.append(browser._current), dlg.accept()))
    buttons.rejected.connect(dlg.reject)
    lay = QVBoxLayout(dlg)
    lay.addWidget(browser)
    lay.addWidget(buttons)
    return chosen[0] if dlg.exec() == QDialog.DialogCode.Accepted and chosen else None
