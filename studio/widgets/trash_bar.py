"""The line above the runs list while runs are in the trash: "Deleted run X — Undo · Empty trash".

It shows what the last delete did and offers to take it back; it is hidden while the trash is empty.
"""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QPushButton, QWidget


class TrashBar(QFrame):
    undo_requested = Signal()
    empty_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent, objectName="trash_bar")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.label = QLabel(objectName="trash_label")
        self.undo_button = QPushButton("Undo", objectName="trash_undo")
        self.undo_button.setToolTip("Bring the last deleted run back (Ctrl+Z in the list)")
        self.undo_button.clicked.connect(self.undo_requested)
        self.empty_button = QPushButton("Empty trash", objectName="trash_empty")
        self.empty_button.setToolTip("Delete the runs in the trash for good: their rows and run folders "
                                     "(quitting the studio does this too)")
        self.empty_button.clicked.connect(self.empty_requested)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(6, 2, 6, 2)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.undo_button)
        lay.addWidget(self.empty_button)
        self.hide()

    def show_trash(self, runs: list[dict]) -> None:
        """``runs``: what the trash holds, oldest first (the last one is what Undo brings back)."""
        self.setVisible(bool(runs))
        if not runs:
            return
        last = runs[-1]
        name = last.get("name") or ""
        short = name if len(name) <= 48 else name[:47] + "…"
        more = f" · {len(runs)} runs in the trash" if len(runs) > 1 else ""
        self.label.setText(f"Deleted run <b>{last['id']}</b>" + (f" ({_html(short)})" if short else "") + more
                           + " — kept until the trash is emptied")
        self.label.setToolTip("\n".join(f"{r['id']}  {r.get('name') or ''}" for r in runs))
        self.empty_button.setText(f"Empty trash ({len(runs)})")


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
