"""A progress bar painted in a table cell: the cell's text ("40 %") on the left, a thin bar after it filled
to the fraction in the cell's ``PROGRESS_ROLE`` data, in the palette's colours (light or dark). A cell
without a fraction is drawn as plain text. Painted, not a widget per row, so a long queue costs nothing
while it redraws; thin, so it reads in a row as tall as one line of text."""
from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication, QStyle, QStyledItemDelegate

PROGRESS_ROLE = Qt.ItemDataRole.UserRole + 1
BAR_H = 6  # px


class ProgressDelegate(QStyledItemDelegate):
    def paint(self, painter, option, index) -> None:
        fraction = index.data(PROGRESS_ROLE)
        if fraction is None:
            super().paint(painter, option, index)
            return
        fraction = max(0.0, min(1.0, float(fraction)))
        style = option.widget.style() if option.widget is not None else QApplication.style()
        style.drawPrimitive(QStyle.PrimitiveElement.PE_PanelItemViewItem, option, painter, option.widget)  # selection
        text = index.data(Qt.ItemDataRole.DisplayRole) or ""
        pal = option.palette
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        rect = option.rect.adjusted(4, 0, -4, 0)
        text_w = option.fontMetrics.horizontalAdvance("100 %") + 6
        painter.save()
        painter.setPen(pal.color(QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Text))
        painter.drawText(rect.adjusted(0, 0, -(rect.width() - text_w), 0),
                         int(Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignRight), text)
        bar = QRectF(rect.left() + text_w + 4, rect.center().y() - BAR_H / 2 + 1, max(0, rect.width() - text_w - 4),
                     BAR_H)
        painter.setRenderHint(painter.RenderHint.Antialiasing)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(pal.color(QPalette.ColorRole.Mid))
        painter.drawRoundedRect(bar, 2, 2)
        if fraction > 0:
            painter.setBrush(pal.color(QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Highlight))
            painter.drawRoundedRect(QRectF(bar.left(), bar.top(), bar.width() * fraction, BAR_H), 2, 2)
        painter.restore()
