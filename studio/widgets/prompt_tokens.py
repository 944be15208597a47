"""A soft-prompt run's learned vectors read as words: for each prompt vector, its nearest vocabulary
tokens (with their cosine similarity in the tooltip)."""
from __future__ import annotations

from PySide6.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem, QWidget


class PromptTokensTable(QTableWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("prompt_tokens")
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)

    def show_rows(self, rows: list[list[tuple[str, float | None]]]) -> None:
        """One row per prompt vector: (token, cosine or None) nearest first."""
        k = max((len(r) for r in rows), default=0)
        self.setRowCount(len(rows))
        self.setColumnCount(k)
        self.setHorizontalHeaderLabels([f"nearest {i + 1}" for i in range(k)])
        self.setVerticalHeaderLabels([f"v{i}" for i in range(len(rows))])
        for i, row in enumerate(rows):
            for j, (token, cos) in enumerate(row):
                # a BPE token's leading space is part of it: show it (and line breaks) visibly
                item = QTableWidgetItem(token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅")
                if cos is not None:
                    item.setToolTip(f"cosine similarity {cos:.3f}")
                self.setItem(i, j, item)
