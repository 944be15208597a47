"""One editor widget per config field, chosen from the field's type and UI hints in ``field_docs()``.

Every editor exposes ``value()``/``set_value()``, a ``changed`` signal, ``set_error()`` (the engine's
refusal: Start waits) and ``set_warning()`` (pre-flight: shown, Start does not wait). Values the user typed
that do not parse are passed on as text, so the engine's own validation names the problem.
"""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSizePolicy, QSpinBox, QVBoxLayout,
    QWidget,
)

from engine.core.config import range_text  # the same wording as the engine's messages
from studio.models.config_form import PARENT_STATUSES, parent_label

INT_LIMIT = 2**31 - 1
ERROR_STYLE = "border: 1px solid #d9534f; background: #fff3f3;"
WARNING_STYLE = "border: 1px solid #e0a800;"
NOTE_COLORS = {"error": "#c9302c", "warning": "#a66d00"}  # the text under a field
BUILTIN_CORPUS = "builtin:hpo"
PARENT_MIN_CHARS = 24


def tooltip(key: str, info: dict) -> str:
    lines = [f"<b>{key}</b> ({info['type']})", info.get("doc", "")]
    if "choices" in info:
        lines.append("choices: " + ", ".join(map(str, info["choices"])))
    if info.get("min") is not None or info.get("max") is not None:
        lines.append("must be " + range_text(info))
    lines.append(f"default: {info['default']!r}")
    return "<br>".join(lines)


class FieldEditor(QObject):
    changed = Signal()

    def __init__(self, key: str, info: dict, parent: QWidget | None = None):
        super().__init__(parent)
        self.key, self.info = key, info
        self.container = QWidget(parent)
        lay = QVBoxLayout(self.container)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(1)
        self.row = QHBoxLayout()
        lay.addLayout(self.row)
        self.error_label = QLabel(self.container)
        self.error_label.setObjectName(f"error:{key}")
        self.error_label.setWordWrap(True)
        self.error_label.hide()
        lay.addWidget(self.error_label)
        self.widget = self._build()
        self.widget.setObjectName(f"field:{key}")
        self.widget.setToolTip(tooltip(key, info))
        self.row.insertWidget(0, self.widget, 1)
        self.error: str | None = None
        self.warning: str | None = None

    def _build(self) -> QWidget:  # pragma: no cover - abstract
        raise NotImplementedError

    def value(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_value(self, value: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_error(self, message: str | None) -> None:
        self.error = message
        self._show_note()

    def set_warning(self, message: str | None) -> None:
        self.warning = message
        self._show_note()

    def _show_note(self) -> None:
        """The error if there is one, else the warning, under the field (one label, so the form's rows keep
        their height)."""
        kind = "error" if self.error else "warning" if self.warning else None
        self.widget.setStyleSheet({"error": ERROR_STYLE, "warning": WARNING_STYLE}.get(kind, ""))
        self.error_label.setStyleSheet(f"color: {NOTE_COLORS.get(kind, '#c9302c')}; font-size: 11px;")
        self.error_label.setText(self.error or self.warning or "")
        self.error_label.setVisible(kind is not None)

    def set_applicable(self, on: bool) -> None:
        """Greyed out where the rest of the configuration makes the field meaningless (a field with an error
        stays editable: the user must be able to fix it)."""
        on = on or bool(self.error)
        self.widget.setEnabled(on)
        for b in self.container.findChildren(QPushButton):
            b.setEnabled(on)


class PropertyEditor(FieldEditor):
    """An editor whose widget holds the value in one Qt property (a spin box's value, a check box's state)."""

    prop: str  # the property's name
    cast: type  # what a set value is converted to first

    def value(self) -> Any:
        return self.widget.property(self.prop)

    def set_value(self, value: Any) -> None:
        self.widget.setProperty(self.prop, self.cast(value))


class IntEditor(PropertyEditor):
    prop, cast = "value", int

    def _build(self) -> QWidget:
        w = QSpinBox()
        lo, hi = self.info.get("min"), self.info.get("max")
        w.setRange(int(lo) if lo is not None else -INT_LIMIT, int(min(hi, INT_LIMIT)) if hi is not None else INT_LIMIT)
        w.setGroupSeparatorShown(True)
        w.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # no accidental wheel edits while scrolling the form
        w.valueChanged.connect(self.changed)
        return w


class FloatEditor(FieldEditor):
    """Free text, so 3e-4 and 0.0003 both work and an out-of-range value gets the engine's message."""

    def _build(self) -> QWidget:
        w = QLineEdit()
        if self.info.get("min") is not None or self.info.get("max") is not None:
            w.setPlaceholderText(range_text(self.info))
        w.textChanged.connect(self.changed)
        return w

    def value(self) -> Any:
        text = self.widget.text().strip()
        try:
            return float(text)
        except ValueError:
            return text

    def set_value(self, value: Any) -> None:
        self.widget.setText(repr(float(value)) if isinstance(value, (int, float)) else str(value))


class BoolEditor(PropertyEditor):
    prop, cast = "checked", bool

    def _build(self) -> QWidget:
        w = QCheckBox()
        w.toggled.connect(self.changed)
        return w


class ChoiceEditor(FieldEditor):
    def __init__(self, key: str, info: dict, parent: QWidget | None = None, labels: dict | None = None):
        self.labels = labels or {}
        super().__init__(key, info, parent)

    def _build(self) -> QWidget:
        w = QComboBox()
        for choice in self.info["choices"]:
            w.addItem(self.labels.get(choice, str(choice)), choice)
        w.currentIndexChanged.connect(self.changed)
        return w

    def value(self) -> Any:
        return self.widget.currentData()

    def set_value(self, value: Any) -> None:
        i = self.widget.findData(value)
        if i < 0:  # an unknown value from a file: keep it visible so validation can name it
            self.widget.addItem(str(value), value)
            i = self.widget.count() - 1
        self.widget.setCurrentIndex(i)


class TextEditor(FieldEditor):
    def _build(self) -> QWidget:
        w = QLineEdit()
        w.textChanged.connect(self.changed)
        if self.info.get("kind") == "path":
            btn = QPushButton("…")
            btn.setFixedWidth(28)
            btn.setToolTip("Choose a file")
            btn.clicked.connect(self._browse)
            self.row.addWidget(btn)
        return w

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.container, f"Choose {self.key}")
        if path:
            self.widget.setText(path)

    def value(self) -> str:
        return self.widget.text()

    def set_value(self, value: Any) -> None:
        self.widget.setText("" if value is None else str(value))


class ListEditor(TextEditor):
    """A list of names as comma-separated text (``train.report_to``: "tensorboard")."""

    def value(self) -> list[str]:
        return [x.strip() for x in self.widget.text().replace(";", ",").split(",") if x.strip()]

    def set_value(self, value: Any) -> None:
        items = [value] if isinstance(value, str) else list(value or [])
        self.widget.setText(", ".join(str(x) for x in items))


class CorpusEditor(FieldEditor):
    """Files, folders and the embedded corpus, as a '; '-separated list with pickers."""

    SEP = "; "

    def _build(self) -> QWidget:
        w = QLineEdit()
        w.setPlaceholderText("builtin:hpo; /path/to/abstracts.jsonl; /path/to/folder")
        w.textChanged.connect(self.changed)
        for text, tip, slot in (
            ("Files…", "Add .txt/.jsonl/.json/.csv/.parquet files", self._add_files),
            ("Folder…", "Add a folder of text files", self._add_folder),
            ("Built-in", "Use the embedded HPO definitions corpus (works offline)", self._use_builtin),
        ):
            btn = QPushButton(text)
            btn.setObjectName(f"corpus:{text.strip('…').lower()}")
            btn.setToolTip(tip)
            btn.clicked.connect(slot)
            self.row.addWidget(btn)
        return w

    def _extend(self, items: list[str]) -> None:
        current = [c for c in self.value() if c]
        self.set_value(current + [i for i in items if i not in current])

    def _add_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self.container, "Add corpus files", "", "Text data (*.txt *.jsonl *.json *.csv *.parquet);;All files (*)")
        self._extend(paths)

    def _add_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self.container, "Add a corpus folder")
        if path:
            self._extend([path])

    def _use_builtin(self) -> None:
        self.set_value([BUILTIN_CORPUS])

    def value(self) -> list[str]:
        return [p.strip() for p in self.widget.text().split(";") if p.strip()]

    def set_value(self, value: Any) -> None:
        items = [value] if isinstance(value, str) else list(value or [])
        self.widget.setText(self.SEP.join(map(str, items)))


