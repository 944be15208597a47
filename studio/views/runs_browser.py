"""Every run in the database: status, stage, model (family and shape), lineage (parent → child tree)
with each stage's best score next to its majority and TF-IDF baselines, tags and notes, with filter and
search. Opening a run shows its charts from the database; a live one keeps filling (re-attach).
Several selected runs open in the Compare tab or export their metrics; one selected run exports its
config (TOML) or its model (Hugging Face).
Tags, notes, archive and delete use the one ``RunNotesEditor``; delete puts a run in the studio's trash
(``studio.commands.run_trash``), with Undo in a bar above the list. The list follows the run store: rebuilt
when a run appears, goes or changes (within a tick of the store's poll), and at most every few seconds
while live runs progress. Its columns sort by value (steps, FLOPs, scores and dates as numbers).
"""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtGui import QAction, QColor, QKeySequence, QPalette
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
    QLineEdit, QMessageBox, QPlainTextEdit, QPushButton, QSizePolicy, QSplitter, QTreeWidget, QTreeWidgetItem,
    QVBoxLayout, QWidget,
)

from engine.core.errors import InputError
from studio.commands.exports import FORMATS, write_config, write_metrics
from studio.commands.run_commands import Commands
from studio.models import formatting as fmt
from studio.models.config_form import shape_text
from studio.models.families import model_line, run_model
from studio.models.labels import STAGE_LABELS, STATUS_COLORS, STATUSES, exports_model, stage_text
from studio.models.lineage import BASELINES_TIP, best_scores, chain_html, score_text
from studio.models.run_details import config_text, detail_html
from studio.models.run_filter import run_matches
from studio.models.run_store import RunStore
from studio.models.throttle import Throttle
from studio.views.run_notes import RunNotesEditor, ask
from studio.widgets.sorted_items import SortedItem
from studio.widgets.trash_bar import TrashBar

COLUMNS = ("Name", "Id", "Stage", "Status", "Model", "Best score (baselines)", "Steps", "FLOPs", "Loss", "Val loss",
           "Created", "Tags", "Notes")
NAME, STATUS, MODEL, SCORE, STEPS, FLOPS, LOSS, VAL, CREATED, TAGS, NOTES = (COLUMNS.index(c) for c in (
    "Name", "Status", "Model", "Best score (baselines)", "Steps", "FLOPs", "Loss", "Val loss", "Created", "Tags",
    "Notes"))
WIDTHS = {"Name": 160, "Id": 66, "Stage": 128, "Status": 74, "Model": 200, "Steps": 54, "FLOPs": 86, "Loss": 58,
          "Val loss": 62, "Created": 112, "Tags": 110}
SCORE_MAX_W = 520  # the score column fits its longest text up to this width (the rest is in its tooltip)
REFRESH_MS = 3000  # while live runs progress, the list is rebuilt at most this often


