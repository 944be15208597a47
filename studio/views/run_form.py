"""The new-run form, generated from the engine's config dataclasses.

Field docs become tooltips, ``choices`` combo boxes, min/max spin ranges. Every edit is validated by
the engine's own code (``engine.core.config``), and the message lands next to the field it names; Start
stays disabled until the whole configuration is valid. The run is described as a base TOML file plus
``--set`` overrides, which is also the command line shown in the preview.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QMessageBox, QPlainTextEdit, QPushButton,
    QScrollArea, QSplitter, QVBoxLayout, QWidget,
)

from engine.core import config as cfgmod
from engine.core.config import SECTIONS, RunConfig, field_docs, from_dict
from engine.core.errors import InputError
from engine.core.paths import list_presets, resolve_preset
from engine.core.registry import PRETRAIN, task_fields
from studio.commands.engine_process import command_preview, train_args
from studio.models.config_form import flatten, nested, validate
from studio.models.labels import SECTION_TITLES, STAGE_LABELS, hidden_sections, parent_stages
from studio.models.run_store import RunStore
from studio.widgets.field_editors import FieldEditor, ParentEditor, make_editor

DEFAULT_PRESET = "demo"


class RunForm(QWidget):
    """Preset, stage, parent and every config field; emits ``changed`` after each edit."""

    changed = Signal()
    start_requested = Signal()
    queue_requested = Signal()

    def __init__(self, store: RunStore, runs_dir: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.store, self.runs_dir = store, Path(runs_dir)
        self.docs = field_docs()
        self.editors: dict[str, FieldEditor] = {}
        self.groups: dict[str, QGroupBox] = {}
        self.base_path: Path | None = None
        self.base_flat: dict[str, Any] = {}
        self.config: RunConfig | None = None
        self.errors: dict[str, str] = {}
        self.engine_errors: dict[str, str] = {}  # from a failed launch; cleared when the field is edited
        self._loading = False
        self._build()
        self.load_preset(DEFAULT_PRESET if DEFAULT_PRESET in list_presets() else (list_presets() or [None])[0])

    # -- layout ----------------------------------------------------------------------------------------
    def _build(self) -> None:
        top = QHBoxLayout()
        self.preset_combo = QComboBox(objectName="preset")
        self.preset_combo.addItems(list_presets())
        self.preset_combo.setToolTip("Bundled starting points (resources/presets); the form shows their values")
        self.preset_combo.activated.connect(lambda _i: self.load_preset(self.preset_combo.currentText()))
        top.addWidget(QLabel("Preset"))
        top.addWidget(self.preset_combo)
        for text, slot, tip in (
            ("Import TOML…", self.import_toml, "Load a configuration file"),
            ("Export TOML…", self.export_toml, "Save the current configuration as a TOML file"),
            ("Clone run…", self.choose_clone, "Start from the configuration of a past run"),
            ("Reset", self.reset, "Back to the values of the preset or file"),
        ):
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            top.addWidget(b)
        top.addStretch(1)
        self.base_label = QLabel(objectName="base")
        self.base_label.setStyleSheet("color: #666;")
        top.addWidget(self.base_label)

        # stage, name and parent come first: they decide which sections matter
        head = QFormLayout()
        for key in ("name", "stage", "parent"):
            info = self.docs[key]
            ed = make_editor(key, info, self, labels=STAGE_LABELS) if key != "parent" else None
            if key == "parent":
                ed = ParentEditor(key, info, self)
            self._add_editor(ed)
            head.addRow(key.capitalize(), ed.container)
        self.editors["stage"].changed.connect(self._stage_changed)
        head_box = QGroupBox("Run")
        head_box.setLayout(head)

        fields = QWidget()
        col = QVBoxLayout(fields)
        col.addWidget(head_box)
        # the sections pre-training does not read first (task, prompt): a fine-tune or prompt run is
        # mostly about them, and pre-training hides them
        first = hidden_sections(PRETRAIN)
        for sec in sorted(SECTIONS, key=lambda k: k not in first):
            box = QGroupBox(SECTION_TITLES.get(sec, sec))
            form = QFormLayout(box)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            for key, info in self.docs.items():
                if key.startswith(sec + "."):
                    ed = make_editor(key, info, box)
                    self._add_editor(ed)
                    label = QLabel(key.split(".", 1)[1])
                    label.setToolTip(ed.widget.toolTip())
                    form.addRow(label, ed.container)
            self.groups[sec] = box
            col.addWidget(box)
        self.editors["task.name"].changed.connect(self._task_changed)
        col.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(fields)

        # right: estimate slot, command preview, Start
        self.side = QVBoxLayout()
        self.summary = QLabel(objectName="summary")
        self.summary.setWordWrap(True)
        self.preview = QPlainTextEdit(objectName="preview")
        self.preview.setReadOnly(True)
        self.preview.setMaximumHeight(110)
        self.preview.setToolTip("The same run from a terminal")
        self.start_button = QPushButton("Start run", objectName="start")
        self.start_button.setMinimumHeight(36)
        self.start_button.setStyleSheet("QPushButton:enabled { font-weight: bold; }")
        self.start_button.clicked.connect(self.start_requested)
        self.queue_button = QPushButton("Add to queue", objectName="queue")
        self.queue_button.setToolTip("Start it after the queued runs before it (the Queue tab); the queue outlives the studio")
        self.queue_button.clicked.connect(self.queue_requested)
        self.side.addWidget(QLabel("<b>Command</b>"))
        self.side.addWidget(self.preview)
        self.side.addWidget(self.summary)
        self.side.addStretch(1)
        self.side.addWidget(self.queue_button)
        self.side.addWidget(self.start_button)
        side_w = QWidget()
        side_w.setLayout(self.side)
        side_w.setMinimumWidth(340)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(scroll)
        split.addWidget(side_w)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(split, 1)

    def _add_editor(self, ed: FieldEditor) -> None:
        self.editors[ed.key] = ed
        ed.changed.connect(lambda key=ed.key: self._edited(key))

    def add_side_widget(self, w: QWidget) -> None:
        """The estimate panel sits above the command preview."""
        self.side.insertWidget(0, w)

    # -- loading ---------------------------------------------------------------------------------------
    def load_preset(self, name: str | None) -> None:
        if not name:
            self.load_dict({}, None)
            return
        path = resolve_preset(name)
        self.preset_combo.setCurrentText(name)
        self.load_file(path)

    def load_file(self, path: str | Path) -> bool:
        try:
            d = cfgmod.load_toml(path)
        except InputError as e:
            QMessageBox.warning(self, "Cannot read configuration", str(e))
            return False
        self.load_dict(d, Path(path))
        return True

    def load_dict(self, d: dict, base_path: Path | None) -> None:
        """Show a (possibly partial) configuration: missing keys take their defaults."""
        flat = {k: info["default"] for k, info in self.docs.items()}
        flat.update(flatten(d))
        self.base_path = base_path
        self.base_flat = dict(flat)
        self._loading = True
        try:
            for key, ed in self.editors.items():
                ed.set_value(flat.get(key))
        finally:
            self._loading = False
        self.engine_errors.clear()
        self.base_label.setText(f"from {base_path.name}" if base_path else "from defaults")
        self._stage_changed()
        self._task_changed()
        self.revalidate()

    def reset(self) -> None:
        self.load_dict(nested(self.base_flat), self.base_path)

    def import_toml(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import configuration", "", "TOML (*.toml);;All files (*)")
        if path:
            self.load_file(path)

    def export_toml(self, path: str | None = None) -> str | None:
        if self.config is None:
            QMessageBox.warning(self, "Cannot export", "Fix the marked fields first.")
            return None
        if not path:
            path, _ = QFileDialog.getSaveFileName(self, "Export configuration", f"{self.config.name or 'run'}.toml",
                                                  "TOML (*.toml)")
        if path:
            Path(path).write_text(self.config.to_toml(), encoding="utf-8")
        return path or None

    def choose_clone(self) -> None:
        from studio.views.runs_browser import (
            pick_run,  # a small dialog; imported late to keep this module light
        )

        run_id = pick_run(self, self.store, "Clone the configuration of…")
        if run_id:
            self.clone_run(run_id)

    def clone_run(self, run_id: str) -> bool:
        """Load a past run's stored configuration; it is saved as a file so the command stays reproducible."""
        run = self.store.run(run_id)
        if not run:
            return False
        d = dict(run["config"])
        d["name"] = f"{run['name'] or run['id']}-clone"
        folder = self.clone_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"clone-{run['id']}-{time.strftime('%Y%m%d-%H%M%S')}.toml"
        try:
            path.write_text(from_dict(d).to_toml(), encoding="utf-8")
        except InputError:  # an old config the current engine rejects: load it anyway, fields get marked
            path = None
        self.load_dict(d, path)
        return True

    def clone_dir(self) -> Path:
        return Path(self.store.path).parent / "studio" / "configs"

    # -- stage and parent --------------------------------------------------------------------------------
    def _stage_changed(self) -> None:
        stage = self.editors["stage"].value()
        hidden = hidden_sections(stage)  # sections a stage does not read: the form only asks what matters
        for sec, box in self.groups.items():
            box.setVisible(sec not in hidden)
        self.refresh_parents()

    def refresh_parents(self) -> None:
        """Re-list the runs the current stage can start from (after a run finished, say)."""
        stage = self.editors["stage"].value()
        parent = self.editors["parent"]
        stages = parent_stages(stage)
        parent.refresh(self.store.runs(include_archived=False), stages)
        parent.widget.setEnabled(bool(stages))

    def _task_changed(self) -> None:
        task = self.editors["task.name"].value()
        for key, tasks in task_fields().items():  # task fields another task does not read are greyed out
            if key in self.editors:
                self.editors[key].widget.setEnabled(task in tasks)
                for b in self.editors[key].container.findChildren(QPushButton):
                    b.setEnabled(task in tasks)

    # -- validation --------------------------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        return {key: ed.value() for key, ed in self.editors.items()}

    def _edited(self, key: str) -> None:
        if self._loading:
            return
        self.engine_errors.pop(key, None)
        self.revalidate()

    def revalidate(self) -> None:
        self.config, self.errors = validate(self.values())
        shown = {**self.errors, **self.engine_errors}
        for key, ed in self.editors.items():
            ed.set_error(shown.get(key))
        loose = [msg for key, msg in shown.items() if key not in self.editors]
        if shown:
            self.summary.setText("<span style='color:#c9302c'>" + "<br>".join(
                f"• {m}" for m in [*loose, *[shown[k] for k in shown if k in self.editors]]) + "</span>")
        else:
            self.summary.setText("<span style='color:#2e7d32'>Configuration is valid.</span>")
        self.start_button.setEnabled(self.is_valid())
        self.queue_button.setEnabled(self.is_valid())
        self.preview.setPlainText(self.command_preview())
        self.changed.emit()

    def is_valid(self) -> bool:
        return self.config is not None and not self.errors and not self.engine_errors

    def show_engine_error(self, message: str, key: str | None = None, path: str | None = None) -> None:
        """An error the engine reported at launch: put it on the field (or the file's field) it names."""
        target = key if key in self.editors else None
        if target is None and path:
            for k, ed in self.editors.items():
                v = ed.value()
                if (isinstance(v, list) and any(path in str(i) or str(i) in path for i in v if i)) or (
                        isinstance(v, str) and v and (path in v or v in path) and k not in ("name", "stage")):
                    target = k
                    break
        self.engine_errors[target or (key or path or "engine")] = message
        self.revalidate()

    # -- what to run -----------------------------------------------------------------------------------
    def overrides(self) -> dict[str, Any]:
        """Fields that differ from the base file, as ``--set`` items (files keep the command short)."""
        out = {}
        for key, value in self.values().items():
            if key not in self.base_flat or self.base_flat[key] != value:
                out[key] = value
        return out

    def run_args(self, db: str | Path | None = None, runs_dir: str | Path | None = None) -> list[str]:
        return train_args(self.base_path, self.overrides(), db=db, runs_dir=runs_dir)

    def queue_entry(self, runs_dir: str | Path) -> dict:
        """This form's run as a queue entry: the base file's text (a snapshot) and the edited keys as --set items."""
        args = train_args(self.base_path, self.overrides())
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        text = Path(self.base_path).read_text(encoding="utf-8") if self.base_path else ""
        name = self.config.name or (Path(self.base_path).stem if self.base_path else "run")
        return {"config_text": text, "config_name": name, "sets": sets, "runs_dir": str(runs_dir), "cwd": str(Path.cwd())}

    def estimate_args(self, probe_steps: int) -> list[str]:
        args = train_args(self.base_path, self.overrides())
        return ["estimate", *args[1:], "--json", "--probe-steps", str(probe_steps)]

    def command_preview(self) -> str:
        return command_preview(self.run_args(self.store.path, self.runs_dir))

    def set_field(self, key: str, value: Any) -> None:
        """Programmatic edit (tests, screenshots), exactly as if typed."""
        self.editors[key].set_value(value)
