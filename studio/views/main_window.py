"""The main window: New run (form + estimate), Runs (browser), Compare (opened from the browser's
selection) and one tab per opened run.

Everything fits a 1280×720 screen whatever the run names: tab titles and the status bar's path are
shortened (full text in tooltips), and a tab's own controls wrap or scroll rather than widen the window.

Closing never kills a run: the default answer keeps runs going, and the next start re-attaches to
every run still marked running (after reaping the ones whose engine died).

The window owns the run store (``studio.models.run_store.RunStore``: the one poller of the run
database, whose signals every tab follows) and the commands (``studio.commands``: every write).
"""
from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMainWindow, QMessageBox, QTabWidget, QWidget

from engine.core.config import FAMILIES
from engine.core.paths import default_db_path, default_runs_dir
from studio.commands.engine_process import EngineProcess, train_args
from studio.commands.hf_export import HfExportJob
from studio.commands.run_commands import Commands
from studio.models.config_form import PARENT_STATUSES
from studio.models.families import model_line, run_model
from studio.models.formatting import elide
from studio.models.labels import STATUS_MARKS
from studio.models.run_store import LIVE_STATUSES, RunStore
from studio.views.compare_view import ComparePanel
from studio.views.queue_view import QueueView
from studio.views.run_form import RunForm
from studio.views.run_view import RunView
from studio.views.runs_browser import RunsBrowser
from studio.views.study_view import StudyView
from studio.widgets.elided_label import ElidedLabel
from studio.widgets.estimate_panel import EstimatePanel
from studio.widgets.schedule_preview import SchedulePreview

KEEP, STOP, CANCEL = "keep", "stop", "cancel"
TAB_TITLE_CHARS = 32  # a run's tab title beyond this is cut with "…" (the whole name is its tooltip)
START_KEYS = (QKeySequence("Ctrl+Return"), QKeySequence("Ctrl+Enter"))  # Return and the keypad's Enter


