"""Pre-launch estimate: parameters, FLOPs dense vs sparse, memory and a measured ETA.

The numbers come from ``studio.commands.estimate_runner.EstimateRunner`` (the engine's ``estimate``
command in the background); this panel shows them and re-estimates a moment after each change.
"""
from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import QTimer
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QCheckBox, QFormLayout, QGroupBox, QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)

from studio.commands.estimate_runner import EstimateRunner
from studio.models import formatting as fmt
from studio.widgets.flow_layout import FlowLayout


class EstimatePanel(QGroupBox):
    """Shows the last estimate; re-estimates (debounced) when the form changes, if enabled."""

    def __init__(self, args_for: Callable[[int], list[str] | None], parent: QWidget | None = None):
        super().__init__("Estimate", parent)
        self.args_for = args_for
        self.runner = EstimateRunner(self)
        self.runner.done.connect(self.show_result)
        self.runner.failed.connect(self.show_error)
        self.result: dict | None = None
        self.error: tuple | None = None
        self.debounce = QTimer(self, singleShot=True, interval=1200)
        self.debounce.timeout.connect(self.estimate)

        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.labels: dict[str, QLabel] = {}
        for key, title in (("params", "Parameters"), ("flops", "Training FLOPs"), ("saving", "Sparse saving"),
                           ("tokens", "Tokens"), ("memory", "Memory"), ("eta", "ETA")):
            lab = QLabel("–", objectName=f"estimate:{key}")
            lab.setTextInteractionFlags(lab.textInteractionFlags() | lab.textInteractionFlags().TextSelectableByMouse)
            lab.setWordWrap(True)  # the side panel is narrow on a laptop: long values wrap, never clip
            self.labels[key] = lab
            form.addRow(title, lab)
        lay.addLayout(form)
        self.status = QLabel("", objectName="estimate:status")
        self.status.setWordWrap(True)
        self.status.setForegroundRole(QPalette.ColorRole.PlaceholderText)  # follows a dark palette
        lay.addWidget(self.status)
        row = FlowLayout()  # wraps in a narrow side panel
        self.button = QPushButton("Estimate", objectName="estimate")
        self.button.clicked.connect(self.estimate)
        self.probe = QSpinBox(objectName="probe_steps")
        self.probe.setRange(0, 100)
        self.probe.setValue(3)
        self.probe.setToolTip("Training steps timed to measure the ETA (0: analytic estimate only)")
        self.auto = QCheckBox("auto", objectName="estimate:auto")
        self.auto.setToolTip("Re-estimate a moment after each change")
        self.auto.setChecked(True)
        self.auto.toggled.connect(lambda on: on or self.debounce.stop())  # off: no estimate is still pending
        row.addWidget(self.button)
        row.addWidget(QLabel("probe steps"))
        row.addWidget(self.probe)
        row.addWidget(self.auto)
        lay.addLayout(row)

    def config_changed(self, valid: bool) -> None:
        self.button.setEnabled(valid)
        self._mark_stale(self.result is not None)  # numbers of an earlier configuration (another parent, say)
        if valid and self.auto.isChecked():
            self.debounce.start()
        elif not valid:
            self.debounce.stop()
            self.runner.cancel()
            self.status.setText("Fix the marked fields to estimate.")
        elif not self.runner.is_running():
            # the numbers shown belong to an earlier configuration: say so instead of a stale error
            self.status.setText("The form changed since this estimate: press Estimate to update it."
                                if self.result is not None else "")

    def estimate(self) -> None:
        args = self.args_for(self.probe.value())
        if args is None:
            return
        self.status.setText("Estimating… (timing a few steps)" if self.probe.value() else "Estimating…")
        self.runner.run(args)

    def _mark_stale(self, stale: bool) -> None:
        """Greyed while they describe an earlier configuration, until the new estimate arrives."""
        for lab in self.labels.values():
            lab.setEnabled(not stale)
            lab.setToolTip("from an earlier configuration" if stale else "")

    def show_result(self, r: dict) -> None:
        self.result, self.error = r, None
        self._mark_stale(False)
        p, f = r.get("params") or {}, r.get("flops") or {}
        total, nonzero = p.get("total"), p.get("nonzero")
        share = f" ({100 * nonzero / total:.0f} % nonzero)" if total and nonzero is not None else ""
        self.labels["params"].setText(f"{fmt.si(total)} total, {fmt.si(nonzero)} nonzero{share}")
        self.labels["flops"].setText(f"{fmt.flops(f.get('sparse'))} sparse vs {fmt.flops(f.get('dense'))} dense")
        saving = f.get("saving")
        self.labels["saving"].setText(_saving_text(saving, f.get("dense"), f.get("sparse")))
        self.labels["tokens"].setText(fmt.si(r.get("tokens")))
        procs = int(r.get("processes") or 1)
        if procs > 1 and r.get("memory_per_process_bytes"):
            self.labels["memory"].setText(f"{fmt.nbytes(r['memory_per_process_bytes'])} per process × {procs} "
                                          f"({r.get('strategy')})")
        else:
            self.labels["memory"].setText(fmt.nbytes(r.get("memory_bytes")))
        step = r.get("step_seconds")
        eta = r.get("eta_seconds")
        self.labels["eta"].setText(fmt.duration(eta) + (f"  ({step * 1000:.0f} ms/step measured)" if step else "")
                                   if eta is not None else "– (set probe steps > 0 to measure)")
        self.status.setText("")

    def show_error(self, message: str, key: Any = None, path: Any = None) -> None:
        self.result, self.error = None, (message, key, path)
        self.status.setText(f"<span style='color:#c9302c'>{message}</span>")


def _saving_text(saving: float | None, dense: float | None, sparse: float | None) -> str:
    if dense and sparse:
        return f"{dense / sparse:.2f}× fewer FLOPs ({fmt.flops(dense - sparse)} saved)"
    if saving is not None:
        return f"{saving:.2f}"
    return "–"
