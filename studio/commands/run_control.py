"""Pause, resume and stop one run: through the engine process this studio started (stdin lines), else by
signals to the run's own pid (a run found running: SIGUSR1 pause, SIGUSR2 resume, SIGTERM stop).

Stop is staged: a graceful stop first (the engine finishes its step, checkpoints and reports
``stopped``); the run's whole process group (every rank of a multi-process run) is killed after
``timeout_s``, or at once on a second stop.
"""
from __future__ import annotations

import signal
from typing import Callable

from PySide6.QtCore import QObject, QTimer, Signal

from engine.core.processes import pid_alive
from studio.commands.engine_process import GRACEFUL_STOP_S, EngineProcess, signal_engine


class RunControl(QObject):
    """The controls of one run. ``message(str)``: what was asked, for the run's log pane.

    ``ended()`` says whether the run has ended (a forced kill is then not needed)."""

    message = Signal(str)

    def __init__(self, ended: Callable[[], bool], parent: QObject | None = None):
        super().__init__(parent)
        self.ended = ended
        self.process: EngineProcess | None = None
        self.pid: int | None = None
        self.pgid = 0  # the process group a multi-process run records (every rank); 0: the engine leads its own
        self.stop_sent = False  # a second stop kills
        self._kill_timer: QTimer | None = None

    def can_control(self) -> bool:
        return self.process is not None or bool(self.pid)

    def started(self, pid: int | None) -> None:
        """A (re)start of the engine: a stop is graceful again."""
        self.pid = pid
        self.stop_sent = False

    def pause(self) -> None:
        self._send("pause", signal.SIGUSR1)

    def resume(self) -> None:
        self._send("resume", signal.SIGUSR2)

    def _send(self, action: str, sig: int) -> None:
        if self.process is not None:
            getattr(self.process, action)()
        else:
            signal_engine(self.pid, sig)
        self.message.emit(f"{action} requested")

    def stop(self, timeout_s: float = GRACEFUL_STOP_S) -> None:
        """Graceful stop first; a second stop (or ``timeout_s`` without the run ending) kills the group."""
        if self.stop_sent:
            self.kill_now()
            return
        self.stop_sent = True
        self.message.emit(f"stop requested (forced after {timeout_s:.0f} s, or press Kill now)")
        if self.process is not None:
            self.process.stop(timeout_s)
            return
        signal_engine(self.pid, signal.SIGTERM)
        self._kill_timer = QTimer(self, singleShot=True)
        self._kill_timer.timeout.connect(self._force_kill)
        self._kill_timer.start(int(timeout_s * 1000))

    def _force_kill(self) -> None:
        if self.pid and pid_alive(self.pid) and not self.ended():
            self.message.emit("graceful stop timed out: killing the engine's process group")
            self._kill_group()

    def kill_now(self) -> None:
        """Every process of the run (each rank of a process group) killed now."""
        self.message.emit("killing the run's processes now")
        if self.process is not None:
            self.process.kill()
        else:
            self._kill_group()

    def _kill_group(self) -> None:
        # a run on several processes records the group that holds them all; one process leads its own
        signal_engine(self.pgid if self.pgid > 1 else self.pid, signal.SIGKILL, group=True)

    def detach(self) -> None:
        """Let go of the engine without touching it (the studio is closing, the tab closed)."""
        if self._kill_timer is not None:
            self._kill_timer.stop()
        if self.process is not None:
            self.process.detach()
            self.process = None