def make_editor(key: str, info: dict, parent: QWidget | None = None, labels: dict | None = None) -> FieldEditor:
    if "choices" in info:
        return ChoiceEditor(key, info, parent, labels)
    if info.get("kind") == "corpus":
        return CorpusEditor(key, info, parent)
    return {"int": IntEditor, "float": FloatEditor, "bool": BoolEditor, "list": ListEditor}.get(
        info["type"], TextEditor)(key, info, parent)


class ParentEditor(FieldEditor):
    """Editable combo of past runs a stage can start from; free text takes an id or prefix."""

    def _build(self) -> QWidget:
        w = QComboBox()
        w.setEditable(True)
        w.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        # a run's label is long ("id — name (stage, …)"): the combo must not ask for the longest one's width
        w.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        w.setMinimumContentsLength(PARENT_MIN_CHARS)
        w.view().setTextElideMode(Qt.TextElideMode.ElideMiddle)
        w.lineEdit().setPlaceholderText("none")
        w.currentTextChanged.connect(self.changed)
        return w

    def refresh(self, runs: list[dict], stages: tuple[str, ...]) -> None:
        """Offer the finished runs of these stages (``runs``: rows, newest first)."""
        current = self.value()
        self.widget.blockSignals(True)
        self.widget.clear()
        self.widget.addItem("", "")
        offered = [r for r in runs if r["stage"] in stages and r["status"] in PARENT_STATUSES]
        offered.sort(key=lambda r: stages.index(r["stage"]))  # stable: newest first within a stage
        for run in offered:
            label = parent_label(run)
            self.widget.addItem(label, run["id"])
            self.widget.setItemData(self.widget.count() - 1, label, Qt.ItemDataRole.ToolTipRole)
        self.widget.blockSignals(False)
        self.set_value(current)

    def run_ids(self) -> list[str]:
        """The runs offered (tests, scripts)."""
        return [self.widget.itemData(i) for i in range(1, self.widget.count()) if self.widget.itemData(i)]

    def value(self) -> str:
        text = self.widget.currentText().strip()
        i = self.widget.findText(text)
        if i >= 0 and self.widget.itemData(i) is not None:
            return self.widget.itemData(i)
        return text

    def set_value(self, value: Any) -> None:
        value = value or ""
        i = self.widget.findData(value)
        if i >= 0:
            self.widget.setCurrentIndex(i)
        else:
            self.widget.setEditText(str(value))
