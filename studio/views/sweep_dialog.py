"""New sweep…: a grid of runs queued from the studio, exactly as ``mediswift sweep`` would queue it.

The dialog holds what the command's arguments hold: a base config (a preset or a TOML file), settings for
every run (``--set``), grid keys and their values (``--grid``), an optional equal-FLOPs budget
(``--equal-flops``), chained fine-tuning or prompting stages (``--then``), runs at once (``--parallel``),
a name and a runs folder. It turns them into one ``SweepRequest``, plans it as the command does a moment
after each edit (each point with its planned steps and FLOPs, or the command's own error message), shows
the equivalent command, and queues through ``studio.commands``, the same planning and queueing calls the
command makes.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QCompleter, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
    QGroupBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QListWidget, QPlainTextEdit, QPushButton, QSpinBox,
    QSplitter, QTableWidget, QTableWidgetItem, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget,
)

from engine.core.config import field_docs
from engine.core.errors import InputError
from engine.core.paths import default_runs_dir, list_presets
from studio.commands.run_commands import Commands
from studio.commands.sweep_commands import (
    SweepRequest, budget_value, chain_presets, command_args, command_text, plan_preview,
)
from studio.models import formatting as fmt
from studio.models.run_store import MAX_PARALLEL, RunStore

DEFAULT_CONFIG = "demo"
DEFAULT_GRID = (("sparsity.level", "0, 0.5, 0.75"),)
REPLAN_MS = 300  # planning waits this long after the last edit (it validates every point)
ERROR_COLOR = "#c9302c"


class SweepDialog(QDialog):
    """``queued``: (sweep id, entry ids) once Queue sweep succeeded, and ``queued_name``."""

    def __init__(self, store: RunStore, commands: Commands, runs_dir: str | Path | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.store, self.commands = store, commands
        self.queued: tuple[str, list[int]] | None = None
        self.queued_name = ""
        self.preview: dict | None = None
        self.error = ""
        self.setWindowTitle("New sweep")
        self.replan_timer = QTimer(self, singleShot=True, interval=REPLAN_MS)
        self.replan_timer.timeout.connect(self.replan)
        self._build(str(runs_dir or default_runs_dir(store.path)))
        self.resize(1040, 640)
        self.replan()

    # -- layout ----------------------------------------------------------------------------------
    def _build(self, runs_dir: str) -> None:
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.config = QComboBox(objectName="sweep_config", editable=True)
        self.config.addItems(list_presets())
        self.config.setCurrentText(DEFAULT_CONFIG if DEFAULT_CONFIG in list_presets() else self.config.currentText())
        self.config.setToolTip("CONFIG: a preset name or a TOML file, the base of every run")
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._browse_into(self.config.setCurrentText))
        form.addRow("Base config", _row(self.config, browse))

        self.name = QLineEdit(objectName="sweep_name")
        self.name.setToolTip("--name: heads each run's name (SWEEP · POINT)")
        form.addRow("Sweep name", self.name)

        self.grid = QTableWidget(0, 2, objectName="sweep_grid")
        self.grid.setHorizontalHeaderLabels(["Key", "Values (comma-separated)"])
        self.grid.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        self.grid.horizontalHeader().setStretchLastSection(True)
        self.grid.setColumnWidth(0, 170)
        self.grid.verticalHeader().setVisible(False)
        self.grid.setToolTip("--grid KEY=V1,V2,…: several keys span every combination of their values")
        self.grid.setMinimumHeight(110)
        self.keys = sorted(k for k in field_docs() if k not in ("name", "stage"))
        for key, values in DEFAULT_GRID:
            self.add_grid_row(key, values)
        add_key = QPushButton("Add key", objectName="grid_add")
        add_key.clicked.connect(lambda: self.add_grid_row())
        remove_key = QPushButton("Remove key", objectName="grid_remove")
        remove_key.clicked.connect(self._remove_grid_row)
        self.grid.itemChanged.connect(lambda *_: self.changed())
        grid_box = QVBoxLayout()
        grid_box.setContentsMargins(0, 0, 0, 0)
        grid_box.addWidget(self.grid)
        grid_box.addLayout(_hbox(add_key, remove_key, None))
        form.addRow("Grid", _wrap(grid_box))

        self.sets = QPlainTextEdit(objectName="sweep_sets")
        self.sets.setPlaceholderText("one KEY=VALUE a line, e.g. train.max_steps=200")
        self.sets.setToolTip("--set KEY=VALUE for every run of the grid")
        self.sets.setFixedHeight(64)
        form.addRow("Every run", self.sets)

        self.equal = QCheckBox("equal training FLOPs:", objectName="sweep_equal_flops")
        self.equal.setToolTip("--equal-flops: each run gets the train.max_steps that spends this many training FLOPs")
        self.budget = QLineEdit("2e13", objectName="sweep_budget")
        self.budget.setEnabled(False)
        self.budget_units = QLabel(objectName="sweep_budget_units")
        self.equal.toggled.connect(self.budget.setEnabled)
        form.addRow("Budget", _row(self.equal, self.budget, self.budget_units))

        self.then = QListWidget(objectName="sweep_then")
        self.then.setFixedHeight(56)
        self.then.setToolTip("--then CONFIG: after each grid run completes, this stage starts from it (parent = that run)")
        self.then_pick = QComboBox(objectName="sweep_then_pick")
        self.then_pick.addItems(chain_presets())
        add_then = QPushButton("Add", objectName="then_add")
        add_then.clicked.connect(lambda: self.add_then(self.then_pick.currentText()))
        browse_then = QPushButton("Browse…")
        browse_then.clicked.connect(lambda: self._browse_into(self.add_then))
        remove_then = QPushButton("Remove", objectName="then_remove")
        remove_then.clicked.connect(self._remove_then)
        then_box = QVBoxLayout()
        then_box.setContentsMargins(0, 0, 0, 0)
        then_box.addWidget(self.then)
        then_box.addLayout(_hbox(self.then_pick, add_then, browse_then, remove_then, None))
        form.addRow("Then (chained)", _wrap(then_box))

        self.parallel = QSpinBox(objectName="sweep_parallel", minimum=0, maximum=MAX_PARALLEL)
        self.parallel.setSpecialValueText("as the queue is")
        self.parallel.setToolTip("--parallel: how many queued runs may train at once (they share this machine)")
        form.addRow("Runs at once", self.parallel)

        self.runs_dir = QLineEdit(runs_dir, objectName="sweep_runs_dir")
        self.runs_dir.setToolTip("--runs-dir: where each run's folder goes")
        form.addRow("Runs folder", self.runs_dir)

        left = QWidget()
        left.setLayout(form)

        # what the request plans to, and the command that does the same
        self.summary = QLabel(objectName="sweep_summary")
        self.summary.setWordWrap(True)
        self.points = QTreeWidget(objectName="sweep_points")
        self.points.setHeaderLabels(["Point", "Length", "Planned FLOPs"])
        self.points.setRootIsDecorated(False)
        head = self.points.header()
        head.setStretchLastSection(False)
        head.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)  # labels elide; length and FLOPs always show
        for col in (1, 2):
            head.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.points.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.command = QPlainTextEdit(objectName="sweep_command")
        self.command.setReadOnly(True)
        self.command.setFixedHeight(72)
        self.command.setStyleSheet("font-family: monospace;")
        copy = QPushButton("Copy command")
        copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.command.toPlainText()))
        plan_box = QGroupBox("Plan")
        plan_lay = QVBoxLayout(plan_box)
        plan_lay.addWidget(self.summary)
        plan_lay.addWidget(self.points, 1)
        plan_lay.addWidget(QLabel("The same from a terminal:"))
        plan_lay.addWidget(self.command)
        plan_lay.addLayout(_hbox(None, copy))

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(plan_box)
        split.setSizes([560, 460])
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.queue_button = self.buttons.addButton("Queue sweep", QDialogButtonBox.ButtonRole.AcceptRole)
        self.queue_button.setObjectName("queue_sweep")
        self.queue_button.setDefault(True)
        self.buttons.accepted.connect(self.queue)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(split, 1)
        lay.addWidget(self.buttons)

        for w in (self.name, self.budget, self.runs_dir):
            w.textChanged.connect(self.changed)
        self.config.currentTextChanged.connect(self.changed)
        self.sets.textChanged.connect(self.changed)
        self.equal.toggled.connect(self.changed)
        self.parallel.valueChanged.connect(self.changed)

    # -- editing ---------------------------------------------------------------------------------
    def add_grid_row(self, key: str = "", values: str = "") -> None:
        row = self.grid.rowCount()
        self.grid.insertRow(row)
        editor = QLineEdit(key)
        editor.setPlaceholderText("e.g. model.d_model")
        completer = QCompleter(self.keys, editor)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        editor.setCompleter(completer)
        editor.textChanged.connect(self.changed)
        editor.setFrame(False)
        self.grid.setCellWidget(row, 0, editor)
        self.grid.setItem(row, 1, QTableWidgetItem(values))
        self.changed()

    def _remove_grid_row(self) -> None:
        row = self.grid.currentRow()
        self.grid.removeRow(row if row >= 0 else self.grid.rowCount() - 1)
        self.changed()

    def add_then(self, config: str) -> None:
        if config:
            self.then.addItem(config)
            self.changed()

    def _remove_then(self) -> None:
        row = self.then.currentRow()
        self.then.takeItem(row if row >= 0 else self.then.count() - 1)
        self.changed()

    def _browse_into(self, put) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A config file", "", "TOML (*.toml)")
        if path:
            put(path)

    def set_grid(self, rows: list[tuple[str, str]]) -> None:
        """Replace the grid's keys and values (scripts, tests)."""
        self.grid.setRowCount(0)
        for key, values in rows:
            self.add_grid_row(key, values)

    def changed(self) -> None:
        self.replan_timer.start()

    # -- the request -----------------------------------------------------------------------------
    def grid_items(self) -> list[str]:
        out = []
        for row in range(self.grid.rowCount()):
            editor, item = self.grid.cellWidget(row, 0), self.grid.item(row, 1)
            key = editor.text().strip() if editor is not None else ""
            values = item.text().strip() if item is not None else ""
            if key or values:  # "0, 0.5" as "0,0.5": the command strips each value the same way
                out.append(f"{key}=" + ",".join(v.strip() for v in values.split(",")) if values else f"{key}=")
        return out

    def request(self) -> SweepRequest:
        """The dialog as one ``mediswift sweep`` request (what is left empty is left out, as on the command line)."""
        sets = [ln.strip() for ln in self.sets.toPlainText().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        runs_dir = self.runs_dir.text().strip()
        default = str(default_runs_dir(self.store.path))
        return SweepRequest(
            config=self.config.currentText().strip(), grid=self.grid_items(), sets=sets,
            equal_flops=self.budget.text().strip() if self.equal.isChecked() else None,
            name=self.name.text().strip() or None,
            then=[self.then.item(i).text() for i in range(self.then.count())],
            parallel=self.parallel.value() or None,
            runs_dir=None if not runs_dir or Path(runs_dir).expanduser().resolve() == Path(default) else runs_dir)

    def command_args(self) -> list[str]:
        return command_args(self.request(), self.store.path)

    # -- planning and queueing -------------------------------------------------------------------
    def replan(self) -> dict | None:
        """Plan the request now (as the command would, writing nothing): the preview, or None and the
        command's error message."""
        self.replan_timer.stop()
        req = self.request()
        self.command.setPlainText(command_text(req, self.store.path))
        self._show_budget(req)
        try:
            self.preview, self.error = plan_preview(self.store.db, req), ""
        except InputError as e:
            self.preview, self.error = None, str(e)
        self._show_plan()
        return self.preview

    def _show_budget(self, req: SweepRequest) -> None:
        try:
            self.budget_units.setText(f"= {fmt.flops(budget_value(req.equal_flops))} per run" if req.equal_flops else "")
        except InputError:
            self.budget_units.setText("")

    def _show_plan(self) -> None:
        self.points.clear()
        self.queue_button.setEnabled(self.preview is not None)
        if self.preview is None:
            self.summary.setText(f"<span style='color:{ERROR_COLOR}'>{_html(self.error)}</span>")
            return
        p = self.preview
        n, chained = len(p["points"]), p["entries"] - len(p["points"])
        self.name.setPlaceholderText(p["name"])
        self.summary.setText(
            f"<b>{_html(p['name'])}</b>: {n} run{'s' if n != 1 else ''}"
            + (f" and {chained} chained ({', '.join(p['then'])} after each)" if chained else "")
            + (f", each {fmt.flops(p['budget'])} of training" if p["budget"] else "")
            + f" · {p['entries']} queue entries")
        for pt in p["points"]:
            item = QTreeWidgetItem([pt["label"], pt["length"], fmt.flops(pt["flops"]) if pt["flops"] else "–"])
            item.setToolTip(0, pt["label"])
            self.points.addTopLevelItem(item)

    def queue(self) -> tuple[str, list[int]] | None:
        """Queue the sweep (the dialog closes), or show why the command would refuse it (it stays open)."""
        if self.replan() is None:
            return None
        try:
            self.queued = self.commands.queue_sweep(self.request())
        except InputError as e:
            self.error = str(e)
            self.preview = None
            self._show_plan()
            return None
        self.queued_name = self.preview["name"]
        self.accept()
        return self.queued


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _hbox(*widgets: QWidget | None) -> QHBoxLayout:
    """Widgets in a row; None is a stretch."""
    lay = QHBoxLayout()
    lay.setContentsMargins(0, 0, 0, 0)
    for w in widgets:
        lay.addStretch(1) if w is None else lay.addWidget(w)
    return lay


def _row(*widgets: QWidget) -> QWidget:
    """Widgets in a row, the first one taking the room that is left."""
    lay = _hbox(*widgets)
    lay.setStretch(0, 1)
    return _wrap(lay)


def _wrap(layout) -> QWidget:
    w = QWidget()
    w.setLayout(layout)
    return w
