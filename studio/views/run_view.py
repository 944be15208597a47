"""One run's tab: header with status, progress and controls; live charts; log pane.

A run is fed either by the events of an engine process this studio started, or, when it was started
elsewhere or before the studio was reopened, by polling the run database (metrics after the last step
held, new evaluations, the row's status) and tailing the run's engine.log.
"""
from __future__ import annotations

import signal
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QHBoxLayout, QHeaderView, QLabel, QMessageBox, QProgressBar, QPushButton, QSplitter, QTableWidget, QTableWidgetItem,
    QTabWidget, QVBoxLayout, QWidget,
)

from engine.store.rundb import FINAL_STATUSES, RunDB, pid_alive
from studio.models import formatting as fmt
from studio.commands.engine_process import GRACEFUL_STOP_S, EngineProcess, signal_engine
from studio.views.live_monitor import LiveMonitor
from studio.widgets.log_pane import FileTail, LogPane, tail_lines
from studio.models.run_data import RunData

STATUS_COLORS = {"running": "#2e7d32", "paused": "#b8860b", "completed": "#1f77b4", "stopped": "#555",
                 "failed": "#c9302c", "crashed": "#c9302c", "created": "#555", "starting": "#555"}
POLL_MS = 1000


class RunView(QWidget):
    resume_requested = Signal(str)  # run id: start `train --resume` for it
    engine_error = Signal(dict)  # an `error` event (with key/path) for the form to show at its field
    status_changed = Signal(str, str)  # run id, status

    def __init__(self, db: RunDB, parent: QWidget | None = None):
        super().__init__(parent)
        self.db = db
        self.data = RunData()
        self.run_id: str | None = None
        self.run: dict | None = None
        self.status = "starting"
        self.process: EngineProcess | None = None
        self.pid: int | None = None
        self.log_tail: FileTail | None = None
        self._kill_timer: QTimer | None = None
        self._stop_sent = False  # a second Stop kills
        self.title = "starting…"
        self._build()
        self.poll_timer = QTimer(self, interval=POLL_MS)
        self.poll_timer.timeout.connect(self.poll)
        # the header follows the data at 4 Hz, not per event (200 events/s would starve the event loop)
        self._header_version = -1
        self.header_timer = QTimer(self, interval=250)
        self.header_timer.timeout.connect(self._refresh_header)
        self.header_timer.start()

    # -- layout ---------------------------------------------------------------------------------------
    def _build(self) -> None:
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
        self._meta: dict = {}
        self._tokens_per_s: float | None = None
        self.world_label.setStyleSheet("color: #555; padding: 0 6px;")
        self.buttons: dict[str, QPushButton] = {}
        head = QHBoxLayout()
        head.addWidget(self.name_label)
        head.addWidget(self.status_label, 1)
        head.addWidget(self.precision_label)
        head.addWidget(self.world_label)
        head.addWidget(self.progress)
        head.addWidget(self.eta_label)
        for key, text, tip, slot in (
            ("pause", "Pause", "Pause between steps (the process stays, memory is kept)", self.pause),
            ("resume", "Resume", "Continue a paused run", self.resume),
            ("stop", "Stop", "Graceful stop: finish the step, checkpoint, then exit", self.stop),
            ("restart", "Resume from checkpoint", "Continue a stopped or crashed run from its last checkpoint",
             self.request_resume),
        ):
            b = QPushButton(text, objectName=key)
            b.setToolTip(tip)
            b.clicked.connect(lambda _checked=False, f=slot: f())  # clicked(bool) must not reach stop(timeout_s)
            b.setEnabled(False)
            self.buttons[key] = b
            head.addWidget(b)
        self.banner = QLabel("", objectName="banner")
        self.banner.setWordWrap(True)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.banner.setStyleSheet("background: #fdecea; color: #611a15; padding: 6px; font-family: monospace;")
        self.banner.hide()

        self.monitor = LiveMonitor(self.data)
        self.log = LogPane()
        # below the charts: the log, and for a soft-prompt run the nearest vocabulary tokens of each
        # learned prompt vector (what the prompt "reads as")
        self.bottom = QTabWidget(objectName="run_bottom")
        self.bottom.setDocumentMode(True)
        self.bottom.setTabBarAutoHide(True)  # a lone "Log" tab would only take a row
        self.bottom.addTab(self.log, "Log")
        self.prompt_table = QTableWidget(objectName="prompt_tokens")
        self.prompt_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.prompt_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.monitor)
        split.addWidget(self.bottom)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(head)
        lay.addWidget(self.banner)
        lay.addWidget(split, 1)

    # -- feeds ----------------------------------------------------------------------------------------
    def attach_process(self, proc: EngineProcess) -> None:
        """Follow an engine process we started (a new run, or a resume of this view's run)."""
        self.process = proc
        proc.event.connect(self.handle_event)
        proc.stderr_text.connect(lambda line: self.log.append("stderr", line))
        proc.stdout_text.connect(lambda line: self.log.append("stderr", line))
        proc.start_failed.connect(self._start_failed)
        proc.finished.connect(self._process_finished)
        self.poll_timer.stop()
        self.banner.hide()
        self._set_status("starting")
        self.log.append("studio", "$ " + proc.command_line())

    def attach_run(self, run_id: str) -> bool:
        """Show a run from the database; keep polling while it is live (re-attach)."""
        run = self.db.get_run(run_id)
        if run is None:
            return False
        self._set_run(run)
        self.data.add_db_rows(self.db.metrics(run["id"]))
        self.data.add_db_evaluations(self.db.evaluations(run["id"]))
        self.pid = run.get("pid")
        log_path = Path(run.get("run_dir") or "") / "engine.log"
        if run["status"] in FINAL_STATUSES:
            for line in tail_lines(log_path, 200):
                self.log.append("log", line)
        else:
            for line in tail_lines(log_path, 50):
                self.log.append("log", line)
            self.log_tail = FileTail(log_path, from_end_bytes=0)
            self.poll_timer.start()
            self.log.append("studio", f"re-attached to run {run['id']} (pid {self.pid})")
        self._set_status(run["status"])
        if run["status"] in ("crashed", "failed"):
            self._show_crash(None)
        self._show_results(run)
        self.monitor.redraw(force=True)
        return True

    # -- results of fine-tuning and prompting ---------------------------------------------------------
    def _show_results(self, run: dict) -> None:
        """Majority baselines on the score chart; a prompt run's nearest tokens (both from the database)."""
        majority = ((run.get("meta") or {}).get("baselines") or {}).get("majority") or {}
        scores = {f"dev_{k}": float(v) for k, v in majority.items()
                  if k in ("accuracy", "macro_f1", "micro_f1") and isinstance(v, (int, float))}
        if scores:
            self.monitor.set_baselines(scores)
        if run.get("stage") == "prompt":
            self.show_prompt_tokens(self.prompt_tokens(run))

    def prompt_tokens(self, run: dict) -> list[list[tuple[str, float | None]]]:
        """Per prompt vector, its nearest vocabulary tokens (token, cosine) from the run's prompt artifact,
        else the token strings kept in the run's meta."""
        for art in reversed(self.db.artifacts(run["id"], "prompt")):
            rows = (art.get("meta") or {}).get("nearest_tokens")
            if rows:
                return [[(t.get("token", ""), t.get("cos")) if isinstance(t, dict) else (str(t), None) for t in row]
                        for row in rows]
        rows = (run.get("meta") or {}).get("prompt_nearest_tokens") or []
        return [[(str(t), None) for t in row] for row in rows]

    def show_prompt_tokens(self, rows: list[list[tuple[str, float | None]]]) -> None:
        t = self.prompt_table
        k = max((len(r) for r in rows), default=0)
        t.setRowCount(len(rows))
        t.setColumnCount(k)
        t.setHorizontalHeaderLabels([f"nearest {i + 1}" for i in range(k)])
        t.setVerticalHeaderLabels([f"v{i}" for i in range(len(rows))])
        for i, row in enumerate(rows):
            for j, (token, cos) in enumerate(row):
                # a BPE token's leading space is part of it: show it (and line breaks) visibly
                item = QTableWidgetItem(token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅")
                if cos is not None:
                    item.setToolTip(f"cosine similarity {cos:.3f}")
                t.setItem(i, j, item)
        if self.bottom.indexOf(t) < 0:
            self.bottom.addTab(t, "Soft prompt: nearest tokens")
        self.bottom.setTabText(self.bottom.indexOf(t), f"Soft prompt: nearest tokens ({len(rows)} vectors)")

    def _set_run(self, run: dict) -> None:
        self.run, self.run_id = run, run["id"]
        cfg = run.get("config") or {}
        self.data.max_steps = (cfg.get("train") or {}).get("max_steps") or self.data.max_steps
        self.title = run.get("name") or run["id"]
        self._show_precision(run)
        self.name_label.setText(f"{self.title}  <span style='color:#888; font-size: 12px'>{run['id']} · "
                                f"{run['stage']}</span>")

    def _show_precision(self, run: dict) -> None:
        text, tip = fmt.precision_badge(run.get("meta"))
        self.precision_label.setText(text)
        self.precision_label.setToolTip(tip)
        self._meta = run.get("meta") or {}
        self._show_world()

    def _show_world(self, tokens_per_s: float | None = None) -> None:
        if tokens_per_s is not None:
            self._tokens_per_s = tokens_per_s
        text, tip = fmt.world_badge(self._meta, self._tokens_per_s)
        self.world_label.setText(text)
        self.world_label.setToolTip(tip)

    def handle_event(self, ev: dict) -> None:
        t = ev["type"]
        if t == "run_started":
            self.pid = ev.get("pid")
            self._stop_sent = False
            self.buttons["stop"].setText("Stop")
            run = self.db.get_run(ev["run_id"]) or {"id": ev["run_id"], "name": ev.get("name"), "stage": ev.get("stage"),
                                                     "config": ev.get("config"), "run_dir": ev.get("run_dir")}
            if self.run_id == ev["run_id"]:  # a resume replays the steps after its checkpoint
                self.data.truncate_after(self._checkpoint_step())
            self._set_run(run)
            self.data.max_steps = int(ev["max_steps"])
            self._set_status("running")
        elif t in ("metrics", "eval"):
            self.data.add_event(ev)
            if not self.precision_label.text() and self.run_id:
                # the engine records the precision as the run starts, before its first step's metrics
                self._show_precision(self.db.get_run(self.run_id) or {})
            tps = (ev.get("metrics") or {}).get("tokens_per_s") if t == "metrics" else None
            if tps:
                self._show_world(tps)
        elif t == "progress":
            total = max(int(ev["total"] or 0), 1)
            self.progress.setRange(0, total)
            self.progress.setValue(int(ev["done"]))
            self.progress.setFormat(f"{ev['phase']} %v/%m")
        elif t == "status":
            self._set_status(ev["status"])
        elif t == "checkpoint":
            self.log.append("log", f"checkpoint at step {ev['step']}: {ev['path']}")
        elif t == "run_finished":
            self._set_status(ev["status"])
        elif t == "error":
            self.show_banner(ev["message"] + (f"\n(field {ev['key']})" if ev.get("key") else "")
                             + (f"\n(file {ev['path']})" if ev.get("path") else ""))
            self.engine_error.emit(ev)
        self.log.add_event(ev)

    def _checkpoint_step(self) -> int:
        ck = self.db.latest_checkpoint(self.run_id) if self.run_id else None
        return int(ck["step"]) if ck else -1

    def _start_failed(self, message: str) -> None:
        self._set_status("failed")
        self.show_banner(message)
        QMessageBox.critical(self, "Could not start the engine", message)

    def _process_finished(self, code: int) -> None:
        self.db.reap_crashed()
        self.process_exit_code = code
        run = self.db.get_run(self.run_id) if self.run_id else None
        if run is not None:
            self._set_run(run)
            self.data.add_db_rows(self.db.metrics(run["id"], after_step=-1))
            self.data.add_db_evaluations(self.db.evaluations(run["id"]))
            self._show_results(run)
            status = run["status"]
        else:
            status = "failed"
        if status not in FINAL_STATUSES:
            status = "crashed"  # the process is gone but nothing marked the row: treat as crashed
            self._reap_later(10)
        self._set_status(status)
        if status in ("crashed", "failed"):
            self._show_crash(code)
        self.log.append("studio", f"engine exited with code {code}; run {status}")
        self.process = None
        self._update_progress()

    def _reap_later(self, tries: int) -> None:
        """The launcher is gone but a rank of its group may still be dying (a forced stop): look again
        shortly, so the row is marked crashed once the run's last process has ended."""
        if tries <= 0 or not self.run_id:
            return

        def again():
            self.db.reap_crashed()
            run = self.db.get_run(self.run_id)
            if run is not None and run["status"] not in FINAL_STATUSES:
                self._reap_later(tries - 1)

        QTimer.singleShot(500, again)

    def _show_crash(self, code: int | None) -> None:
        lines = []
        if self.run and self.run.get("run_dir"):
            lines = tail_lines(Path(self.run["run_dir"]) / "engine.log", 12)
        if self.process is not None:
            lines += [f"stderr: {ln}" for ln in self.process.stderr_lines[-8:]]
        err = (self.run or {}).get("error") or ""
        head = f"Run {self.status}" + (f" (exit code {code})" if code not in (None, 0) else "") + (f": {err}" if err else "")
        self.show_banner(head + ("\n" + "\n".join(lines) if lines else ""))

    def show_banner(self, text: str) -> None:
        self.banner.setText(text)
        self.banner.show()

    def poll(self) -> None:
        """Re-attached runs: read what the engine wrote since the last poll."""
        if not self.run_id:
            return
        self.db.reap_crashed()
        self.data.add_db_rows(self.db.metrics(self.run_id, after_step=self.data.last_step or -1))
        self.data.add_db_evaluations(self.db.evaluations(self.run_id))
        if self.log_tail is not None:
            for line in self.log_tail.read_new():
                self.log.append("log", line)
        run = self.db.get_run(self.run_id)
        if run is not None:
            self.run = run
            self.pid = run.get("pid") or self.pid
            if not self.precision_label.text():
                self._show_precision(run)
            self._set_status(run["status"])
            if run["status"] in FINAL_STATUSES:
                self.data.add_db_rows(self.db.metrics(self.run_id, after_step=self.data.last_step or -1))
                self._show_results(run)
                self.poll_timer.stop()
                if run["status"] in ("crashed", "failed"):
                    self._show_crash(None)
        self._update_progress()

    # -- status and progress ------------------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        changed = status != self.status
        self.status = status
        color = STATUS_COLORS.get(status, "#333")
        self.status_label.setText(f"<b style='color:{color}'>{status}</b>  {self._status_detail()}")
        live = status in ("running", "paused", "starting")
        can_control = live and (self.process is not None or bool(self.pid))
        self.buttons["pause"].setEnabled(can_control and status == "running")
        self.buttons["resume"].setEnabled(can_control and status == "paused")
        self.buttons["stop"].setEnabled(can_control and status != "starting")
        ended = status in ("stopped", "crashed", "failed") and bool(self.run_id)
        self.buttons["restart"].setEnabled(ended and self.db.latest_checkpoint(self.run_id) is not None)
        if changed and self.run_id:
            self.status_changed.emit(self.run_id, status)

    def _status_detail(self) -> str:
        d = self.data
        parts = []
        if d.last_step is not None:
            parts.append(f"step {d.last_step:,}" + (f"/{d.max_steps:,}" if d.max_steps else ""))
        sps = d.seconds_per_step()
        if sps:
            parts.append(f"{1 / sps:.2f} steps/s" if sps < 1 else f"{sps:.1f} s/step")
        if d.latest("loss") is not None:
            parts.append(f"loss {d.latest('loss'):.4f}")
        if self.pid and self.status in ("running", "paused"):
            parts.append(f"pid {self.pid}")
        return " · ".join(parts)

    def _refresh_header(self) -> None:
        if self.data.version != self._header_version:
            self._header_version = self.data.version
            self._update_progress()

    def _update_progress(self) -> None:
        d = self.data
        if d.max_steps and d.last_step is not None:
            self.progress.setRange(0, d.max_steps)
            self.progress.setValue(min(d.last_step, d.max_steps))
            self.progress.setFormat("step %v/%m (%p %)")
        eta = d.eta_seconds()
        self.eta_label.setText(f"ETA {fmt.duration(eta)}" if eta is not None and self.status == "running" else "")
        self._set_status(self.status)

    # -- control -------------------------------------------------------------------------------------
    def pause(self) -> None:
        self._control("pause", signal.SIGUSR1)

    def resume(self) -> None:
        self._control("resume", signal.SIGUSR2)

    def _control(self, action: str, sig: int) -> None:
        """Through the engine process we started, else by signal to the run's pid (a run found running)."""
        if self.process is not None:
            getattr(self.process, action)()
        else:
            signal_engine(self.pid, sig)
        self.log.append("studio", f"{action} requested")

    def stop(self, timeout_s: float = GRACEFUL_STOP_S) -> None:
        """Graceful stop first; the process group is killed if the run has not ended after ``timeout_s``,
        or at once on a second Stop (the button then reads "Kill now")."""
        if self._stop_sent:
            self.kill_now()
            return
        self._stop_sent = True
        self.log.append("studio", f"stop requested (forced after {timeout_s:.0f} s, or press Kill now)")
        self.buttons["stop"].setText("Kill now")
        self.buttons["stop"].setToolTip("Kill every process of the run at once (no final checkpoint)")
        if self.process is not None:
            self.process.stop(timeout_s)
            return
        signal_engine(self.pid, signal.SIGTERM)
        self._kill_timer = QTimer(self, singleShot=True)
        self._kill_timer.timeout.connect(self._force_kill)
        self._kill_timer.start(int(timeout_s * 1000))

    def _force_kill(self) -> None:
        if self.pid and pid_alive(self.pid) and self.status not in FINAL_STATUSES:
            self.log.append("studio", "graceful stop timed out: killing the engine's process group")
            self._kill_group()

    def kill_now(self) -> None:
        """The second Stop: every process of the run (each rank of a process group) killed now."""
        self.log.append("studio", "killing the run's processes now")
        if self.process is not None:
            self.process.kill()
        else:
            self._kill_group()

    def _kill_group(self) -> None:
        # a run on several processes records the group that holds them all; one process leads its own
        pgid = int((self.run or {}).get("meta", {}).get("pgid") or 0)
        signal_engine(pgid if pgid > 1 else self.pid, signal.SIGKILL, group=True)

    def request_resume(self) -> None:
        if self.run_id:
            self.resume_requested.emit(self.run_id)

    def detach(self) -> None:
        """Stop following the engine without touching it (the studio is closing)."""
        self.poll_timer.stop()
        self.header_timer.stop()
        self.monitor.timer.stop()
        if self.process is not None:
            self.process.detach()
            self.process = None

    def is_live(self) -> bool:
        return self.status in ("starting", "running", "paused")
