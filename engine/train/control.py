"""Run control between steps: stop (SIGINT/SIGTERM or a stdin line) and pause/resume.

Control lines on stdin are JSON objects: {"cmd": "pause"} / {"cmd": "resume"} / {"cmd": "stop"}.
SIGUSR1 pauses and SIGUSR2 resumes, for re-attached studios that no longer hold the stdin pipe.
"""
from __future__ import annotations

import json
import signal
import sys
import threading


class Control:
    def __init__(self, read_stdin: bool = True):
        self.stop_requested = threading.Event()
        self.pause_requested = threading.Event()
        self.wake = threading.Event()
        self.stop_reason = ""
        self._prev: dict = {}
        self._read_stdin = read_stdin

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._prev[sig] = signal.signal(sig, self._on_stop_signal)
        self._prev[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: self.pause())
        self._prev[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda *_: self.resume())
        if self._read_stdin and sys.stdin is not None and not sys.stdin.isatty():
            threading.Thread(target=self._stdin_loop, name="control-stdin", daemon=True).start()

    def uninstall(self) -> None:
        for sig, handler in self._prev.items():
            signal.signal(sig, handler)
        self._prev.clear()

    def _on_stop_signal(self, signum, _frame) -> None:
        if self.stop_requested.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_requested.set()
        self.wake.set()

    def pause(self) -> None:
        self.pause_requested.set()

    def resume(self) -> None:
        self.pause_requested.clear()
        self.wake.set()

    def handle_line(self, line: str) -> str | None:
        line = line.strip()
        if not line:
            return None
        try:
            cmd = json.loads(line).get("cmd")
        except (json.JSONDecodeError, AttributeError):
            cmd = line  # plain words are accepted too: pause / resume / stop
        if cmd == "pause":
            self.pause()
        elif cmd == "resume":
            self.resume()
        elif cmd == "stop":
            self.request_stop("stop command")
        else:
            return None
        return cmd

    def _stdin_loop(self) -> None:
        try:
            for line in sys.stdin:
                self.handle_line(line)
        except (OSError, ValueError):
            pass  # stdin closed: keep running, signals still work
