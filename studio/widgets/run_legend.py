"""The shared legend of the Compare charts: one entry per compared run (its colour, its name elided,
sparsity and short id always shown), in the compare order, wrapping over as many lines as the width
needs, so five runs or twenty are all listed and none is drawn over a curve. A click hides or shows
that run in every chart.
"""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap
from PySide6.QtWidgets import QSizePolicy, QToolButton, QWidget

from studio.widgets.flow_layout import FlowLayout

NAME_CHARS = 28  # a name longer than about this many characters is elided (the tooltip has it whole)


def swatch(color: QColor, filled: bool = True, size: int = 14) -> QIcon:
    """A square of the run's colour; an outline for a hidden run."""
    pm = QPixmap(size, size)
    pm.fill(Qt.GlobalColor.transparent)
    p = QPainter(pm)
    p.setPen(color)
    if filled:
        p.fillRect(1, 1, size - 2, size - 2, color)
    p.drawRect(1, 1, size - 3, size - 3)
    p.end()
    return QIcon(pm)


class RunLegend(QWidget):
    """Signals: ``toggled(run_id, visible)`` when an entry is clicked."""

    toggled = Signal(str, bool)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("run_legend")
        self.flow = FlowLayout(self, spacing=12)
        self.flow.setContentsMargins(2, 0, 2, 0)
        self.entries: dict[str, QToolButton] = {}
        # as tall as its wrapped lines need (the flow layout's height for the width it gets)
        policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)

    def set_runs(self, runs: list[tuple[str, str, str, QColor]], hidden: set[str]) -> None:
        """``runs``: (id, name, the rest of the label, colour) in the compare order."""
        for button in self.entries.values():
            self.flow.removeWidget(button)
            button.deleteLater()
        self.entries = {}
        fm = self.fontMetrics()
        for rid, name, rest, color in runs:
            b = QToolButton(self, objectName=f"legend:{rid}", autoRaise=True)
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
            b.setIconSize(QSize(12, 12))
            short = fm.elidedText(name, Qt.TextElideMode.ElideRight, fm.averageCharWidth() * NAME_CHARS)
            b.setText(short + rest)
            b.full_text = name + rest
            visible = rid not in hidden
            b.setIcon(swatch(color, filled=visible))
            f = b.font()
            f.setStrikeOut(not visible)
            b.setFont(f)
            b.setToolTip(f"{name}{rest}\n{'click to hide it in every chart' if visible else 'hidden: click to show it'}")
            b.clicked.connect(lambda _c=False, r=rid, v=visible: self.toggled.emit(r, not v))
            self.flow.addWidget(b)
            self.entries[rid] = b
        self.setVisible(bool(runs))
        self.updateGeometry()

    def texts(self) -> list[str]:
        """The entries' texts, in order (what a test or a screenshot checks)."""
        return [b.text() for b in self.entries.values()]
