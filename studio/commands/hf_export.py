"""``mediswift export-hf RUN_ID --out DIR`` in the background.

The export needs torch (it reads the checkpoint); the studio never imports it, so the engine's own
CLI runs in a QProcess and its ``--json`` report (or its ``error`` event) is what the user sees.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, Signal

from studio.commands.engine_process import engine_env, parse_json_output

PROMPT_FILE = "soft_prompt.safetensors"  # a prompt run's export holds its soft prompt in this file


class HfExportJob(QObject):
    """One export. ``done(ok, message, report)``: the report is the CLI's JSON (empty on failure)."""

    done = Signal(bool, str, dict)

    def __init__(self, db_path: str | Path, run_id: str, out_dir: str | Path, overwrite: bool = False,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.run_id, self.out_dir = run_id, str(out_dir)
        self.args = ["-m", "engine", "export-hf", run_id, "--out", self.out_dir, "--json", "--db", str(db_path)]
        if overwrite:
            self.args.append("--overwrite")
        self.proc = QProcess(self)
        self.proc.setProcessEnvironment(engine_env())
        self.proc.finished.connect(self._finished)
        self.proc.errorOccurred.connect(self._error)
        self.result: tuple[bool, str, dict] | None = None

    def start(self) -> None:
        self.proc.start(sys.executable, self.args)

    def is_running(self) -> bool:
        return self.proc.state() != QProcess.ProcessState.NotRunning

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._report(False, f"could not start the engine: {self.proc.errorString()}", {})

    def _finished(self, code: int, _status) -> None:
        out = bytes(self.proc.readAllStandardOutput().data()).decode("utf-8", "replace")
        err = bytes(self.proc.readAllStandardError().data()).decode("utf-8", "replace")
        report, events = parse_json_output(out)
        if code == 0 and isinstance(report, dict):
            files = ", ".join(report.get("files") or [])
            sp = (report.get("sparsity") or {}).get("matrices")
            msg = (f"Exported run {self.run_id} to {report.get('out', self.out_dir)}"
                   + (f"\nfiles: {files}" if files else "")
                   + (f"\nsparsity of the attention/MLP matrices: {sp:.1%} (stored dense, zeros included)"
                      if isinstance(sp, (int, float)) else "")
                   + (f"\nsoft prompt: {PROMPT_FILE}" if PROMPT_FILE in (report.get("files") or []) else ""))
            self._report(True, msg, report)
            return
        errors = [e["message"] for e in events if e.get("type") == "error" and e.get("message")]
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-5:]
        self._report(False, "; ".join(errors) or "\n".join(tail) or f"export-hf exited with code {code}", {})

    def _report(self, ok: bool, message: str, report: dict) -> None:
        if self.result is None:  # FailedToStart is followed by no finished(), a crash by both: report once
            self.result = (ok, message, report)
            self.done.emit(ok, message, report)
