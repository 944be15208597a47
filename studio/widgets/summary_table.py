"""Summary table: one row per run — status, stage, parameters, sparsity, tokens, FLOPs spent vs
dense-equivalent, wall time, best validation loss, task scores, parent. Rows come in the order given
(Compare's run order) until a column header is clicked; then sorted by the numbers (not their text).
"Copy as CSV" puts the raw values on the clipboard."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSortFilterProxyModel, Qt, Signal
from PySide6.QtGui import QGuiApplication, QStandardItem, QStandardItemModel
from PySide6.QtWidgets import QAbstractItemView, QFileDialog, QLabel, QMessageBox, QPushButton, QTableView, QWidget

from engine.core.errors import InputError
from studio.commands.exports import write_config
from studio.models import formatting as fmt
from studio.models.run_store import RunStore
from studio.widgets.table_page import table_page

SORT_ROLE = Qt.ItemDataRole.UserRole + 1
NAME_CHARS = 32  # the Run column's widest, in average characters

# (header, row key, formatter) — the CSV uses the row key as its column name and the raw value
COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("Run", "name", str),
    ("Id", "id", str),
    ("Status", "status", str),
    ("Stage", "stage", str),
    ("Params", "params_total", fmt.number),
    ("Nonzero", "params_nonzero", fmt.number),
    ("Sparsity", "sparsity", lambda v: "–" if v is None else f"{v:.1%}"),
    ("Tokens", "tokens", lambda v: fmt.si(v)),
    ("FLOPs spent", "flops", fmt.flops),
    ("Dense-equiv. FLOPs", "flops_dense", fmt.flops),
    ("Saving", "saving", lambda v: "–" if v is None else f"{v:.2f}×"),
    ("Wall time", "wall_time", fmt.duration),
    ("Best val loss", "best_val_loss", lambda v: "–" if v is None else f"{v:.4f}"),
)
TAIL = (("Parent", "parent", str), ("Tags", "tags", lambda v: ", ".join(v or [])))


def table_rows(store: RunStore, run_ids: list[str]) -> tuple[list[dict], list[str]]:
    """Summary rows flattened for the table (task scores become columns) and the score keys."""
    rows = store.summary_rows(run_ids)
    score_keys = sorted({k for r in rows for k in r["scores"]})
    for r in rows:
        r["saving"] = r["flops_dense"] / r["flops"] if r["flops"] and r["flops_dense"] else None
        for k in score_keys:
            r[f"score:{k}"] = r["scores"].get(k)
    return rows, score_keys


class SummaryTable(QWidget):
    """Signals: ``run_activated(str)`` on double-click of a row."""

    run_activated = Signal(str)

    def __init__(self, store: RunStore, run_ids: list[str] | tuple[str, ...] = (), parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.rows: list[dict] = []
        self.columns: list[tuple[str, str, Any]] = []
        self.model = QStandardItemModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.view = QTableView(objectName="summary_table")
        self.view.setModel(self.proxy)
        # rows in the order given (the compare order) until the user sorts by a column; Qt would sort
        # by the first column (the names, descending) as soon as sorting is enabled
        self.view.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.doubleClicked.connect(self._activated)
        copy = QPushButton("Copy as CSV", objectName="copy_csv")
        copy.clicked.connect(self.copy_csv)
        toml = QPushButton("Export config as TOML…", objectName="export_toml")
        toml.setToolTip("Save the selected run's config; `mediswift train FILE` re-runs it")
        toml.clicked.connect(self._export_toml_dialog)
        self.info = QLabel()
        table_page(self, self.view, self.info, copy, toml)
        self.set_runs(list(run_ids))

    def set_runs(self, run_ids: list[str]) -> None:
        self.rows, score_keys = table_rows(self.store, [i for i in run_ids if self.store.run(i) is not None])
        self.columns = list(COLUMNS) + [(k, f"score:{k}", lambda v: "–" if v is None else f"{v:.4g}") for k in score_keys] + list(TAIL)
        self.model.clear()
        self.model.setHorizontalHeaderLabels([c[0] for c in self.columns])
        for r in self.rows:
            items = []
            for _h, key, f in self.columns:
                v = r.get(key)
                item = QStandardItem(f(v) if v is not None or f is str else "–")
                # numbers sort as numbers; missing values sort first
                item.setData(v if isinstance(v, (int, float)) else (float("-inf") if v is None else str(v)), SORT_ROLE)
                item.setData(r["id"], Qt.ItemDataRole.UserRole)
                if isinstance(v, (int, float)):
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if key == "name":
                    item.setToolTip(f"{v} [{r['id']}]")
                items.append(item)
            self.model.appendRow(items)
        self.view.resizeColumnsToContents()
        # a long run name is elided (its tooltip has it whole) instead of pushing every number off screen
        limit = self.view.fontMetrics().averageCharWidth() * NAME_CHARS
        if self.view.columnWidth(0) > limit:
            self.view.setColumnWidth(0, limit)
        self.info.setText(f"{len(self.rows)} run{'s' if len(self.rows) != 1 else ''}")

    def csv_text(self) -> str:
        """The table in its current sort order, raw values (full precision), one header row."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([key for _h, key, _f in self.columns])
        by_id = {r["id"]: r for r in self.rows}
        for i in range(self.proxy.rowCount()):
            rid = self.proxy.index(i, 0).data(Qt.ItemDataRole.UserRole)
            r = by_id[rid]
            w.writerow(["" if r.get(k) is None else (";".join(r[k]) if isinstance(r.get(k), list) else r[k])
                        for _h, k, _f in self.columns])
        return buf.getvalue()

    def copy_csv(self) -> str:
        text = self.csv_text()
        QGuiApplication.clipboard().setText(text)
        return text

    def selected_run(self) -> str | None:
        idx = self.view.selectionModel().selectedRows()
        return idx[0].data(Qt.ItemDataRole.UserRole) if idx else None

    def _activated(self, index) -> None:
        self.run_activated.emit(index.data(Qt.ItemDataRole.UserRole))

    def _export_toml_dialog(self) -> None:
        rid = self.selected_run() or (self.rows[0]["id"] if len(self.rows) == 1 else None)
        if rid is None:
            QMessageBox.information(self, "Export config", "Pick a run in the table first.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export config", f"{rid}.toml", "TOML (*.toml)")
        if not path:
            return
        try:
            write_config(self.store, rid, Path(path))
        except (InputError, OSError, ValueError) as e:
            QMessageBox.warning(self, "Export config", str(e))
