"""Layout shared by the compare panel's tables (config diff, summary)."""
from __future__ import annotations

from PySide6.QtWidgets import QAbstractItemView, QHBoxLayout, QLabel, QVBoxLayout, QWidget


def table_page(page: QWidget, table: QAbstractItemView, info: QLabel, *controls: QWidget) -> None:
    """Lay out ``page``: a bar of ``controls`` (left) and ``info`` (right) above a read-only ``table``."""
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setAlternatingRowColors(True)
    table.verticalHeader().setVisible(False)
    bar = QHBoxLayout()
    for w in controls:
        bar.addWidget(w)
    bar.addStretch(1)
    bar.addWidget(info)
    lay = QVBoxLayout(page)
    lay.addLayout(bar)
    lay.addWidget(table, 1)
