"""One run's tab: header with status, progress and controls; live charts; log pane.

A run is fed either by the events of an engine process this studio started, or, when it was started
elsewhere or before the studio was reopened, by the run store: it follows the run (metric rows after the
last step held, new evaluations, the row's status, all as store signals) while the tab tails the run's
engine.log. Pause, resume and stop go through ``studio.commands.run_control``.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QLabel, QSplitter, QTabWidget, QVBoxLayout, QWidget

from studio.commands.engine_process import GRACEFUL_STOP_S, EngineProcess
from studio.commands.run_control import RunControl
from studio.models import formatting as fmt
from studio.models.labels import MAJORITY, TFIDF, is_prompt_stage
from studio.models.log_tail import FileTail, tail_lines
from studio.models.run_data import RunData, baseline_scores, prompt_tokens
from studio.models.run_store import FINAL_STATUSES, PROMPT_ARTIFACT, RunStore
from studio.views.live_monitor import LiveMonitor
from studio.widgets.log_pane import LogPane
from studio.widgets.prompt_tokens import PromptTokensTable
from studio.widgets.run_header import RunHeader

LOG_TAIL_MS = 1000  # a re-attached run's engine.log (a file, not the database) is read this often
HEADER_MS = 250  # the header follows the data at 4 Hz, not per event (200 events/s would starve the event loop)
LIVE = ("starting", "running", "paused")
ENDED_BADLY = ("crashed", "failed")


class RunView(QWidget):
    resume_requested = Signal(str)  # run id: start `train --resume` for it
    engine_error = Signal(dict)  # an `error` event (with key/path) for the form to show at its field
    status_changed = Signal(str, str)  # run id, status
    launch_failed = Signal(str)  # the engine ended before creating the run: nothing to show here but the error

    def __init__(self, store: RunStore, parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.data = RunData()
        self.run_id: str | None = None
        self.run: dict | None = None
        self.status = "starting"
        self.has_checkpoint = False
        self.process_exit_code: int | None = None
        self.last_error: str | None = None  # the last `error` event's message
        self.log_tail: FileTail | None = None
        self._watching: str | None = None
        self._meta: dict = {}
        self._tokens_per_s: float | None = None
        self.title = "starting…"
        self.control = RunControl(lambda: self.status in FINAL_STATUSES, self)
        self._build()
        self.control.message.connect(lambda text: self.log.append("studio", text))
        self.log_timer = QTimer(self, interval=LOG_TAIL_MS)
        self.log_timer.timeout.connect(self._read_log)
        self._header_version = -1
        self.header_timer = QTimer(self, interval=HEADER_MS)
        self.header_timer.timeout.connect(self._refresh_header)
        self.header_timer.start()
        store.status_changed.connect(self._store_status)
        store.run_updated.connect(self._store_row)
        store.metrics_added.connect(self._store_metrics)
        store.evaluations_added.connect(self._store_evaluations)

    # -- layout ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.header = RunHeader({"pause": self.pause, "resume": self.resume, "stop": self.stop,
                                 "restart": self.request_resume})
        h = self.header
        self.name_label, self.status_label, self.precision_label, self.world_label = (
            h.name_label, h.status_label, h.precision_label, h.world_label)
        self.progress, self.eta_label, self.buttons = h.progress, h.eta_label, h.buttons
        self.banner = QLabel("", objectName="banner")
        self.banner.setWordWrap(True)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.banner.setMinimumWidth(1)  # word wrap only: a long log line must not widen the window
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
        self.prompt_table = PromptTokensTable()
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.monitor)
        split.addWidget(self.bottom)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.addWidget(self.header)
        lay.addWidget(self.banner)
        lay.addWidget(split, 1)

    @property
    def process(self) -> EngineProcess | None:
        return self.control.process

    @property
    def pid(self) -> int | None:
        return self.control.pid

    # -- feeds ----------------------------------------------------------------------------------------
    def attach_process(self, proc: EngineProcess) -> None:
        """Follow an engine process we started (a new run, or a resume of this view's run)."""
        self.control.process = proc
        proc.event.connect(self.handle_event)
        proc.stderr_text.connect(lambda line: self.log.append("stderr", line))
        proc.stdout_text.connect(lambda line: self.log.append("stderr", line))
        proc.start_failed.connect(self._start_failed)
        proc.finished.connect(self._process_finished)
        if self.run_id:
            self.store.unfollow(self.run_id)  # the events feed it now
        self.log_timer.stop()
        self.banner.hide()
        self._set_status("starting")
        self.log.append("studio", "$ " + proc.command_line())

    def attach_run(self, run_id: str) -> bool:
        """Show a run from the database; keep following it while it is live (re-attach)."""
        run = self.store.run(run_id)
        if run is None:
            return False
        self._set_run(run)
        self.data.add_db_rows(self.store.metrics(run["id"]))
        evals = self.store.evaluations(run["id"])
        self.data.add_db_evaluations(evals)
        self.control.pid = run.get("pid")
        log_path = Path(run.get("run_dir") or "") / "engine.log"
        if run["status"] in FINAL_STATUSES:
            for line in tail_lines(log_path, 200):
                self.log.append("log", line)
        else:
            for line in tail_lines(log_path, 50):
                self.log.append("log", line)
            self.log_tail = FileTail(log_path, from_end_bytes=0)
            self.log_timer.start()
            self.store.follow(run["id"], self.data.last_step or -1, (e["id"] for e in evals))
            self.log.append("studio", f"re-attached to run {run['id']} (pid {self.pid})")
        self._set_status(run["status"])
        if run["status"] in ENDED_BADLY:
            self._show_crash(None)
        self._show_results(run)
        self.monitor.redraw(force=True)
        return True

    # -- what the run store reports -------------------------------------------------------------------
    def _store_status(self, run_id: str, status: str) -> None:
        if run_id != self.run_id or status == self.status:
            return
        run = self.store.run(run_id)
        if run is not None:
            self.run = run
            self.control.pid = run.get("pid") or self.pid
        self._set_status(status)
        if status in ENDED_BADLY:
            # shown at once; when our own process's end arrives it adds the exit code and stderr
            self._show_crash(None, self.process_stderr)
        if status in FINAL_STATUSES and self.process is None:
            self._stop_following()
            if run is not None:
                self._show_results(run)
            self._update_progress()

    def _store_row(self, run_id: str, row: dict) -> None:
        if run_id != self.run_id:
            return
        self.run = row
        if self.process is None:
            self.control.pid = row.get("pid") or self.pid
        if not self.precision_label.text():
            # the engine records the precision as the run starts, before its first step's metrics
            self._show_precision(row)

    def _store_metrics(self, run_id: str, rows: list) -> None:
        if run_id == self.run_id and self.process is None:
            self.data.add_db_rows(rows)

    def _store_evaluations(self, run_id: str, evals: list) -> None:
        if run_id == self.run_id and self.process is None:
            self.data.add_db_evaluations(evals)

    def _read_log(self) -> None:
        if self.log_tail is not None:
            for line in self.log_tail.read_new():
                self.log.append("log", line)

    def _watch(self, run_id: str) -> None:
        """Have the store poll this run (its status within a tick, its engine's death noticed)."""
        if self._watching != run_id:
            if self._watching:
                self.store.unwatch(self._watching)
            self.store.watch(run_id)
            self._watching = run_id

    def _stop_following(self) -> None:
        self._read_log()
        self.log_timer.stop()
        if self.run_id:
            self.store.unfollow(self.run_id)

    # -- results of fine-tuning and prompting ---------------------------------------------------------
    def _show_results(self, run: dict) -> None:
        """Majority and TF-IDF baselines on the score chart (each where the run's meta has it); a prompt run's
        nearest tokens (both from the database)."""
        for kind in (MAJORITY, TFIDF):  # none stored (an older run, a pre-training run): no line of that kind
            self.monitor.set_baselines(baseline_scores(run, kind), kind)
        if is_prompt_stage(run.get("stage") or ""):
            self.show_prompt_tokens(self.prompt_tokens(run))

    def prompt_tokens(self, run: dict) -> list[list[tuple[str, float | None]]]:
        """Per prompt vector, its nearest vocabulary tokens (token, cosine) from the run's prompt artifact,
        else the token strings kept in the run's meta."""
        return prompt_tokens(run, self.store.artifacts(run["id"], PROMPT_ARTIFACT))

    def show_prompt_tokens(self, rows: list[list[tuple[str, float | None]]]) -> None:
        t = self.prompt_table
        t.show_rows(rows)
        if self.bottom.indexOf(t) < 0:
            self.bottom.addTab(t, "Soft prompt: nearest tokens")
        self.bottom.setTabText(self.bottom.indexOf(t), f"Soft prompt: nearest tokens ({len(rows)} vectors)")

    def _set_run(self, run: dict) -> None:
        self.run, self.run_id = run, run["id"]
        self._watch(run["id"])
        cfg = run.get("config") or {}
        self.data.max_steps = (cfg.get("train") or {}).get("max_steps") or self.data.max_steps
        self.data.config = cfg  # the monitor hides the per-layer heatmap of a static mask
        self.title = run.get("name") or run["id"]
        self.control.pgid = int((run.get("meta") or {}).get("pgid") or 0)
        self._show_precision(run)
        self.header.show_name(self.title, run["id"], run["stage"])

    def _show_precision(self, run: dict) -> None:
        self.header.show_badge(self.precision_label, fmt.precision_badge(run.get("meta")))
        self._meta = run.get("meta") or {}
        self.control.pgid = int(self._meta.get("pgid") or 0)
        self._show_world()

    def _show_world(self, tokens_per_s: float | None = None) -> None:
        if tokens_per_s is not None:
            self._tokens_per_s = tokens_per_s
        self.header.show_badge(self.world_label, fmt.world_badge(self._meta, self._tokens_per_s))

    def handle_event(self, ev: dict) -> None:
        t = ev["type"]
        if t == "run_started":
            self.control.started(ev.get("pid"))
            self.header.show_stop_sent(False)
            run = self.store.run(ev["run_id"]) or {"id": ev["run_id"], "name": ev.get("name"), "stage": ev.get("stage"),
                                                    "config": ev.get("config"), "run_dir": ev.get("run_dir")}
            if self.run_id == ev["run_id"]:  # a resume replays the steps after its checkpoint
                self.data.truncate_after(self._checkpoint_step())
            self._set_run(run)
            self.data.max_steps = int(ev["max_steps"])
            self._set_status("running")
        elif t in ("metrics", "eval"):
            self.data.add_event(ev)
            tps = (ev.get("metrics") or {}).get("tokens_per_s") if t == "metrics" else None
            if tps:
                self._show_world(tps)
        elif t == "progress":
            total = max(int(ev["total"] or 0), 1)
            self.progress.setRange(0, total)
            self.progress.setValue(int(ev["done"]))
            self.progress.setFormat(f"{ev['phase']} %v/%m")
        elif t in ("status", "run_finished"):
            self._set_status(ev["status"])
        elif t == "checkpoint":
            self.log.append("log", f"checkpoint at step {ev['step']}: {ev['path']}")
        elif t == "error":
            self.last_error = ev["message"]
            self.show_banner(ev["message"] + (f"\n(field {ev['key']})" if ev.get("key") else "")
                             + (f"\n(file {ev['path']})" if ev.get("path") else ""))
            self.engine_error.emit(ev)
        self.log.add_event(ev)

    def _checkpoint_step(self) -> int:
        ck = self.store.latest_checkpoint(self.run_id) if self.run_id else None
        return int(ck["step"]) if ck else -1

    def _start_failed(self, message: str) -> None:
        self._set_status("failed")
        self.show_banner(message)
        self.launch_failed.emit(message)

    def _process_finished(self, code: int) -> None:
        self.process_exit_code = code
        if self.run_id:
            self.store.refresh_run(self.run_id)  # an engine gone without marking its run is reaped now
        run = self.store.run(self.run_id) if self.run_id else None
        if run is not None:
            self._set_run(run)
            self.data.add_db_rows(self.store.metrics(run["id"], after_step=-1))
            self.data.add_db_evaluations(self.store.evaluations(run["id"]))
            self._show_results(run)
            status = run["status"]
        else:
            status = "failed"
        if status not in FINAL_STATUSES:
            # the process is gone but nothing marked the row: treat as crashed (the store has the row
            # marked once the run's last process has ended: a rank of its group may still be dying)
            status = "crashed"
        self._set_status(status)
        if status in ENDED_BADLY:
            self._show_crash(code, self.process_stderr)
        self.log.append("studio", f"engine exited with code {code}; run {status}")
        stderr = [ln for ln in self.process_stderr if ln.strip()]
        self.control.process = None
        self._update_progress()
        if run is None:  # refused before the run existed (a bad config, a missing file): no run to show
            self.launch_failed.emit(self.last_error or (stderr[-1] if stderr else
                                                        f"the engine exited with code {code} before the run started"))

    def _show_crash(self, code: int | None, stderr: list[str] | None = None) -> None:
        lines = []
        if self.run and self.run.get("run_dir"):
            lines = tail_lines(Path(self.run["run_dir"]) / "engine.log", 12)
        lines += [f"stderr: {ln}" for ln in (stderr or [])[-8:]]
        err = (self.run or {}).get("error") or ""
        head = (f"Run {self.status}" + (f" (exit code {code})" if code not in (None, 0) else "")
                + (f": {err}" if err else ""))
        self.show_banner(head + ("\n" + "\n".join(lines) if lines else ""))

    @property
    def process_stderr(self) -> list[str]:
        return self.process.stderr_lines if self.process is not None else []

    def show_banner(self, text: str) -> None:
        self.banner.setText(text)
        self.banner.show()

    # -- status and progress ------------------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        changed = status != self.status
        self.status = status
        if self.data.live != (status in LIVE):  # charts of a run that stopped early fit its data, not max_steps
            self.data.live = status in LIVE
            self.data.version += 1
        # a run that ended before its first step has no charts to show: the error and the log take the tab
        charts = not (status in ENDED_BADLY and self.data.last_step is None)
        self.monitor.setVisible(charts)
        self.progress.setVisible(charts)
        self.header.show_status(status, self._status_detail())
        if changed and status in FINAL_STATUSES and self.run_id:  # read once per change, not per header tick
            self.has_checkpoint = self.store.latest_checkpoint(self.run_id) is not None
        self._enable_buttons()
        if changed and self.run_id:
            self.status_changed.emit(self.run_id, status)

    def _enable_buttons(self) -> None:
        status = self.status
        can_control = status in LIVE and self.control.can_control()
        self.buttons["pause"].setEnabled(can_control and status == "running")
        self.buttons["resume"].setEnabled(can_control and status == "paused")
        self.buttons["stop"].setEnabled(can_control and status != "starting")
        ended = status in ("stopped", *ENDED_BADLY) and bool(self.run_id)
        self.buttons["restart"].setEnabled(ended and self.has_checkpoint)

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
        self.control.pause()

    def resume(self) -> None:
        self.control.resume()

    def stop(self, timeout_s: float = GRACEFUL_STOP_S) -> None:
        """Graceful stop first; the process group is killed if the run has not ended after ``timeout_s``,
        or at once on a second Stop (the button then reads "Kill now")."""
        self.control.stop(timeout_s)
        self.header.show_stop_sent(self.control.stop_sent)

    def kill_now(self) -> None:
        """The second Stop: every process of the run (each rank of a process group) killed now."""
        self.control.kill_now()

    def request_resume(self) -> None:
        if self.run_id:
            self.resume_requested.emit(self.run_id)

    def detach(self) -> None:
        """Stop following the engine without touching it (the studio is closing, or the tab)."""
        self.log_timer.stop()
        self.header_timer.stop()
        self.monitor.timer.stop()
        if self.run_id:
            self.store.unfollow(self.run_id)
        if self._watching:
            self.store.unwatch(self._watching)
            self._watching = None
        self.control.detach()

    def is_live(self) -> bool:
        return self.status in LIVE
