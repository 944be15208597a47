"""The log pane: engine stderr, ``log``/``warning``/``error`` events and the engine.log tail of re-attached
runs (read by ``studio.models.log_tail``). Text colours come from the palette (warnings and errors in a
shade that reads on its background) and the monospace font follows the application's size; both are
applied again, to every line, after a palette or font change."""
from __future__ import annotations

import html
import time

from PySide6.QtGui import QFontDatabase, QTextCursor
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLineEdit, QPushButton, QTextEdit, QVBoxLayout, QWidget

from studio.widgets.chart_style import ChartTheme, ThemeFollower

# accents per kind, made readable on the palette's background; plain log lines take the palette's text
# colour and stderr a muted one
COLORS = {"warning": "#b8860b", "error": "#c9302c", "studio": "#1f77b4"}
MAX_BLOCKS = 20000  # keep memory bounded on week-long runs


class LogPane(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.lines: list[tuple[str, str]] = []  # (kind, text), the whole history for filtering and tests
        self.view = QTextEdit(objectName="log")
        self.view.setReadOnly(True)
        self.view.document().setMaximumBlockCount(MAX_BLOCKS)
        self.colors: dict[str, str] = {}
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
        self.follower = ThemeFollower(self, self._apply_theme)

    def _apply_theme(self, theme: ChartTheme) -> None:
        font = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        font.setPointSizeF(theme.points(0.95))
        self.view.setFont(font)
        self.colors = {"log": theme.text.name(), "stderr": theme.muted.name(),
                       **{k: theme.readable(c).name() for k, c in COLORS.items()}}
        self._refilter()

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
        color = self.colors.get(kind) or self.colors["log"]
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
