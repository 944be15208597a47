"""The header of a run's tab: name, status with its detail, precision and world badges, progress bar
with ETA, and the Pause / Resume / Stop / Resume-from-checkpoint buttons (their slots are the view's).

Two lines: the name and status (shortened with "…", full text in the tooltip), then the badges, progress
and buttons, which wrap onto more lines on a narrow window. Nothing in it widens the window with its text.
"""
from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from studio.models.labels import STATUS_COLORS
from studio.widgets.elided_label import ElidedLabel
from studio.widgets.flow_layout import FlowLayout

BUTTONS = (
    ("pause", "Pause", "Pause between steps (the process stays, memory is kept)"),
    ("resume", "Resume", "Continue a paused run"),
    ("stop", "Stop", "Graceful stop: finish the step, checkpoint, then exit"),
    ("restart", "Resume from checkpoint", "Continue a stopped or crashed run from its last checkpoint"),
)
PROGRESS_WIDTH = 220
MUTED = QPalette.ColorRole.PlaceholderText  # secondary text in the palette's own grey (light or dark)


class RunHeader(QWidget):
    def __init__(self, slots: dict[str, Callable[[], None]], parent: QWidget | None = None):
        super().__init__(parent)
        self.name_label = ElidedLabel("Starting…", objectName="run_name")
        self.name_label.setStyleSheet("font-size: 16px; font-weight: 600;")
        self.id_label = QLabel("", objectName="run_id")
        self.id_label.setForegroundRole(MUTED)
        self.id_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_word = QLabel("", objectName="run_status_word")
        self.status_label = ElidedLabel("", objectName="run_status")  # the detail: step, speed, loss, pid
        self.progress = QProgressBar(objectName="progress")
        self.progress.setFixedWidth(PROGRESS_WIDTH)
        self.progress.setFormat("%p %")
        self.eta_label = QLabel("", objectName="eta")
        # the precision the run trains in (and the CPU features it was chosen from, in the tooltip)
        self.precision_label = QLabel("", objectName="precision")
        self.precision_label.setStyleSheet("padding: 0 6px;")
        self.precision_label.setForegroundRole(MUTED)
        # a run on several processes: world size, strategy, throughput per rank
        self.world_label = QLabel("", objectName="world")
        self.world_label.setStyleSheet("padding: 0 6px;")
        self.world_label.setForegroundRole(MUTED)
        self.buttons: dict[str, QPushButton] = {}

        title = QHBoxLayout()
        title.setContentsMargins(0, 0, 0, 0)
        title.addWidget(self.name_label)
        title.addWidget(self.id_label)
        title.addSpacing(12)
        title.addWidget(self.status_word)
        title.addWidget(self.status_label)
        title.addStretch(1)
        controls = FlowLayout()
        controls.setContentsMargins(0, 0, 0, 0)
        for w in (self.precision_label, self.world_label, self.progress, self.eta_label):
            controls.addWidget(w)
        for key, text, tip in BUTTONS:
            b = QPushButton(text, objectName=key)
            b.setToolTip(tip)
            b.clicked.connect(lambda _checked=False, f=slots[key]: f())  # clicked(bool) must not reach stop(timeout_s)
            b.setEnabled(False)
            self.buttons[key] = b
            controls.addWidget(b)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        lay.addLayout(title)
        lay.addLayout(controls)

    def show_name(self, title: str, run_id: str, stage: str) -> None:
        self.name_label.setText(title)
        self.name_label.setToolTip(f"run {run_id} · {stage}")
        self.id_label.setText(f"{run_id} · {stage}")

    def show_status(self, status: str, detail: str) -> None:
        self.status_word.setText(f"<b style='color:{STATUS_COLORS.get(status, '#333')}'>{status}</b>")
        self.status_label.setText(detail)

    def show_badge(self, label: QLabel, text_tip: tuple[str, str]) -> None:
        label.setText(text_tip[0])
        label.setToolTip(text_tip[1])
        label.setVisible(bool(text_tip[0]))  # an empty badge would still take a gap in the wrapped row

    def show_stop_sent(self, sent: bool) -> None:
        """After a first stop the button kills; a new start makes it graceful again."""
        b = self.buttons["stop"]
        b.setText("Kill now" if sent else "Stop")
        b.setToolTip("Kill every process of the run at once (no final checkpoint)" if sent else BUTTONS[2][2])
