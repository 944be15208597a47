"""Engine processes seen from the studio: build CLI arguments, start them detached, read their events.

The studio never runs training in-process. It starts ``python -m engine.launcher train ...`` through
QProcess; the launcher puts the engine in a session of its own, so the run survives the studio.
Events arrive as JSON lines on stdout (parsed by ``engine.core.events.parse_line``); stderr is kept apart
for the log pane. Control goes through stdin lines while we own the pipe, and through signals to the
engine's own pid (from ``run_started`` or the runs row) otherwise.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import tomli_w
from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

from engine.core.events import parse_line
from engine.core.processes import pid_alive

GRACEFUL_STOP_S = 30.0


def toml_value(value: Any) -> str:
    """A value as the engine's ``--set`` parser reads it (TOML): strings quoted, lists bracketed."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def train_args(config_path: str | Path | None, overrides: dict[str, Any] | None = None, *, db: str | Path | None = None,
               runs_dir: str | Path | None = None, resume: str | None = None) -> list[str]:
    """Arguments after the program name for ``train`` (shared by the launch and the command preview)."""
    args = ["train"]
    if config_path:
        args.append(str(config_path))
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={toml_value(value)}"]
    if db:
        args += ["--db", str(db)]
    if runs_dir:
        args += ["--runs-dir", str(runs_dir)]
    if resume:
        args += ["--resume", resume]
    return args


def command_preview(args: list[str]) -> str:
    """The command a user would type in a terminal for the same run."""
    return shlex.join(["mediswift", *args])


def engine_env() -> QProcessEnvironment:
    env = QProcessEnvironment.systemEnvironment()
    env.insert("PYTHONUNBUFFERED", "1")  # events must reach us line by line, not in 8 KiB blocks
    env.insert("PYTHONIOENCODING", "utf-8")
    # the engine is the installed package beside the studio (sys.executable -m engine): nothing from a checkout
    return env


class LineReader:
    """Splits a byte stream into complete UTF-8 lines, keeping a partial tail for the next read."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[str]:
        data = self._tail + data
        *lines, self._tail = data.split(b"\n")
        return [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines]

    def flush(self) -> list[str]:
        tail, self._tail = self._tail, b""
        return [tail.decode("utf-8", errors="replace")] if tail.strip() else []


def signal_engine(pid: int | None, sig: int, group: bool = False) -> bool:
    """Send a signal to an engine (or its whole process group); False if it is already gone."""
    if not pid:
        return False
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class EngineProcess(QObject):
    """One engine command run through the launcher, with its events, stderr and exit."""

    event = Signal(dict)
    stdout_text = Signal(str)  # non-JSON stdout lines (stray prints), shown in the log pane
    stderr_text = Signal(str)
    start_failed = Signal(str)
    finished = Signal(int)

    def __init__(self, args: list[str], parent: QObject | None = None, *, launcher: bool = True):
        super().__init__(parent)
        self.args = list(args)
        self.program = sys.executable
        self.argv = ["-m", "engine.launcher" if launcher else "engine", *self.args]
        self.proc = QProcess(self)
        self.proc.setProcessChannelMode(QProcess.ProcessChannelMode.SeparateChannels)
        self.proc.setProcessEnvironment(engine_env())
        self.proc.readyReadStandardOutput.connect(self._read_stdout)
        self.proc.readyReadStandardError.connect(self._read_stderr)
        self.proc.errorOccurred.connect(self._on_error)
        self.proc.finished.connect(self._on_finished)
        self._out, self._err = LineReader(), LineReader()
        self.stderr_lines: list[str] = []  # kept whole: a crash report needs the tail
        self.engine_pid: int | None = None
        self.engine_pgid: int | None = None  # the process group of the run's processes (every rank of a group)
        self.run_id: str | None = None
        self.exit_code: int | None = None
        self._stop_timer: QTimer | None = None
        self.stop_requested = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.proc.start(self.program, self.argv)

    def is_running(self) -> bool:
        return self.proc.state() != QProcess.ProcessState.NotRunning

    def command_line(self) -> str:
        return shlex.join([self.program, *self.argv])

    def detach(self) -> None:
        """Let go of the process: the launcher dies as on studio exit, the engine keeps training."""
        for sig in (self.proc.readyReadStandardOutput, self.proc.readyReadStandardError, self.proc.finished,
                    self.proc.errorOccurred):
            try:
                sig.disconnect()
            except (RuntimeError, TypeError):
                pass
        if self.is_running():
            self.proc.kill()
            self.proc.waitForFinished(3000)

    # -- control -------------------------------------------------------------------------------------
    def send(self, cmd: str) -> bool:
        if not self.is_running():
            return False
        self.proc.write((json.dumps({"cmd": cmd}) + "\n").encode())
        return True

    def pause(self) -> bool:
        return self.send("pause")

    def resume(self) -> bool:
        return self.send("resume")

    def stop(self, timeout_s: float = GRACEFUL_STOP_S) -> None:
        """Graceful stop (the engine finishes its step, checkpoints, reports ``stopped``), then force."""
        self.stop_requested = True
        if not self.send("stop"):
            signal_engine(self.engine_pid, signal.SIGTERM)
        self._stop_timer = QTimer(self)
        self._stop_timer.setSingleShot(True)
        self._stop_timer.timeout.connect(self.kill)
        self._stop_timer.start(int(timeout_s * 1000))

    def kill(self) -> None:
        """Kill the engine's whole process group (data loaders, compilers, every rank of a torchrun
        group), then the launcher."""
        if self.engine_pgid and self.engine_pgid > 1:
            signal_engine(self.engine_pgid, signal.SIGKILL, group=True)
        elif self.engine_pid and pid_alive(self.engine_pid):
            signal_engine(self.engine_pid, signal.SIGKILL, group=True)
        if self.is_running():
            self.proc.kill()

    # -- pipes ---------------------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        for line in self._out.feed(bytes(self.proc.readAllStandardOutput().data())):
            self._handle_stdout_line(line)

    def _handle_stdout_line(self, line: str) -> None:
        ev = parse_line(line)
        if ev is None:
            if line.strip():
                self.stdout_text.emit(line)
            return
        if ev["type"] == "run_started":
            self.engine_pid = int(ev.get("pid") or 0) or None
            self.engine_pgid = int(ev.get("pgid") or 0) or None
            self.run_id = ev.get("run_id")
        self.event.emit(ev)

    def _read_stderr(self) -> None:
        for line in self._err.feed(bytes(self.proc.readAllStandardError().data())):
            self.stderr_lines.append(line)
            self.stderr_text.emit(line)

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.start_failed.emit(f"Could not start the engine ({self.program}): {self.proc.errorString()}")

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read_stdout()
        self._read_stderr()
        for line in self._out.flush():
            self._handle_stdout_line(line)
        for line in self._err.flush():
            self.stderr_lines.append(line)
            self.stderr_text.emit(line)
        if self._stop_timer is not None:
            self._stop_timer.stop()
        self.exit_code = code if status == QProcess.ExitStatus.NormalExit else -1
        self.finished.emit(self.exit_code)


def parse_json_output(text: str) -> tuple[Any | None, list[dict]]:
    """Split a ``--json`` command's stdout into its JSON result and any events (errors) it printed."""
    events, result = [], None
    try:
        return json.loads(text), []
    except json.JSONDecodeError:
        pass
    for line in text.splitlines():
        ev = parse_line(line)
        if ev is not None:
            events.append(ev)
            continue
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                pass
    return result, events
