"""Run a refresh at most every so often, however often it is asked for: the views' answer to a stream
of store signals (a live run's progress) when a refresh reads a lot. A single-shot timer, not a poll:
nothing runs unless asked."""
from __future__ import annotations

import time
from typing import Callable

from PySide6.QtCore import QObject, QTimer


class Throttle(QObject):
    """``request()`` calls ``fn`` now if it last ran ``interval_ms`` ago or more, else once when that is
    due (asks in between are merged)."""

    def __init__(self, fn: Callable[[], None], interval_ms: int, parent: QObject | None = None):
        super().__init__(parent)
        self.fn = fn
        self.interval_s = interval_ms / 1000
        self.last = float("-inf")
        self.timer = QTimer(self, singleShot=True)
        self.timer.timeout.connect(self._fire)

    def request(self) -> None:
        wait = self.last + self.interval_s - time.monotonic()
        if wait <= 0:
            self._fire()
        elif not self.timer.isActive():
            self.timer.start(int(wait * 1000) + 1)

    def _fire(self) -> None:
        self.timer.stop()
        self.last = time.monotonic()
        self.fn()

    def cancel(self) -> None:
        self.timer.stop()
