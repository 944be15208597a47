"""A layout that places its widgets left to right and starts a new line when the next one does not fit.

Its minimum width is that of its widest widget, not of all of them side by side: a row of controls that
wraps on a narrow window instead of widening it.
"""
from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize, Qt
from PySide6.QtWidgets import QLayout, QLayoutItem, QWidget


class FlowLayout(QLayout):
    def __init__(self, parent: QWidget | None = None, spacing: int = 6):
        super().__init__(parent)
        self.items: list[QLayoutItem] = []
        self.gap = spacing

    # -- the QLayout protocol -----------------------------------------------------------------------
    def addItem(self, item: QLayoutItem) -> None:
        self.items.append(item)

    def count(self) -> int:
        return len(self.items)

    def itemAt(self, index: int) -> QLayoutItem | None:
        return self.items[index] if 0 <= index < len(self.items) else None

    def takeAt(self, index: int) -> QLayoutItem | None:
        return self.items.pop(index) if 0 <= index < len(self.items) else None

    def expandingDirections(self) -> Qt.Orientation:
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._place(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._place(rect, move=True)

    def sizeHint(self) -> QSize:
        """Everything on one line."""
        shown = [i for i in self.items if not i.isEmpty()]
        m = self.contentsMargins()
        w = sum(i.sizeHint().width() for i in shown) + self.gap * max(len(shown) - 1, 0)
        h = max((i.sizeHint().height() for i in shown), default=0)
        return QSize(w + m.left() + m.right(), h + m.top() + m.bottom())

    def minimumSize(self) -> QSize:
        """One widget per line at worst: as wide as the widest one."""
        m = self.contentsMargins()
        size = QSize()
        for item in self.items:
            if not item.isEmpty():
                size = size.expandedTo(item.minimumSize())
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    # -- placing ---------------------------------------------------------------------------------------
    def _place(self, rect: QRect, move: bool) -> int:
        """Lay the items out in ``rect`` (or only measure them), each centred on its line's height; the height
        the lines take."""
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        lines: list[list[tuple[QLayoutItem, int, QSize]]] = [[]]
        x = area.x()
        for item in self.items:
            if item.isEmpty():
                continue
            hint = item.sizeHint()
            w = min(hint.width(), area.width())  # a widget wider than a line gets the line
            if lines[-1] and x + w > area.right() + 1:
                lines.append([])
                x = area.x()
            lines[-1].append((item, x, QSize(w, hint.height())))
            x += w + self.gap
        y = area.y()
        for line in lines:
            line_h = max((size.height() for _i, _x, size in line), default=0)
            if move:
                for item, x, size in line:
                    item.setGeometry(QRect(QPoint(x, y + (line_h - size.height()) // 2), size))
            y += line_h + self.gap
        return y - self.gap - rect.y() + m.bottom()
