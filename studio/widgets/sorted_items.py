"""Tree rows that sort by what their cells mean: numbers as numbers, dates as times, text without case.

A cell shows formatted text ("26.2 GFLOP", "1,200", "2024-05-01 10:03"); sorting by that text would put
"1,200" before "300". Each row keeps a sort key per column beside its text, and a row without a value in
the sorted column goes after the rows with one.
"""
from __future__ import annotations

from typing import Any, Sequence

from PySide6.QtWidgets import QTreeWidgetItem


class SortedItem(QTreeWidgetItem):
    """A ``QTreeWidgetItem`` with ``keys``: column -> the value to sort that column by (None: no value)."""

    def __init__(self, texts: Sequence[str], keys: dict[int, Any] | None = None):
        super().__init__(list(texts))
        self.keys = dict(keys or {})

    def sort_key(self, column: int) -> tuple:
        value = self.keys[column] if column in self.keys else (self.text(column).casefold() or None)
        return (1,) if value is None else (0, value)

    def __lt__(self, other: QTreeWidgetItem) -> bool:
        tree = self.treeWidget()
        column = tree.sortColumn() if tree is not None else 0
        mine = self.sort_key(column)
        theirs = other.sort_key(column) if isinstance(other, SortedItem) else (0, other.text(column).casefold())
        return mine < theirs
