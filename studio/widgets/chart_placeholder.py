"""A chart, or a line of text in its place while there is nothing to draw ("waiting for the first
step…"): empty 0–1 axes say nothing and look like a broken chart. The text takes the palette's
placeholder colour and the application's font."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QLabel, QStackedLayout, QWidget


class ChartPlaceholder(QWidget):
    def __init__(self, chart: QWidget, text: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.chart = chart
        self.label = QLabel(text, alignment=Qt.AlignmentFlag.AlignCenter, wordWrap=True)
        self.label.setObjectName("chart_placeholder")
        self.label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.stack = QStackedLayout(self)
        self.stack.setContentsMargins(0, 0, 0, 0)
        self.stack.addWidget(chart)
        self.stack.addWidget(self.label)

    def show_text(self, text: str | None) -> None:
        """``text`` instead of the chart; None: the chart."""
        if text is not None:
            self.label.setText(text)
        self.stack.setCurrentWidget(self.chart if text is None else self.label)

    def text_shown(self) -> str | None:
        """The text shown instead of the chart, or None while the chart is shown."""
        return self.label.text() if self.stack.currentWidget() is self.label else None