class MainWindow(QMainWindow):
    def __init__(self, db_path: str | Path | None = None, runs_dir: str | Path | None = None, attach: bool = True):
        super().__init__()
        self.store = RunStore(db_path or default_db_path(), self)
        self.commands = Commands(self.store, self)
        self.runs_dir = Path(runs_dir) if runs_dir else default_runs_dir(self.store.path)
        self.views: list[RunView] = []
        self.compare: ComparePanel | None = None  # created on first use: it reads every run's series
        self.studies: dict[str, StudyView] = {}  # sweep id -> its open Study tab
        self.hf_jobs: list[HfExportJob] = []
        self.import_jobs: list[EngineProcess] = []
        self.close_policy: str | None = None  # tests and scripts answer the close question without a dialog
        self.setWindowTitle(f"MediSwift Studio — {self.store.path}")
        self._initial_size()

        self.form = RunForm(self.store, self.runs_dir)
        self.schedule = SchedulePreview()  # below the estimate: what the masks will do, before launch
        self.form.add_side_widget(self.schedule)
        self.form.changed.connect(lambda: self.schedule.show_config(self.form.planned_config()))
        self.estimate = EstimatePanel(lambda n: self.form.estimate_args(n) if self.form.is_valid() else None)
        self.form.add_side_widget(self.estimate)
        self.form.changed.connect(lambda: self.estimate.config_changed(self.form.is_valid()))
        self.form.start_requested.connect(self.start_run)
        self.form.queue_requested.connect(self.queue_run)
        self.estimate.runner.failed.connect(self._estimate_failed)
        self.browser = RunsBrowser(self.store, self.commands)
        self.browser.open_requested.connect(self.open_run)
        self.browser.clone_requested.connect(self.clone_run)
        self.browser.resume_requested.connect(self.resume_run)
        self.browser.compare_requested.connect(self.open_compare)
        self.browser.export_hf_requested.connect(lambda rid: self.export_hf(rid))
        self.browser.run_deleted.connect(self._run_deleted)

        self.tabs = QTabWidget(objectName="tabs")
        self.tabs.setTabsClosable(True)
        self.tabs.setDocumentMode(True)
        self.tabs.setElideMode(Qt.TextElideMode.ElideRight)
        self.tabs.tabBar().setUsesScrollButtons(True)  # many tabs scroll; they never widen the window
        self.tabs.tabCloseRequested.connect(self._close_tab)
        self.tabs.addTab(self.form, "New run")
        self.tabs.addTab(self.browser, "Runs")
        self.queue = QueueView(self.store, self.commands)
        self.queue.run_activated.connect(self.open_run)
        self.queue.study_requested.connect(self.open_study)
        self.tabs.addTab(self.queue, "Queue")
        for i in range(3):  # the three fixed pages cannot be closed
            self.tabs.tabBar().setTabButton(i, self.tabs.tabBar().ButtonPosition.RightSide, None)
        self.setCentralWidget(self.tabs)
        self._menus()
        self.db_label = ElidedLabel(f"database: {self.store.path}", mode=Qt.TextElideMode.ElideMiddle)
        self.statusBar().addPermanentWidget(self.db_label)
        self.store.status_changed.connect(self._store_status)
        self.estimate.config_changed(self.form.is_valid())
        self.schedule.show_config(self.form.planned_config())
        if attach:
            self.reattach()

    def _menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        for text, slot, key in (("New run", lambda: self.tabs.setCurrentWidget(self.form), QKeySequence.StandardKey.New),
                                ("New sweep…", lambda: (self.tabs.setCurrentWidget(self.queue),
                                                        self.queue.new_sweep(self.runs_dir)), QKeySequence()),
                                ("Import TOML…", self.form.import_toml, QKeySequence.StandardKey.Open),
                                ("Import model…", lambda: self.import_model(), QKeySequence()),
                                ("Export TOML…", self.form.export_toml, QKeySequence.StandardKey.SaveAs),
                                ("Close tab", self.close_current_tab, QKeySequence("Ctrl+W")),
                                ("Quit", self.close, QKeySequence.StandardKey.Quit)):
            a = QAction(text, self)
            a.setShortcut(key)
            a.triggered.connect(slot)
            file.addAction(a)
        run = self.menuBar().addMenu("&Run")
        for text, slot in (("Start", self.start_from_form), ("Pause", lambda: self._on_current("pause")),
                           ("Resume", lambda: self._on_current("resume")), ("Stop", lambda: self._on_current("stop"))):
            a = QAction(text, self)
            a.triggered.connect(slot)
            run.addAction(a)
            if text == "Start":
                a.setShortcuts(list(START_KEYS))
        a = QAction("Export chart…", self)
        a.triggered.connect(self._export_current_chart)
        run.addAction(a)
        view = self.menuBar().addMenu("&View")
        for text, slot in (("Runs", lambda: self.tabs.setCurrentWidget(self.browser)),
                           ("Queue", lambda: self.tabs.setCurrentWidget(self.queue)),
                           ("Compare selected runs", self.browser.compare_selected)):
            a = QAction(text, self)
            a.triggered.connect(slot)
            view.addAction(a)
        view.addSeparator()
        for text, slot, key in (("Find run…", self.focus_search, QKeySequence.StandardKey.Find),
                                ("Refresh", self.refresh_current, QKeySequence.StandardKey.Refresh)):
            a = QAction(text, self)
            a.setShortcut(key)
            a.triggered.connect(slot)
            view.addAction(a)
        self.menu_actions = {a.text(): a for m in (file, run, view) for a in m.actions() if a.text()}

    def _initial_size(self) -> None:
        """Roomy where the screen allows, never larger than the screen (a 1366×768 laptop included)."""
        screen = self.screen().availableGeometry() if self.screen() else None
        w, h = 1500, 950
        if screen is not None and screen.width() > 0:
            w, h = min(w, screen.width()), min(h, screen.height())
        self.resize(w, h)

    # -- keyboard ----------------------------------------------------------------------------------------
    def start_from_form(self) -> RunView | None:
        """Ctrl+Enter, Run → Start: starts the form's run when the form is on screen; elsewhere it shows the
        form first (a run is never started from a form the user is not looking at)."""
        if self.tabs.currentWidget() is not self.form:
            self.tabs.setCurrentWidget(self.form)
            self.statusBar().showMessage("Check the run, then Ctrl+Enter starts it.", 5000)
            return None
        return self.start_run()

    def close_current_tab(self) -> None:
        """Ctrl+W: the current run, Compare or Study tab (New run, Runs and Queue stay)."""
        self._close_tab(self.tabs.currentIndex())

    def focus_search(self) -> None:
        """Ctrl+F: the runs list's search box, its text selected for typing over."""
        self.tabs.setCurrentWidget(self.browser)
        box = self.browser.findChild(QWidget, "search")
        if box is not None:
            box.setFocus(Qt.FocusReason.ShortcutFocusReason)
            box.selectAll()

    def refresh_current(self) -> None:
        """F5: re-read the database now and redraw the current list."""
        self.store.refresh()
        page = self.tabs.currentWidget()
        if page is self.form:
            self.form.refresh_parents()
        elif page is self.compare and page is not None:
            page.charts.reload_runs()
        elif callable(getattr(page, "refresh", None)):
            page.refresh()
        self.statusBar().showMessage("refreshed", 2000)

    def set_tab_title(self, page: QWidget, title: str) -> None:
        """A tab's title, cut to a few words's width; the whole title in its tooltip."""
        i = self.tabs.indexOf(page)
        if i >= 0:
            self.tabs.setTabText(i, elide(title, TAB_TITLE_CHARS))
            self.tabs.setTabToolTip(i, title)

    def import_model(self, folder: str | None = None) -> EngineProcess | None:
        """A Hugging Face model folder (of a family the engine has) as a run to start from (``mediswift
        import-hf``, in the background); it then appears in the runs browser and in the parent pickers."""
        folder = folder or QFileDialog.getExistingDirectory(
            self, f"Import a Hugging Face model folder ({', '.join(FAMILIES)})")
        if not folder:
            return None
        out: list[str] = []
        proc = EngineProcess(["import-hf", str(folder), "--json", "--db", str(self.store.path), "--runs-dir",
                              str(self.runs_dir)], self, launcher=False)
        proc.stdout_text.connect(out.append)
        proc.finished.connect(lambda code: self._imported(proc, code, out))
        self.statusBar().showMessage(f"importing {folder}…")
        proc.start()
        self.import_jobs.append(proc)
        return proc

    def _imported(self, proc: EngineProcess, code: int, out: list[str]) -> None:
        if code == 0 and out:
            report = json.loads(out[-1])
            self.browser.refresh()
            self.form.refresh_parents()
            # the family and shape as stored (grouped-query heads included), as the runs list shows them
            run = self.store.run(report["run_id"])
            model = run_model(run) if run else None
            shape = model_line(model) if model else report.get("family", "")
            self.statusBar().showMessage(f"imported {report['from']} as run {report['run_id']} ({shape}, "
                                         f"{report['params']:,} parameters): pick it as the parent of a run", 15000)
        else:
            lines = [ln.split("error: ", 1)[-1] for ln in proc.stderr_lines if ln.strip()]
            message = lines[-1] if lines else f"import-hf failed (exit code {code})"
            self.statusBar().showMessage(message, 15000)
            QMessageBox.warning(self, "Could not import the model", message)

    # -- runs -----------------------------------------------------------------------------------------------
    def _add_view(self, view: RunView, title: str) -> RunView:
        self.views.append(view)
        view.resume_requested.connect(self.resume_run)
        view.engine_error.connect(self._engine_error)
        view.status_changed.connect(self._view_status)
        view.launch_failed.connect(lambda message, v=view: self._launch_failed(v, message))
        self.tabs.addTab(view, title)
        self.set_tab_title(view, STATUS_MARKS.get(view.status, "") + title)
        self.tabs.setCurrentWidget(view)
        return view

    def start_run(self) -> RunView | None:
        """Start the form's run through the launcher; its tab follows the events."""
        if not self.form.is_valid():
            self.statusBar().showMessage("Fix the marked fields first.", 5000)
            return None
        self.estimate.runner.cancel()  # the probe would compete with the run for the CPU
        proc = EngineProcess(self.form.run_args(self.store.path, self.runs_dir), self)
        view = self._add_view(RunView(self.store), self.form.config.name or "new run")
        view.attach_process(proc)
        proc.event.connect(lambda ev, v=view: ev["type"] == "run_started" and self._retitle(v))
        proc.start()
        self.statusBar().showMessage("run started", 3000)
        return view

    def queue_run(self) -> int | None:
        """Put the form's run on the queue (it starts when the runs before it are done)."""
        if not self.form.is_valid():
            self.statusBar().showMessage("Fix the marked fields first.", 5000)
            return None
        entry = self.queue.add_run(**self.form.queue_entry(self.runs_dir))
        self.tabs.setCurrentWidget(self.queue)
        self.statusBar().showMessage(f"queued as entry {entry}", 5000)
        return entry

    def open_study(self, sweep_id: str) -> StudyView:
        """The Study tab of a sweep (one per sweep)."""
        view = self.studies.get(sweep_id)
        if view is None or self.tabs.indexOf(view) < 0:
            view = StudyView(self.store, sweep_id)
            view.run_activated.connect(self.open_run)
            view.compare_requested.connect(lambda ids: ids and self.open_compare(ids))
            self.studies[sweep_id] = view
            self.tabs.addTab(view, "Study")
            self.set_tab_title(view, f"Study: {view.study['sweep']['name']}")
        else:
            view.refresh()
        self.tabs.setCurrentWidget(view)
        return view

    def resume_run(self, run_id: str) -> RunView | None:
        view = self.view_for(run_id) or self.open_run(run_id)
        if view is None or view.process is not None:
            return view
        proc = EngineProcess(train_args(None, db=self.store.path, runs_dir=self.runs_dir, resume=view.run_id), self)
        view.attach_process(proc)
        proc.start()
        self.tabs.setCurrentWidget(view)
        return view

    def open_run(self, run_id: str) -> RunView | None:
        view = self.view_for(run_id)
        if view is None:
            view = RunView(self.store)
            if not view.attach_run(run_id):
                view.detach()
                view.deleteLater()
                return None
            self._add_view(view, view.title)
        self.tabs.setCurrentWidget(view)
        return view

    def clone_run(self, run_id: str) -> None:
        if self.form.clone_run(run_id):
            self.tabs.setCurrentWidget(self.form)

    def open_compare(self, run_ids: list[str]) -> ComparePanel:
        """The Compare tab showing these runs (one tab, re-pointed on each request)."""
        if self.compare is None or self.tabs.indexOf(self.compare) < 0:
            self.compare = ComparePanel(self.store, run_ids)
            self.compare.run_activated.connect(self.open_run)
            self.tabs.insertTab(2, self.compare, "Compare")
        else:
            self.compare.charts.reload_runs()  # runs finished since the tab was opened
            self.compare.set_runs(list(run_ids))
        self.tabs.setCurrentWidget(self.compare)
        return self.compare

    def export_hf(self, run_id: str, out_dir: str | None = None) -> HfExportJob | None:
        """``mediswift export-hf`` for a run, in the background; the result is reported when it ends."""
        if not out_dir:
            run = self.store.run(run_id) or {"name": run_id}
            out_dir = QFileDialog.getExistingDirectory(self, f"Export {run.get('name') or run_id} to a new folder")
            if not out_dir:
                return None
        job = HfExportJob(self.store.path, run_id, out_dir, parent=self)
        job.done.connect(lambda ok, msg, _r, j=job: self._hf_done(j, ok, msg))
        self.hf_jobs.append(job)
        job.start()
        self.statusBar().showMessage(f"exporting run {run_id} to Hugging Face format in {out_dir}…")
        return job

    def _hf_done(self, job: HfExportJob, ok: bool, message: str) -> None:
        self.statusBar().showMessage(("exported: " if ok else "export failed: ") + message.splitlines()[0], 10000)
        box = QMessageBox(QMessageBox.Icon.Information if ok else QMessageBox.Icon.Warning, "Export to Hugging Face",
                          message, QMessageBox.StandardButton.Ok, self)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()  # not exec(): the report must not block the event loop (live runs keep drawing)
        if job in self.hf_jobs:
            self.hf_jobs.remove(job)
        job.deleteLater()

    def _run_deleted(self, run_id: str) -> None:
        view = self.view_for(run_id)
        if view is not None:
            self._close_tab(self.tabs.indexOf(view))
        if self.compare is not None:
            self.compare.charts.reload_runs()
        self.form.refresh_parents()

    def _export_current_chart(self) -> None:
        view = self.tabs.currentWidget()
        if isinstance(view, RunView):
            view.monitor.export_chart_dialog()
        elif isinstance(view, ComparePanel):
            view.charts.export_chart_dialog()
        elif isinstance(view, StudyView):
            view.export_chart_dialog()

    def view_for(self, run_id: str) -> RunView | None:
        return next((v for v in self.views if v.run_id == run_id), None)

    def reattach(self) -> list[str]:
        """Open a tab for every run still live in the database (after reaping dead engines)."""
        self.commands.reap_crashed()
        ids = [r["id"] for r in self.store.runs() if r["status"] in LIVE_STATUSES and r["status"] != "created"]
        for run_id in reversed(ids):
            self.open_run(run_id)
        if ids:
            self.statusBar().showMessage(f"re-attached to {len(ids)} running run(s)", 5000)
        return ids

    def _retitle(self, view: RunView) -> None:
        self.set_tab_title(view, view.title)

    def _view_status(self, run_id: str, status: str) -> None:
        view = self.view_for(run_id)
        if view is not None:
            self.set_tab_title(view, STATUS_MARKS.get(status, "") + view.title)

    def _launch_failed(self, view: RunView, message: str) -> None:
        """The engine refused the run before creating it: its tab would only hold empty charts, so it goes,
        and the form (where the fix is made) says why; a field or file the error names is marked there."""
        i = self.tabs.indexOf(view)
        if i >= 0:
            self._close_tab(i)
        self.form.show_launch_error(message)
        self.tabs.setCurrentWidget(self.form)
        self.statusBar().showMessage(f"The run did not start: {message}", 15000)

    def _store_status(self, _run_id: str, status: str) -> None:
        """A run finished (here, elsewhere or in the queue): it may now be a parent."""
        if status in PARENT_STATUSES:
            self.form.refresh_parents()

    def _engine_error(self, ev: dict) -> None:
        """An engine error naming a field or file: show it at that field in the form."""
        if ev.get("key") or ev.get("path"):
            self.form.show_engine_error(ev["message"], ev.get("key"), ev.get("path"))
            self.tabs.setCurrentWidget(self.form)
        self.statusBar().showMessage(ev["message"], 10000)

    def _estimate_failed(self, message: str, key, path) -> None:
        if key or path:
            self.form.show_engine_error(message, key, path)

    def _on_current(self, action: str) -> None:
        view = self.tabs.currentWidget()
        if isinstance(view, RunView):
            getattr(view, action)()

    def _close_tab(self, i: int) -> None:
        view = self.tabs.widget(i)
        if view is self.compare:
            self.tabs.removeTab(i)
            self.compare = None
            view.charts.release()
            view.deleteLater()
        elif isinstance(view, StudyView):
            self.studies.pop(view.sweep_id, None)
            self.tabs.removeTab(i)
            view.deleteLater()
        elif isinstance(view, RunView):
            view.detach()  # a live run keeps going; reopen it from Runs
            self.views.remove(view)
            self.tabs.removeTab(i)
            view.deleteLater()

    # -- closing ---------------------------------------------------------------------------------------------
    def live_views(self) -> list[RunView]:
        return [v for v in self.views if v.is_live()]

    def ask_close(self, live: list[RunView]) -> str:
        box = QMessageBox(self)
        box.setWindowTitle("Runs still training")
        box.setText(f"{len(live)} run(s) are still training.")
        box.setInformativeText("They keep running in the background and reappear here when you reopen the studio.")
        keep = box.addButton("Keep running", QMessageBox.ButtonRole.AcceptRole)
        stop = box.addButton("Stop them", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return KEEP if clicked is keep else STOP if clicked is stop else CANCEL

    def closeEvent(self, event) -> None:
        live = self.live_views()
        answer = KEEP
        if live:
            answer = self.close_policy or self.ask_close(live)
        if answer == CANCEL:
            event.ignore()
            return
        for view in self.views:
            if answer == STOP and view.is_live():
                view.stop()
            view.detach()
        self.estimate.runner.cancel()
        self.store.stop()  # the queue's runner is a process of its own: it goes on
        event.accept()
