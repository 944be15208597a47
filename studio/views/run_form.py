"""The new-run form, generated from the engine's config dataclasses.

Field docs become tooltips, ``choices`` combo boxes, min/max spin ranges. The keys set on most runs come
first (Basic); the rest are folded by section (Advanced). Every edit is validated by the engine's own code
(``engine.core.config``), and the message lands next to the field it names; Start stays disabled until the
whole configuration is valid. Pre-flight warnings (``studio.models.preflight``: missing files, evaluation or
checkpoints beyond the run, a long warm-up) show the same way but never hold Start back. The run is
described as a base TOML file plus ``--set`` overrides, which is also the command line shown in the preview.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QFrame, QGroupBox, QLabel, QMessageBox, QPlainTextEdit, QPushButton,
    QScrollArea, QSplitter, QToolButton, QVBoxLayout, QWidget,
)

from engine.core import config as cfgmod
from engine.core.config import SECTIONS, RunConfig, field_docs, from_dict
from engine.core.errors import InputError
from engine.core.paths import list_presets, resolve_preset
from engine.core.registry import PRETRAIN
from studio.commands.engine_process import command_preview, train_args
from studio.models.config_form import (
    BASIC_KEYS, RUN_KEYS, applies, flatten, nested, parent_shape, shape_text, shown_for_stage, takes_parent_shape,
    validate, with_parent_shape,
)
from studio.models.families import FAMILY_KEY, reads
from studio.models.labels import SECTION_TITLES, STAGE_LABELS, hidden_sections, parent_stages
from studio.models.preflight import preflight
from studio.models.run_store import RunStore
from studio.widgets.elided_label import ElidedLabel
from studio.widgets.field_editors import FieldEditor, ParentEditor, make_editor
from studio.widgets.flow_layout import FlowLayout

DEFAULT_PRESET = "demo"
SIDE_MIN_WIDTH = 300


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
        self.groups: dict[str, QGroupBox] = {}  # the Advanced part's box of each section
        self.forms: dict[str, QFormLayout] = {}  # "basic" and each section's
        self.rows: dict[str, tuple[QFormLayout, QWidget]] = {}  # config key -> its row (not name/stage/parent)
        self.warnings: dict[str, str] = {}  # pre-flight, by key: shown, never blocking
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
        top = FlowLayout()  # wraps on a narrow window rather than widening it
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
        self.base_label = ElidedLabel(objectName="base", mode=Qt.TextElideMode.ElideMiddle)
        self.base_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)  # follows a dark palette
        top.addWidget(self.base_label)
        # why the last Start did not start (the engine refused the run before creating it)
        self.launch_banner = QLabel(objectName="launch_error")
        self.launch_banner.setWordWrap(True)
        self.launch_banner.setMinimumWidth(1)
        self.launch_banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.launch_banner.setStyleSheet("background: #fdecea; color: #611a15; padding: 6px;")
        self.launch_banner.hide()

        fields = QWidget()
        col = QVBoxLayout(fields)
        col.addWidget(self._basic_box())
        self.advanced_toggle = QToolButton(objectName="advanced_toggle")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setStyleSheet("QToolButton { border: none; font-weight: 600; }")
        self.advanced_toggle.toggled.connect(self.show_advanced)
        self.advanced = QWidget(objectName="advanced")
        adv = QVBoxLayout(self.advanced)
        adv.setContentsMargins(0, 0, 0, 0)
        # the sections pre-training does not read first (task, prompt): a fine-tune or prompt run is
        # mostly about them, and pre-training hides them
        first = hidden_sections(PRETRAIN)
        for sec in sorted(SECTIONS, key=lambda k: k not in first):
            box = QGroupBox(SECTION_TITLES.get(sec, sec))
            form = QFormLayout(box)
            form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            # model.family first: it decides which of the model keys below it are shown
            keys = sorted((k for k in self.docs if k.startswith(sec + ".") and k not in BASIC_KEYS),
                          key=lambda k: k != FAMILY_KEY)
            for key in keys:
                self._add_row(form, key, key.split(".", 1)[1], box)
            self.forms[sec] = form
            self.groups[sec] = box
            adv.addWidget(box)
        col.addWidget(self.advanced_toggle)
        col.addWidget(self.advanced)
        col.addStretch(1)
        self.editors["stage"].changed.connect(self._stage_changed)
        self.editors["task.name"].changed.connect(self._update_applicable)
        self.editors["sparsity.method"].changed.connect(self._update_applicable)
        self.editors["parent"].changed.connect(self._parent_changed)
        self.fields_scroll = QScrollArea()
        self.fields_scroll.setWidgetResizable(True)
        self.fields_scroll.setWidget(fields)

        # right: estimate slot, schedule, command preview and messages scroll; Start and Queue stay in view
        side_content = QWidget()
        self.side = QVBoxLayout(side_content)
        self.side.setContentsMargins(0, 0, 4, 0)
        self.summary = QLabel(objectName="summary")
        self.summary.setWordWrap(True)
        self.summary.setMinimumWidth(1)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.preview = QPlainTextEdit(objectName="preview")
        self.preview.setReadOnly(True)
        self.preview.setMaximumHeight(110)
        self.preview.setToolTip("The same run from a terminal")
        self.side.addWidget(QLabel("<b>Command</b>"))
        self.side.addWidget(self.preview)
        self.side.addStretch(1)
        self.side_scroll = QScrollArea(objectName="side_scroll")
        self.side_scroll.setWidgetResizable(True)
        self.side_scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.side_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.side_scroll.setWidget(side_content)
        self.start_button = QPushButton("Start run", objectName="start")
        self.start_button.setMinimumHeight(36)
        self.start_button.setStyleSheet("QPushButton:enabled { font-weight: bold; }")
        self.start_button.setToolTip("Start the run now (Ctrl+Enter)")
        self.start_button.clicked.connect(self.start_requested)
        self.queue_button = QPushButton("Add to queue", objectName="queue")
        self.queue_button.setToolTip("Start it after the queued runs before it (the Queue tab); the queue outlives the studio")
        self.queue_button.clicked.connect(self.queue_requested)
        side_w = QWidget()
        side = QVBoxLayout(side_w)
        side.setContentsMargins(0, 0, 0, 0)
        side.addWidget(self.side_scroll, 1)
        side.addWidget(self.summary)  # errors and warnings, next to the button they concern
        side.addWidget(self.queue_button)
        side.addWidget(self.start_button)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.fields_scroll)
        split.addWidget(side_w)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setSizes([700, 460])  # a share, not pixels: the side panel gets about 40 % of the width
        split.setChildrenCollapsible(False)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.launch_banner)
        lay.addWidget(split, 1)
        self.show_advanced(False)

    def _basic_box(self) -> QGroupBox:
        """Name, stage and parent (they decide which sections matter), the parent's model shape for a run that
        takes it, then the keys set on most runs."""
        box = QGroupBox("Basic", objectName="basic")
        self.basic_form = QFormLayout(box)
        self.basic_form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for key in RUN_KEYS:
            info = self.docs[key]
            ed = ParentEditor(key, info, box) if key == "parent" else make_editor(key, info, box, labels=STAGE_LABELS)
            self._add_editor(ed)
            self.basic_form.addRow(key.capitalize(), ed.container)
        self.shape_label = QLabel(objectName="parent_shape")
        self.shape_label.setWordWrap(True)
        self.shape_label.setMinimumWidth(1)
        self.shape_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.shape_label.setToolTip("A fine-tuning or prompting run trains its parent's model: the shape is read "
                                    "from the parent run's stored configuration (only model.n_ctx may be set)")
        self.basic_form.addRow("Model", self.shape_label)
        for key in BASIC_KEYS:
            self._add_row(self.basic_form, key, key, box)
        self.forms["basic"] = self.basic_form
        return box

    def _add_row(self, form: QFormLayout, key: str, text: str, parent: QWidget) -> None:
        ed = make_editor(key, self.docs[key], parent)
        self._add_editor(ed)
        label = QLabel(text)
        label.setToolTip(ed.widget.toolTip())
        form.addRow(label, ed.container)
        self.rows[key] = (form, ed.container)

    def show_advanced(self, on: bool) -> None:
        """Unfold (or fold) the Advanced part: every key not in Basic, by section."""
        if self.advanced_toggle.isChecked() != on:
            self.advanced_toggle.setChecked(on)  # comes back here through toggled
            return
        self.advanced.setVisible(on)
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self._advanced_title()

    def _advanced_title(self) -> None:
        """The fold's title counts what it holds: settings, and the errors and warnings inside it."""
        shown = [k for k in self.advanced_keys() if self._row_shown(k)]
        notes = []
        errors = sum(1 for k in shown if self.editors[k].error)
        warnings = sum(1 for k in shown if self.editors[k].warning and not self.editors[k].error)
        if errors:
            notes.append(f"{errors} error{'s' * (errors > 1)}")
        if warnings:
            notes.append(f"{warnings} warning{'s' * (warnings > 1)}")
        self.advanced_toggle.setText(f"Advanced ({len(shown)} settings{''.join(', ' + n for n in notes)})")

    def advanced_keys(self) -> list[str]:
        return [k for k in self.rows if k not in BASIC_KEYS]

    def _row_shown(self, key: str) -> bool:
        form, container = self.rows[key]
        return form.isRowVisible(container) and not self.groups[key.split(".", 1)[0]].isHidden()

    def _add_editor(self, ed: FieldEditor) -> None:
        self.editors[ed.key] = ed
        ed.changed.connect(lambda key=ed.key: self._edited(key))

    def add_side_widget(self, w: QWidget) -> None:
        """The estimate panel sits above the command preview."""
        self.side.insertWidget(0, w)
        self._fit_side_width()

    def _fit_side_width(self) -> None:
        """The side panel scrolls up and down only: it is at least as wide as its content needs (more with a
        larger font), never less than SIDE_MIN_WIDTH."""
        bar = self.side_scroll.verticalScrollBar().sizeHint().width()
        need = self.side_scroll.widget().minimumSizeHint().width() + bar
        self.side_scroll.setMinimumWidth(max(SIDE_MIN_WIDTH, need))

    def changeEvent(self, event) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.FontChange:
            self._fit_side_width()

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
        self._update_rows()
        self._model_title()
        self.refresh_parents()
        self._show_parent_shape()
        self._update_applicable()
        self._advanced_title()

    def _update_rows(self) -> None:
        """Show the keys the stage and the model family read (and any key with an error, so it can be
        fixed); a section's box only while it has a row to show."""
        stage, parent = self.editors["stage"].value(), self.parent_run()
        family = self.editors[FAMILY_KEY].value()
        hidden = hidden_sections(stage)  # sections a stage does not read: the form only asks what matters
        for key, (form, container) in self.rows.items():
            shown = (key.split(".", 1)[0] not in hidden and shown_for_stage(key, stage, parent)
                     and reads(family, key))
            form.setRowVisible(container, shown or bool(self.editors[key].error))
        for sec, box in self.groups.items():
            keys = [k for k in self.advanced_keys() if k.startswith(sec + ".")]
            box.setVisible(any(self.rows[k][0].isRowVisible(self.rows[k][1]) for k in keys))

    def parent_run(self) -> dict | None:
        """The chosen parent's row in the run store (None: no parent, or one not in this database)."""
        parent_id = self.editors["parent"].value()
        return self.store.run(parent_id) if parent_id else None

    def planned_config(self) -> RunConfig | None:
        """The valid config as the engine will train it: with the parent's model where the run takes it (a
        fine-tune, or a pre-training that continues an imported model), so FLOP counts use that family."""
        return with_parent_shape(self.config, self.parent_run()) if self.is_valid() else None

    def _model_title(self) -> None:
        model = self.groups.get("model")
        if model is not None:
            model.setTitle("Model (the parent's, but the context length)"
                           if takes_parent_shape(self.editors["stage"].value(), self.parent_run())
                           else SECTION_TITLES.get("model", "model"))

    def _parent_changed(self) -> None:
        # a pre-training that continues an imported parent takes that parent's model keys
        self._model_title()
        self._update_rows()
        self._show_parent_shape()

    def _show_parent_shape(self) -> None:
        """A run that takes its parent's model shows that shape (from the parent's stored config), read-only."""
        parent_id, run = self.editors["parent"].value(), self.parent_run()
        show = takes_parent_shape(self.editors["stage"].value(), run)
        self.basic_form.setRowVisible(self.shape_label, show)
        if not show:
            return
        shape = parent_shape(run)
        self.shape_label.setText(f"from the parent: {shape_text(shape)}" if shape
                                 else "from the parent run (choose one)" if not parent_id
                                 else f"from the parent run {parent_id} (not in this database)")

    def refresh_parents(self) -> None:
        """Re-list the runs the current stage can start from (after a run finished, say)."""
        stage = self.editors["stage"].value()
        parent = self.editors["parent"]
        stages = parent_stages(stage)
        parent.refresh(self.store.runs(include_archived=False), stages)
        parent.set_applicable(bool(stages))

    def _update_applicable(self) -> None:
        """Grey out what the task or the sparsity method does not read (dynamic-sparsity keys for static)."""
        flat = self.values()
        for key, ed in self.editors.items():
            ed.set_applicable(applies(key, flat))

    # -- validation --------------------------------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        return {key: ed.value() for key, ed in self.editors.items()}

    def _edited(self, key: str) -> None:
        if self._loading:
            return
        self.engine_errors.pop(key, None)
        self.clear_launch_error()
        self.revalidate()

    def revalidate(self) -> None:
        self.config, self.errors = validate(self.values())
        shown = {**self.errors, **self.engine_errors}
        self.warnings = preflight(self.config) if self.config is not None else {}
        for key, ed in self.editors.items():
            ed.set_error(shown.get(key))
            ed.set_warning(self.warnings.get(key))
        self._update_rows()
        if any(k in shown and self._row_shown(k) for k in self.advanced_keys()):
            self.show_advanced(True)  # an error must be seen where it is fixed
        self._update_applicable()
        self._advanced_title()
        loose = [msg for key, msg in shown.items() if key not in self.editors]
        if shown:
            text = "<span style='color:#c9302c'>" + "<br>".join(
                f"• {m}" for m in [*loose, *[shown[k] for k in shown if k in self.editors]]) + "</span>"
        else:
            text = "<span style='color:#2e7d32'>Configuration is valid.</span>"
        if self.warnings:
            text += "<br><span style='color:#a66d00'>" + "<br>".join(f"⚠ {m}" if k in m else f"⚠ {k}: {m}"
                                                                    for k, m in self.warnings.items()) + "</span>"
        self.summary.setText(text)
        self.start_button.setEnabled(self.is_valid())
        self.queue_button.setEnabled(self.is_valid())
        self.preview.setPlainText(self.command_preview())
        self.changed.emit()

    def is_valid(self) -> bool:
        """Errors hold Start back; pre-flight warnings do not."""
        return self.config is not None and not self.errors and not self.engine_errors

    def show_launch_error(self, message: str) -> None:
        """The engine refused the last Start before creating the run: say why above the form."""
        self.launch_banner.setText(f"The run did not start: {message}")
        self.launch_banner.show()

    def clear_launch_error(self) -> None:
        self.launch_banner.hide()

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
