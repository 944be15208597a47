"""Pre-launch estimate in the background: ``python -m engine estimate CONFIG --set ... --json --probe-steps N``
in a QProcess, so the UI never blocks; a newer request cancels the one in flight (the form changes
faster than torch imports)."""
from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from studio.commands.engine_process import EngineProcess, parse_json_output


class EstimateRunner(QObject):
    """One estimate at a time; ``done(result)`` or ``failed(message, key, path)``."""

    done = Signal(dict)
    failed = Signal(str, object, object)
    started = Signal()

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.proc: EngineProcess | None = None
        self._stdout: list[str] = []
        self._events: list[dict] = []

    def run(self, args: list[str]) -> None:
        self.cancel()
        self._stdout, self._events = [], []
        proc = EngineProcess(args, self, launcher=False)
        proc.stdout_text.connect(self._stdout.append)
        proc.event.connect(self._events.append)
        proc.start_failed.connect(lambda msg: self.failed.emit(msg, None, None))
        proc.finished.connect(lambda code, p=proc: self._finished(p, code))
        self.proc = proc
        proc.start()
        self.started.emit()

    def cancel(self) -> None:
        if self.proc is not None:
            old, self.proc = self.proc, None
            old.finished.disconnect()
            if old.is_running():
                old.proc.kill()
                old.proc.waitForFinished(2000)
            old.deleteLater()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.is_running()

    def _finished(self, proc: EngineProcess, code: int) -> None:
        if proc is not self.proc:
            return
        self.proc = None
        result, events = parse_json_output("\n".join(self._stdout))
        errors = [e for e in self._events + events if e["type"] == "error"]
        if code == 0 and isinstance(result, dict):
            self.done.emit(result)
        elif errors:
            e = errors[-1]
            self.failed.emit(e["message"], e.get("key"), e.get("path"))
        else:
            lines = [ln.split("error: ", 1)[-1] for ln in proc.stderr_lines if ln.strip()]
            self.failed.emit(lines[-1] if lines else f"estimate failed (exit code {code})", None, None)
        proc.deleteLater()
