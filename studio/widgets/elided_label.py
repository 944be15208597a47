"""A one-line label that shortens its text with "…" to the width it is given, the full text in its tooltip.

A plain QLabel asks for the width of its whole text as its minimum, so one long run name or path sets the
window's minimum width; this one asks for a few characters and shows as much as fits.
"""
from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QLabel, QSizePolicy, QWidget

MIN_CHARS = 6  # the narrowest it gets: a few characters and the ellipsis


class ElidedLabel(QLabel):
    def __init__(self, text: str = "", parent: QWidget | None = None, *, objectName: str = "",
                 mode: Qt.TextElideMode = Qt.TextElideMode.ElideRight):
        super().__init__(parent)
        if objectName:
            self.setObjectName(objectName)
        self.mode = mode
        self._full = ""
        self._tip = ""  # a tooltip of the caller's, shown below the full text when that is cut
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self.setText(text)

    def setText(self, text: str) -> None:
        text = text or ""
        if text == self._full:
            return  # a header refreshed 4 times a second must not re-lay its window out each time
        self._full = text
        self.updateGeometry()  # the size hint is the whole text's
        self._elide()

    def full_text(self) -> str:
        return self._full

    def setToolTip(self, tip: str) -> None:
        self._tip = tip or ""
        self._elide()

    def is_elided(self) -> bool:
        return super().text() != self._full

    def sizeHint(self) -> QSize:
        fm = self.fontMetrics()
        m = self.contentsMargins()
        return QSize(fm.horizontalAdvance(self._full) + m.left() + m.right() + 2 * self.margin() + 4,
                     super().sizeHint().height())

    def minimumSizeHint(self) -> QSize:
        fm = self.fontMetrics()
        m = self.contentsMargins()
        width = min(fm.horizontalAdvance(self._full), fm.averageCharWidth() * MIN_CHARS + fm.horizontalAdvance("…"))
        return QSize(width + m.left() + m.right() + 2 * self.margin() + 2, super().minimumSizeHint().height())

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        width = self.contentsRect().width() - 2 * self.margin()
        shown = self.fontMetrics().elidedText(self._full, self.mode, max(width, 0))
        super().setText(shown)
        cut = shown != self._full
        tip = "\n\n".join(t for t in (self._full if cut else "", self._tip) if t)
        super().setToolTip(tip)
