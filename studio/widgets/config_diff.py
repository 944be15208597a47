"""Config diff: every config key of the selected runs side by side, "differences only" by default.

Columns come in the order given (Compare's run order), headed by the name (elided) and short id; differing
rows are tinted with a shade that reads on the palette's background, light or dark."""
from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor, QPalette
from PySide6.QtWidgets import QCheckBox, QLabel, QTableWidget, QTableWidgetItem, QWidget

from studio.models.run_store import RunStore, config_diff
from studio.widgets.chart_style import ThemeFollower, blend
from studio.widgets.table_page import table_page

DIFF_TINT = QColor("#ffc400")  # amber, mixed into the table's background: pale on white, dim on dark
NAME_CHARS = 24  # a column header's name is cut to this (its tooltip has it whole)


def diff_brush(palette: QPalette) -> QBrush:
    return QBrush(blend(DIFF_TINT, palette.color(QPalette.ColorRole.Base), 0.25))


def column_title(run: dict) -> str:
    name = run.get("name") or ""
    short = name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"
    return f"{short} [{run['id'][:6]}]"


def display_value(v: Any) -> str:
    if v is None:
        return "—"  # the key does not exist in that run's config (an older version)
    if isinstance(v, str):
        return v if v else '""'
    return json.dumps(v)


class ConfigDiffView(QWidget):
    """Rows: dotted config keys (``train.lr``); columns: runs. Differing rows are highlighted."""

    def __init__(self, store: RunStore, run_ids: list[str] | tuple[str, ...] = (), parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.run_ids_: list[str] = []
        self.only_diff = QCheckBox("Differences only", objectName="differences_only", checked=True)
        self.only_diff.toggled.connect(lambda _on: self._fill())
        self.info = QLabel()
        self.table = QTableWidget(objectName="config_diff")
        table_page(self, self.table, self.info, self.only_diff)
        self.runs: list[dict] = []
        self.follower = ThemeFollower(self, lambda _theme: self._fill())
        self.set_runs(list(run_ids))

    def set_runs(self, run_ids: list[str]) -> None:
        self.runs = [r for r in (self.store.run(i) for i in run_ids) if r is not None]
        self.run_ids_ = [r["id"] for r in self.runs]
        self._fill()

    def keys(self) -> list[str]:
        """The keys shown, top to bottom."""
        return [self.table.item(i, 0).text() for i in range(self.table.rowCount())]

    def _fill(self) -> None:
        rows = config_diff({r["id"]: r["config"] for r in self.runs}, self.only_diff.isChecked())
        n_diff = sum(1 for *_x, differs in rows if differs) if not self.only_diff.isChecked() else len(rows)
        self.table.clear()
        self.table.setColumnCount(1 + len(self.runs))
        self.table.setHorizontalHeaderLabels(["key"] + [column_title(r) for r in self.runs])
        for j, r in enumerate(self.runs):
            self.table.horizontalHeaderItem(j + 1).setToolTip(f"{r.get('name') or ''} [{r['id']}]")
        brush = diff_brush(self.table.palette())
        self.table.setRowCount(len(rows))
        for i, (key, values, differs) in enumerate(rows):
            k = QTableWidgetItem(key)
            self.table.setItem(i, 0, k)
            for j, v in enumerate(values):
                item = QTableWidgetItem(display_value(v))
                item.setData(Qt.ItemDataRole.UserRole, v)
                if differs:
                    item.setBackground(brush)
                self.table.setItem(i, j + 1, item)
            if differs:
                f = k.font()
                f.setBold(True)
                k.setFont(f)
        self.table.resizeColumnsToContents()
        if len(self.runs) < 2:
            self.info.setText("pick two or more runs to compare their configs")
        else:
            self.info.setText(f"{n_diff} differing key{'s' if n_diff != 1 else ''}")