class RunsBrowser(QWidget):
    open_requested = Signal(str)
    clone_requested = Signal(str)
    resume_requested = Signal(str)
    compare_requested = Signal(list)  # the selected run ids, in list order
    export_hf_requested = Signal(str)
    run_deleted = Signal(str)

    def __init__(self, store: RunStore, commands: Commands, parent: QWidget | None = None):
        super().__init__(parent)
        self.store, self.commands = store, commands
        self.runs: dict[str, dict] = {}
        self.scores: dict[str, dict] = {}
        self._current: str | None = None
        self._stale = False  # the store reported a change while the list was hidden
        self._score_width = 0  # the score column's width as last fitted (a user's own width stays until it changes)
        self.confirm = ask  # the question before emptying the trash (replaceable in tests)
        self._build()
        self.progress = Throttle(self._auto_refresh, REFRESH_MS, self)
        store.runs_changed.connect(self._runs_changed)
        store.runs_progressed.connect(self.progress.request)
        self.refresh()

    def _build(self) -> None:
        bar = QHBoxLayout()
        self.search = QLineEdit(placeholderText="search name, id, tags, notes…", objectName="search")
        self.search.textChanged.connect(self.refresh)
        self.status_filter = QComboBox(objectName="status_filter")
        self.status_filter.addItem("any status", "")
        for s in STATUSES:
            self.status_filter.addItem(s, s)
        self.status_filter.currentIndexChanged.connect(self.refresh)
        self.stage_filter = QComboBox(objectName="stage_filter")
        self.stage_filter.addItem("any stage", "")
        for k, label in STAGE_LABELS.items():
            self.stage_filter.addItem(label, k)
        self.stage_filter.currentIndexChanged.connect(self.refresh)
        self.archived_box = QCheckBox("show archived", objectName="show_archived")
        self.archived_box.toggled.connect(self.refresh)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        bar.addWidget(self.search, 1)
        bar.addWidget(self.status_filter)
        bar.addWidget(self.stage_filter)
        bar.addWidget(self.archived_box)
        bar.addWidget(refresh)

        self.tree = QTreeWidget(objectName="runs_tree")
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.headerItem().setToolTip(COLUMNS.index("Best score (baselines)"),
                                          "The run's best evaluation score. " + BASELINES_TIP)
        self.tree.setAlternatingRowColors(True)
        self.tree.setSortingEnabled(True)  # a header click sorts by value (SortedItem); oldest first to begin with
        self.tree.sortByColumn(CREATED, Qt.SortOrder.AscendingOrder)
        self.tree.setUniformRowHeights(True)
        # several runs selected (Ctrl/Shift-click) are compared or exported together
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.tree.itemDoubleClicked.connect(lambda item, _c: self.open_requested.emit(item.data(0, Qt.ItemDataRole.UserRole)))
        self.tree.currentItemChanged.connect(self._selected)
        self.tree.itemSelectionChanged.connect(self._selection_changed)
        for i, c in enumerate(COLUMNS):
            if c in WIDTHS:
                self.tree.setColumnWidth(i, WIDTHS[c])
        self.tree.headerItem().setToolTip(FLOPS, "Training FLOPs spent (the run's total once it ended)")
        self.tree.headerItem().setToolTip(MODEL, "The model's family (model.family) and shape: layers, width, "
                                                 "attention heads / key-value heads")
        delete = QAction("Delete", self.tree)  # the Delete key on the list: to the trash, with Undo
        delete.setShortcut(QKeySequence.StandardKey.Delete)
        delete.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)
        delete.triggered.connect(lambda: self.notes.delete())
        undo = QAction("Undo delete", self)
        undo.setShortcut(QKeySequence.StandardKey.Undo)
        undo.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        undo.triggered.connect(self.undo_delete)
        self.addAction(undo)
        self.trash_bar = TrashBar()
        self.trash_bar.undo_requested.connect(self.undo_delete)
        self.trash_bar.empty_requested.connect(self.empty_trash)

        # details of the selected run
        side = QWidget()
        form = QFormLayout(side)
        self.detail = QLabel(objectName="run_detail")
        self.detail.setWordWrap(True)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.pipeline = QLabel(objectName="pipeline")
        self.pipeline.setWordWrap(True)
        self.pipeline.setToolTip("The run's pipeline (vocabulary → sparse → dense → prompt), each stage with its best "
                                 "score and, in brackets, its majority-class (or zero-shot) and TF-IDF + logistic "
                                 "regression baselines")
        self.config_view = QPlainTextEdit(objectName="run_config")
        self.config_view.setReadOnly(True)
        self.config_view.setStyleSheet("font-family: monospace; font-size: 11px;")
        self.action_buttons: dict[str, QPushButton] = {}
        rows = (  # short rows: the side panel stays narrow enough for the list's score column at 1280 px
            (("open", "Open charts", lambda: self._emit_current(self.open_requested)),
             ("clone", "Clone config", lambda: self._emit_current(self.clone_requested)),
             ("resume", "Resume", lambda: self._emit_current(self.resume_requested))),
            (("compare", "Compare selected", self.compare_selected),
             ("export_metrics", "Export metrics…", lambda: self.export_metrics_dialog())),
            (("export_toml", "Export TOML…", lambda: self.export_toml_dialog()),
             ("export_hf", "Export to Hugging Face…", lambda: self._emit_current(self.export_hf_requested))),
        )
        tips = {"compare": "Overlay the selected runs (Ctrl/Shift-click to pick several) in the Compare tab",
                "export_metrics": "The selected runs' metric rows to one CSV, JSON or Parquet file",
                "export_toml": "This run's configuration as a TOML file (`mediswift train FILE` re-runs it)",
                "export_hf": "mediswift export-hf: the model as a transformers folder (GPT-2 layout + tokenizer + card)"}
        for row in rows:
            line = QHBoxLayout()
            for key, text, slot in row:
                b = QPushButton(text, objectName=f"browser:{key}")
                b.setToolTip(tips.get(key, ""))
                b.clicked.connect(lambda _=False, f=slot: f())
                b.setEnabled(False)
                self.action_buttons[key] = b
                line.addWidget(b)
                act = QAction(text, self.tree)  # the same actions on the list's context menu
                act.triggered.connect(lambda _=False, f=slot: f())
                self.tree.addAction(act)
            form.addRow(line)
        self.tree.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        self.notes = RunNotesEditor(self.store, self.commands, use_trash=True)
        self.tree.addAction(delete)
        self.notes.layout().setContentsMargins(0, 0, 0, 0)
        self.notes.title.hide()  # the details above already name the run
        self.notes.notes.setMaximumHeight(90)
        self.notes.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)
        # a save or an archive reaches the list as the store's runs_changed (at once when the list is shown)
        self.notes.saved.connect(lambda _rid: self._refresh_if_stale())
        self.notes.archived_changed.connect(lambda _rid, _on: self._refresh_if_stale())
        self.notes.deleted.connect(self._deleted)
        form.insertRow(0, self.detail)
        form.insertRow(1, QLabel("<b>Pipeline</b>"))
        form.insertRow(2, self.pipeline)
        form.addRow(self.notes)
        form.addRow(QLabel("<b>Configuration</b>"))
        form.addRow(self.config_view)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.tree)
        split.addWidget(side)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setSizes([1100, 460])
        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(self.trash_bar)
        lay.addWidget(split, 1)

    # -- data ------------------------------------------------------------------------------------------
    def _runs_changed(self) -> None:
        self._stale = True
        self._auto_refresh()

    def _refresh_if_stale(self) -> None:
        if self._stale:
            self.refresh()

    def _auto_refresh(self) -> None:
        if self.isVisible():
            self.refresh()
        else:
            self._stale = True

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.store.want_list(self, True)  # runs added or edited elsewhere show within seconds
        if self._stale:
            self.refresh()

    def hideEvent(self, event) -> None:
        self.store.want_list(self, False)
        super().hideEvent(event)

    def refresh(self) -> None:
        self._stale = False
        self.progress.last = time.monotonic()
        runs = self.store.runs(include_archived=self.archived_box.isChecked())
        self.runs = {r["id"]: r for r in runs}
        self.scores = best_scores(self.store.evaluations_by_run())
        last = self.store.last_points("loss")  # one query each: the browser must stay fast with thousands of runs
        vals = self.store.last_eval_metrics("val", "loss")
        text = self.search.text().strip()
        status, stage = self.status_filter.currentData(), self.stage_filter.currentData()
        shown = {rid for rid, r in self.runs.items() if run_matches(r, text, status, stage)}
        # keep ancestors of matches so lineage stays readable
        for rid in list(shown):
            p = self.runs[rid].get("parent_id")
            while p and p in self.runs and p not in shown:
                shown.add(p)
                p = self.runs[p].get("parent_id")
        current, selected = self._current, set(self.selected_ids())
        self.tree.blockSignals(True)  # a rebuild is not a new selection
        self.tree.setSortingEnabled(False)  # (sorted once, when every row is in)
        self.tree.clear()
        items: dict[str, QTreeWidgetItem] = {}
        for r in sorted((self.runs[i] for i in shown), key=lambda r: r["created_at"]):
            item = self._item(r, last.get(r["id"]), vals.get(r["id"]))
            if r.get("archived"):
                faint = self.tree.palette().color(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text)
                for c in range(len(COLUMNS)):
                    item.setForeground(c, faint)
            parent = items.get(r.get("parent_id") or "")
            (parent.addChild(item) if parent else self.tree.addTopLevelItem(item))
            items[r["id"]] = item
        self.tree.setSortingEnabled(True)  # sorts by the header's column and order
        self.tree.expandAll()
        self._fit_score_column(items.values())
        self.trash_bar.show_trash(self.store.hidden_runs())
        # keep the multi-selection across the periodic rebuild
        if current in items:
            self.tree.setCurrentItem(items[current], 0, QItemSelectionModel.SelectionFlag.NoUpdate)
        for rid in selected & set(items):
            items[rid].setSelected(True)
        self.tree.blockSignals(False)
        if current not in items:
            current = None
        self._selected(items.get(current) if current else None)
        self._selection_changed()

    def _item(self, r: dict, last: dict | None, val_loss: float | None) -> SortedItem:
        """One run's row: formatted text, and the value each column sorts by."""
        best = self.scores.get(r["id"])
        summary = r.get("summary") or {}
        flops = summary.get("flops") if summary.get("flops") is not None else (last or {}).get("flops")
        step = (last or {}).get("step")
        loss = (last or {}).get("value")
        texts = [""] * len(COLUMNS)
        texts[:4] = [r.get("name") or "", r["id"], stage_text(r["stage"]), r["status"]]
        model = run_model(r)
        texts[MODEL] = model_line(model) if model else ""
        texts[SCORE] = score_text(best)
        texts[STEPS] = f"{step:,}" if step is not None else ""
        texts[FLOPS] = fmt.flops(flops) if flops else ""
        texts[LOSS] = f"{loss:.4f}" if loss is not None else ""
        texts[VAL] = f"{val_loss:.4f}" if val_loss is not None else ""
        texts[CREATED] = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        texts[TAGS] = ", ".join(r.get("tags") or [])
        texts[NOTES] = (r.get("notes") or "").splitlines()[0] if r.get("notes") else ""
        score = next(iter(best["metrics"].values()), None) if best else None
        item = SortedItem(texts, {SCORE: score, STEPS: step, FLOPS: flops or None, LOSS: loss, VAL: val_loss,
                                  CREATED: r["created_at"]})
        item.setData(0, Qt.ItemDataRole.UserRole, r["id"])
        item.setToolTip(NAME, f"{texts[NAME]} ({r['id']})" if texts[NAME] else r["id"])
        item.setForeground(STATUS, QColor(STATUS_COLORS.get(r["status"], "#333")))
        item.setForeground(SCORE, self.tree.palette().color(QPalette.ColorRole.Link))  # (readable light or dark)
        if texts[SCORE]:
            item.setToolTip(SCORE, f"{texts[SCORE]}\n{BASELINES_TIP}")
        if model:
            item.setToolTip(MODEL, shape_text(model))
        if flops:
            item.setToolTip(FLOPS, f"{flops:,.0f} training FLOPs")
        return item

    def _fit_score_column(self, items) -> None:
        """Widen the score column to its longest text (not cut off), unless that has not changed since the
        last fit (a width the user dragged stays)."""
        metrics = self.tree.fontMetrics()
        header = self.tree.header().fontMetrics().horizontalAdvance(COLUMNS[SCORE]) + 24
        texts = {it.text(SCORE) for it in items}
        width = min(SCORE_MAX_W, max([header] + [metrics.horizontalAdvance(t) + 16 for t in texts]))
        if width != self._score_width:
            self._score_width = width
            self.tree.setColumnWidth(SCORE, width)

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
        for key in ("open", "clone", "resume", "export_toml", "export_hf"):
            self.action_buttons[key].setEnabled(run is not None)
        if run is None:
            self.detail.setText("")
            self.pipeline.setText("")
            self.notes.set_run(None)
            self.config_view.clear()  # (a deleted run's config must not linger)
            return
        self.action_buttons["resume"].setEnabled(run["status"] in ("stopped", "crashed", "failed"))
        # the model lives in a checkpoint; a vocabulary run has none
        ckpts = self.store.checkpoints(run_id)
        self.action_buttons["export_hf"].setEnabled(exports_model(run["stage"]) and bool(ckpts))
        self.detail.setText(detail_html(run, ckpts))
        self.pipeline.setText(chain_html(self.runs, run_id, self.scores))
        if not (same and (self.notes.tags.hasFocus() or self.notes.notes.hasFocus())):  # a refresh must not eat typing
            self.notes.set_run(run_id)
        self.config_view.setPlainText(config_text(run.get("config") or {}))

    def select(self, run_id: str) -> None:
        item = self.item_for(run_id)
        if item is not None:
            self.tree.setCurrentItem(item)

    def select_many(self, run_ids: list[str]) -> None:
        """Make these runs the selection (the last one current), as Ctrl-clicks would."""
        self.tree.clearSelection()
        for rid in run_ids:
            item = self.item_for(rid)
            if item is not None:
                self.tree.setCurrentItem(item, 0, QItemSelectionModel.SelectionFlag.Select)

    def selected_ids(self) -> list[str]:
        """Selected runs in the order the list shows them (which is the colour order in Compare)."""
        chosen = {id(it) for it in self.tree.selectedItems()}
        out = []
        for i in range(self.tree.topLevelItemCount()):
            stack = [self.tree.topLevelItem(i)]
            while stack:
                it = stack.pop(0)
                if id(it) in chosen:
                    out.append(it.data(0, Qt.ItemDataRole.UserRole))
                stack[:0] = [it.child(j) for j in range(it.childCount())]
        return out

    def _selection_changed(self) -> None:
        n = len(self.selected_ids())
        self.action_buttons["compare"].setEnabled(n >= 1)
        self.action_buttons["export_metrics"].setEnabled(n >= 1)
        self.action_buttons["compare"].setText(f"Compare selected ({n})" if n > 1 else "Compare selected")

    def _emit_current(self, sig) -> None:
        if self._current:
            sig.emit(self._current)

    def compare_selected(self) -> list[str]:
        ids = self.selected_ids() or ([self._current] if self._current else [])
        if ids:
            self.compare_requested.emit(ids)
        return ids

    def _deleted(self, run_id: str) -> None:
        self._current = None
        self.refresh()
        self.run_deleted.emit(run_id)
        win = self.window()
        if hasattr(win, "statusBar"):
            win.statusBar().showMessage(f"deleted run {run_id}: Undo (in the Runs tab) brings it back", 8000)

    # -- the trash -------------------------------------------------------------------------------------
    def undo_delete(self) -> str | None:
        """Bring the last deleted run back (it was never gone: only hidden); its id."""
        run = self.commands.restore_run()
        if run is None:
            return None
        self.refresh()
        self.select(run["id"])
        return run["id"]

    def empty_trash(self) -> list[str]:
        """Delete the trashed runs for good (rows and folders), after a yes."""
        runs = self.store.hidden_runs()
        if not runs or not self.confirm(self, "Empty trash", f"Delete {len(runs)} run(s) for good?\n\n"
                                        "Their metrics, evaluations, checkpoint records and artifacts are removed "
                                        "from the database, and their run folders are deleted."):
            return []
        deleted, kept = self.commands.empty_trash()
        if kept:
            QMessageBox.warning(self, "Empty trash", "Still running, so not deleted: " + ", ".join(kept))
        self.refresh()
        return deleted

    # -- exports -------------------------------------------------------------------------------------------
    def export_metrics_dialog(self, path: str | None = None, fmt: str | None = None) -> int | None:
        """The selected runs' metrics to one CSV/JSON/Parquet file (the format follows the suffix)."""
        ids = self.selected_ids()
        if not ids:
            return None
        if not path:
            path, chosen = QFileDialog.getSaveFileName(self, f"Export metrics of {len(ids)} run(s)", "metrics.csv",
                                                       "CSV (*.csv);;JSON (*.json);;Parquet (*.parquet)")
            if not path:
                return None
            if Path(path).suffix.lstrip(".").lower() not in FORMATS:
                path += "." + chosen.split()[0].lower()
        try:
            n = write_metrics(self.store, ids, path, fmt)
        except (InputError, OSError) as e:
            QMessageBox.warning(self, "Export metrics", str(e))
            return None
        win = self.window()
        if hasattr(win, "statusBar"):
            win.statusBar().showMessage(f"wrote {n:,} metric rows of {len(ids)} run(s) to {path}", 8000)
        return n

    def export_toml_dialog(self, path: str | None = None) -> Path | None:
        """The current run's stored config as a re-runnable TOML."""
        run = self.runs.get(self._current or "")
        if run is None:
            return None
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Export configuration", f"{run.get('name') or run['id']}.toml",
                                                  "TOML (*.toml)")
            if not path:
                return None
        try:
            return write_config(self.store, run["id"], path)
        except (InputError, OSError) as e:
            QMessageBox.warning(self, "Export TOML", f"Cannot export the configuration of {run['id']}: {e}")
            return None


def pick_run(parent: QWidget, store: RunStore, title: str, commands: Commands | None = None) -> str | None:
    """A small modal list of runs (for Clone…)."""
    dlg = QDialog(parent)
    dlg.setWindowTitle(title)
    dlg.resize(900, 500)
    browser = RunsBrowser(store, commands or Commands(store, dlg, act_on_store=False), dlg)
    chosen: list[str] = []
    browser.open_requested.connect(lambda rid: (chosen.append(rid), dlg.accept()))
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(lambda: (browser._current and chosen.append(browser._current), dlg.accept()))
    buttons.rejected.connect(dlg.reject)
    lay = QVBoxLayout(dlg)
    lay.addWidget(browser)
    lay.addWidget(buttons)
    return chosen[0] if dlg.exec() == QDialog.DialogCode.Accepted and chosen else None
