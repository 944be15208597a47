"""The log pane: engine stderr, ``log``/``warning``/``error`` events and the engine.log tail of re-attached
runs (read by ``studio.models.log_tail``)."""
from __future__ import annotations

import html
import time

from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLineEdit, QPushButton, QTextEdit, QVBoxLayout, QWidget

COLORS = {"stderr": "#555", "log": "#222", "warning": "#b8860b", "error": "#c9302c", "studio": "#1f77b4"}
MAX_BLOCKS = 20000  # keep memory bounded on week-long runs


class LogPane(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.lines: list[tuple[str, str]] = []  # (kind, text), the whole history for filtering and tests
        self.view = QTextEdit(objectName="log")
        self.view.setReadOnly(True)
        self.view.document().setMaximumBlockCount(MAX_BLOCKS)
        self.view.setStyleSheet("font-family: monospace; font-size: 11px;")
        self.filter = QLineEdit(placeholderText="filter log…")
        self.filter.textChanged.connect(self._refilter)
        self.show_stderr = QCheckBox("stderr", checked=True)
        self.show_stderr.toggled.connect(self._refilter)
        clear = QPushButton("Clear")
        clear.clicked.connect(self.clear)
        bar = QHBoxLayout()
        bar.addWidget(self.filter, 1)
        bar.addWidget(self.show_stderr)
        bar.addWidget(clear)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(bar)
        lay.addWidget(self.view, 1)

    def append(self, kind: str, text: str) -> None:
        self.lines.append((kind, text))
        if self._visible(kind, text):
            self._write(kind, text)

    def add_event(self, ev: dict) -> None:
        t = ev.get("type")
        if t in ("log", "warning", "error"):
            stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("time", time.time())))
            prefix = {"warning": "warning: ", "error": "error: "}.get(t, "")
            where = ev.get("key") or ev.get("path")
            self.append(t, f"{stamp} {prefix}{ev.get('message', '')}" + (f"  [{where}]" if where else ""))

    def _visible(self, kind: str, text: str) -> bool:
        if kind == "stderr" and not self.show_stderr.isChecked():
            return False
        f = self.filter.text().strip().lower()
        return not f or f in text.lower()

    def _write(self, kind: str, text: str) -> None:
        color = COLORS.get(kind, "#222")
        self.view.append(f"<span style='color:{color}; white-space: pre-wrap'>{html.escape(text)}</span>")
        self.view.moveCursor(QTextCursor.MoveOperation.End)

    def _refilter(self) -> None:
        self.view.clear()
        for kind, text in self.lines[-MAX_BLOCKS:]:
            if self._visible(kind, text):
                self._write(kind, text)

    def clear(self) -> None:
        self.lines.clear()
        self.view.clear()

    def text(self) -> str:
        return "\n".join(t for _k, t in self.lines)
