"""The header of a run's tab: name, status with its detail, precision and world badges, progress bar
with ETA, and the Pause / Resume / Stop / Resume-from-checkpoint buttons (their slots are the view's)."""
from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from studio.models.labels import STATUS_COLORS

BUTTONS = (
    ("pause", "Pause", "Pause between steps (the process stays, memory is kept)"),
    ("resume", "Resume", "Continue a paused run"),
    ("stop", "Stop", "Graceful stop: finish the step, checkpoint, then exit"),
    ("restart", "Resume from checkpoint", "Continue a stopped or crashed run from its last checkpoint"),
)


class RunHeader(QWidget):
    def __init__(self, slots: dict[str, Callable[[], None]], parent: QWidget | None = None):
        super().__init__(parent)
        self.name_label = QLabel("Starting…", objectName="run_name")
        self.name_label.setStyleSheet("font-size: 16px; font-weight: 600;")
        self.status_label = QLabel("", objectName="run_status")
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.progress = QProgressBar(objectName="progress")
        self.progress.setMinimumWidth(260)
        self.progress.setFormat("%p %")
        self.eta_label = QLabel("", objectName="eta")
        # the precision the run trains in (and the CPU features it was chosen from, in the tooltip)
        self.precision_label = QLabel("", objectName="precision")
        self.precision_label.setStyleSheet("color: #555; padding: 0 6px;")
        # a run on several processes: world size, strategy, throughput per rank
        self.world_label = QLabel("", objectName="world")
        self.world_label.setStyleSheet("color: #555; padding: 0 6px;")
        self.buttons: dict[str, QPushButton] = {}
        head = QHBoxLayout(self)
        head.setContentsMargins(0, 0, 0, 0)
        head.addWidget(self.name_label)
        head.addWidget(self.status_label, 1)
        head.addWidget(self.precision_label)
        head.addWidget(self.world_label)
        head.addWidget(self.progress)
        head.addWidget(self.eta_label)
        for key, text, tip in BUTTONS:
            b = QPushButton(text, objectName=key)
            b.setToolTip(tip)
            b.clicked.connect(lambda _checked=False, f=slots[key]: f())  # clicked(bool) must not reach stop(timeout_s)
            b.setEnabled(False)
            self.buttons[key] = b
            head.addWidget(b)

    def show_name(self, title: str, run_id: str, stage: str) -> None:
        self.name_label.setText(f"{title}  <span style='color:#888; font-size: 12px'>{run_id} · {stage}</span>")

    def show_status(self, status: str, detail: str) -> None:
        self.status_label.setText(f"<b style='color:{STATUS_COLORS.get(status, '#333')}'>{status}</b>  {detail}")

    def show_badge(self, label: QLabel, text_tip: tuple[str, str]) -> None:
        label.setText(text_tip[0])
        label.setToolTip(text_tip[1])

    def show_stop_sent(self, sent: bool) -> None:
        """After a first stop the button kills; a new start makes it graceful again."""
        b = self.buttons["stop"]
        b.setText("Kill now" if sent else "Stop")
        b.setToolTip("Kill every process of the run at once (no final checkpoint)" if sent else BUTTONS[2][2])
