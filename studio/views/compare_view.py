"""Compare past runs: overlay their curves on one shared x-axis.

The x-axis switches in one click between step, tokens, FLOPs spent, dense-equivalent FLOPs and
wall time: sparse pre-training is judged at *equal FLOPs spent*, where a 75 % sparse run has taken
many more steps than a dense one for the same compute. Each run keeps one colour in every chart and
in the run list (the legend); unchecking a run hides it. Curves are read through the run store one SQL
query per (run, metric) straight into numpy, so 20 runs × 100k rows load in well under a second. Runs
still training are re-read (at most every few seconds) when the store says they progressed.

One run order holds everywhere: the order the runs were picked in (the browser's selection, then each
run checked in the list). The run list shows the compared runs first in that order, the shared legend
above the charts lists them in it (names elided, ids kept, a click hides or shows a run), and the config
diff's columns and the summary's rows follow it.

``CompareView`` is the charts; ``ComparePanel`` puts it beside the config diff and summary table.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (
    QButtonGroup, QCheckBox, QComboBox, QFileDialog, QGridLayout, QHBoxLayout, QLabel, QLineEdit, QListWidget,
    QListWidgetItem, QMessageBox, QPushButton, QSlider, QSplitter, QTabWidget, QToolButton, QVBoxLayout, QWidget,
)

from engine.core.errors import InputError
from studio.commands.exports import write_metrics
from studio.models.compare_data import EVAL_PREFIX, CompareData, curve_arrays, drawn_as_logged, extent, is_sparse
from studio.models.labels import PALETTE, is_sparse_stage
from studio.models.run_filter import text_matches
from studio.models.run_store import LIVE_STATUSES, RunStore
from studio.models.throttle import Throttle
from studio.widgets.chart_export import ChartExportDialog
from studio.widgets.chart_placeholder import ChartPlaceholder
from studio.widgets.chart_style import (
    ChartTheme, ThemeFollower, compact_ticks, fixed_axis_width, padded_range, set_title, style_plot,
)
from studio.widgets.config_diff import ConfigDiffView
from studio.widgets.run_legend import RunLegend
from studio.widgets.summary_table import SummaryTable

# key -> (button text, axis label, SI unit for pyqtgraph's prefixes)
X_AXES = {
    "step": ("Step", "step", None),
    "tokens": ("Tokens", "tokens", None),
    "flops": ("FLOPs spent", "FLOPs spent", "FLOP"),
    "flops_dense": ("Dense-equiv. FLOPs", "dense-equivalent FLOPs", "FLOP"),
    "wall_time": ("Wall time", "wall time", "s"),
}
# fixed charts: (metric name, title, y label, unit); two more charts let the user pick any metric
FIXED_PANELS = (
    ("loss", "Training loss", "loss", None),
    ("val_loss", "Validation loss", "loss", None),
    ("sparsity", "Sparsity", "fraction of zero weights", None),
    ("tokens_per_s", "Throughput", "tokens/s", None),
)
FREE_PANELS = 2
MARKER_POINTS = 100  # evaluation series up to this long get a marker per point; longer ones are plain lines
# rows read per curve for the overview: two per horizontal pixel of a chart, within these bounds (the database
# seek per row is the cost that matters with 20 runs × 6 charts); zooming re-reads the visible range as finely
POINTS_PER_PIXEL, MIN_POINTS, MAX_POINTS = 2, 600, 4000
REFINE_MS = 250
LIVE_POLL_MS = 3000  # compared runs that are still training are re-read at most this often
NO_RUNS = "check runs in the list to compare them"


def run_label_parts(run: dict) -> tuple[str, str]:
    """(name, the rest): the name, which may be elided, and what must stay (sparsity, a short id)."""
    name = run.get("name") or run["id"]
    level = (run.get("config") or {}).get("sparsity", {}).get("level")
    sparse = f" · {level:.0%} sparse" if is_sparse_stage(run["stage"]) and level is not None else ""
    return name, f"{sparse} [{run['id'][:6]}]"


def run_label(run: dict) -> str:
    """Legend text: name, sparsity when it matters, and a short id (names repeat across runs)."""
    return "".join(run_label_parts(run))


def _swatch(color: str) -> QIcon:
    pm = QPixmap(14, 14)
    pm.fill(QColor(color))
    return QIcon(pm)


class _Panel(QWidget):
    """One chart: a header (fixed title or a metric picker, export button) over a PlotWidget, or a line
    of text in its place while there is nothing to draw."""

    def __init__(self, title: str, y_label: str, unit: str | None, free: bool):
        super().__init__()
        # the metric drawn; not ``metric``: that would hide QWidget.metric(), which Qt calls on font changes
        self.metric_name: str | None = None
        self.title = title
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        head = QHBoxLayout()
        self.picker: QComboBox | None = None
        if free:
            self.picker = QComboBox()
            self.picker.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            self.picker.setMinimumContentsLength(12)
            head.addWidget(self.picker)
        head.addStretch(1)
        self.export_button = QToolButton(text="Export…", toolTip="Save this chart as PNG or SVG")
        head.addWidget(self.export_button)
        lay.addLayout(head)
        self.widget = pg.PlotWidget()
        self.plot: pg.PlotItem = self.widget.getPlotItem()
        set_title(self.plot, title, ChartTheme.of())
        self.plot.setLabel("left", y_label, units=unit)
        # without a unit, pyqtgraph's "(x0.001)" scaling of the axis only confuses (sparsity, lr)
        self.plot.getAxis("left").enableAutoSIPrefix(unit is not None)
        # a fixed width: otherwise new tick labels re-lay out the chart and re-fit every linked view
        fixed_axis_width(self.plot, "left", 64)
        for side in ("left", "bottom"):
            compact_ticks(self.plot.getAxis(side))
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setDownsampling(auto=True, mode="peak")
        self.plot.setClipToView(True)
        self.holder = ChartPlaceholder(self.widget, NO_RUNS)
        self.holder.show_text(NO_RUNS)
        lay.addWidget(self.holder, 1)

    def set_title(self, title: str, y_label: str) -> None:
        self.title = title
        set_title(self.plot, title, ChartTheme.of(self))
        self.plot.setLabel("left", y_label)

    def show_placeholder(self, text: str | None) -> None:
        """``text`` in place of the chart; None: the chart."""
        self.holder.show_text(text)

    def apply_theme(self, theme: ChartTheme) -> None:
        self.widget.setBackground(theme.background)
        style_plot(self.plot, theme)


class CompareView(QWidget):
    """Overlay the curves of several runs.

    Signals: ``runs_changed(list)`` — the checked (compared) run ids, in colour order;
    ``x_axis_changed(str)`` — one of ``X_AXES``.
    """

    runs_changed = Signal(list)
    x_axis_changed = Signal(str)

    def __init__(self, store: RunStore, run_ids: list[str] | tuple[str, ...] = (), parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.x_axis = "flops"
        self.smoothing = 0.6
        self.show_raw = True
        self.runs: dict[str, dict] = {}           # every listed run (for the picker)
        self.selected: list[str] = []             # compared runs, in colour order
        self.colors: dict[str, str] = {}
        self.hidden: set[str] = set()             # compared but not drawn
        self.data = CompareData(store)            # the rows read, per (run, metric)
        self.curves: dict[tuple[str, int], tuple[pg.PlotCurveItem, pg.GraphicsObject]] = {}  # (run, panel) -> (raw, main)
        self._refined: set[tuple[str, int]] = set()  # curves showing a zoomed range re-read finer
        self._refined_for: tuple | None = None  # the view range refine() last read for
        self._unsmoothed: set[tuple[str, int]] = set()  # evaluation curves: drawn as logged, no raw shadow
        self._build()
        self._refine_timer = QTimer(self, singleShot=True, interval=REFINE_MS)
        self._refine_timer.timeout.connect(self.refine)
        self.panels[0].plot.sigXRangeChanged.connect(lambda *_a: self._refine_timer.start())
        self._fitted: list | None = None  # every chart's range as the last fit set it (a user zoom differs)
        self._live: set[str] = set()      # compared runs that were training at the last re-read
        self._live_poll = Throttle(self._poll_if_shown, LIVE_POLL_MS, self)
        store.runs_progressed.connect(self._live_poll.request)
        store.status_changed.connect(self._status_changed)
        self.reload_runs()
        if run_ids:
            self.set_runs(list(run_ids))

    # -- layout ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        bar = QHBoxLayout()
        bar.addWidget(QLabel("x axis:"))
        self.x_buttons = QButtonGroup(self)
        self.x_buttons.setExclusive(True)
        for key, (text, _label, _unit) in X_AXES.items():
            b = QToolButton(text=text, checkable=True, objectName=f"x_{key}")
            b.setToolTip("Compare at equal compute: sparse runs take more steps for the same FLOPs" if key == "flops" else "")
            if key == "flops":
                f = b.font()
                f.setBold(True)
                b.setFont(f)
            b.clicked.connect(lambda _c=False, k=key: self.set_x_axis(k))
            self.x_buttons.addButton(b)
            bar.addWidget(b)
            if key == self.x_axis:
                b.setChecked(True)
        bar.addSpacing(16)
        bar.addWidget(QLabel("smoothing:"))
        self.smooth_slider = QSlider(Qt.Orientation.Horizontal, objectName="smoothing", minimum=0, maximum=99)
        self.smooth_slider.setValue(int(round(self.smoothing * 100)))
        self.smooth_slider.setFixedWidth(120)
        self.smooth_slider.setToolTip("Exponential moving average weight (0 = raw values)")
        self.smooth_label = QLabel(f"{self.smoothing:.2f}")
        self.smooth_slider.valueChanged.connect(lambda v: self.set_smoothing(v / 100))
        bar.addWidget(self.smooth_slider)
        bar.addWidget(self.smooth_label)
        self.raw_box = QCheckBox("raw", objectName="show_raw", checked=True, toolTip="Show the unsmoothed values faintly")
        self.raw_box.toggled.connect(self._set_show_raw)
        bar.addWidget(self.raw_box)
        bar.addStretch(1)
        self.export_metrics_button = QPushButton("Export metrics…", objectName="export_metrics")
        self.export_metrics_button.clicked.connect(self._export_metrics_dialog)
        bar.addWidget(self.export_metrics_button)

        left = QWidget()
        lv = QVBoxLayout(left)
        lv.setContentsMargins(0, 0, 0, 0)
        self.search = QLineEdit(placeholderText="filter runs: name, id, tag, note", objectName="run_filter")
        self.search.textChanged.connect(self._filter_list)
        self.archived_box = QCheckBox("show archived", objectName="show_archived")
        self.archived_box.toggled.connect(lambda _on: self.reload_runs())
        self.run_list = QListWidget(objectName="run_list")
        self.run_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # a long name loses its middle, not its id
        self.run_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.run_list.setToolTip("Check runs to compare; the swatch is the run's colour in every chart. "
                                 "Compared runs come first, in the order they were picked")
        self.run_list.itemChanged.connect(self._item_changed)
        reload = QPushButton("Reload", toolTip="Re-read every compared run (runs still training are re-read "
                             "every few seconds anyway)")
        reload.clicked.connect(self.refresh)
        lv.addWidget(self.search)
        lv.addWidget(self.run_list, 1)
        row = QHBoxLayout()
        row.addWidget(self.archived_box)
        row.addStretch(1)
        row.addWidget(reload)
        lv.addLayout(row)

        charts = QWidget()
        grid = QGridLayout(charts)
        grid.setContentsMargins(0, 0, 0, 0)
        # one legend for every chart, above them: it never covers a curve and lists every run
        self.legend = RunLegend()
        self.legend.toggled.connect(self.set_run_visible)
        grid.addWidget(self.legend, 0, 0, 1, 3)
        self.panels: list[_Panel] = []
        for metric, title, y_label, unit in FIXED_PANELS:
            p = _Panel(title, y_label, unit, free=False)
            p.metric_name = metric
            self.panels.append(p)
        for i in range(FREE_PANELS):
            p = _Panel(f"Metric {i + 1}", "value", None, free=True)
            p.picker.currentIndexChanged.connect(lambda _i, panel=p: self._pick_metric(panel))
            self.panels.append(p)
        for i, p in enumerate(self.panels):
            grid.addWidget(p, 1 + i // 3, i % 3)
            p.export_button.clicked.connect(lambda _c=False, panel=p: self.export_chart_dialog(panel.title))
            if i:
                p.plot.setXLink(self.panels[0].plot)  # one shared x-axis across the charts
        for row in (1, 2):
            grid.setRowStretch(row, 1)
        self._update_x_labels()

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(charts)
        split.setStretchFactor(1, 1)
        split.setSizes([300, 1000])  # room for 'name · 75% sparse [id]' in the run list
        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(split, 1)
        self.follower = ThemeFollower(self, self._apply_theme)

    def _apply_theme(self, theme: ChartTheme) -> None:
        """Chart colours and text sizes from the palette and the font; the curves are drawn again in
        colours readable on the new background."""
        for p in self.panels:
            p.apply_theme(theme)
        if self.selected:  # (from what was read already: a restyle never waits on the database)
            self._update_legend()
            self.run_list.blockSignals(True)
            for i in range(self.run_list.count()):
                item = self.run_list.item(i)
                rid = item.data(Qt.ItemDataRole.UserRole)
                if rid in self.selected:
                    item.setIcon(_swatch(self._color(rid).name()))
            self.run_list.blockSignals(False)
            self._redraw_keeping_zoom()

    def _color(self, run_id: str) -> QColor:
        """The run's colour as drawn on this background (the palette's colour, flipped when too dark)."""
        return self.follower.theme.readable(self.colors[run_id])

    def _update_legend(self) -> None:
        self.legend.set_runs([(rid, *run_label_parts(self.runs[rid]), self._color(rid)) for rid in self.selected],
                             self.hidden)

    # -- runs -------------------------------------------------------------------------------------------
    def reload_runs(self) -> None:
        """Re-read the run list (names, tags, archive flags) keeping the current selection."""
        self.runs = {r["id"]: r for r in self.store.runs(include_archived=True)}
        show_archived = self.archived_box.isChecked()
        self.run_list.blockSignals(True)
        self.run_list.clear()
        order = [*self.selected, *(rid for rid in self.runs if rid not in self.selected)]
        for rid in order:
            r = self.runs[rid]
            if r.get("archived") and not show_archived and rid not in self.selected:
                continue
            item = QListWidgetItem(run_label(r))
            item.setData(Qt.ItemDataRole.UserRole, rid)
            item.setToolTip(f"{rid} · {r['stage']} · {r['status']}" + (f"\ntags: {', '.join(r['tags'])}" if r.get("tags") else ""))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if rid in self.selected else Qt.CheckState.Unchecked)
            if rid in self.selected:
                item.setIcon(_swatch(self._color(rid).name()))
            self.run_list.addItem(item)
        self.run_list.blockSignals(False)
        self._filter_list(self.search.text())

    def _filter_list(self, text: str) -> None:
        for i in range(self.run_list.count()):
            item = self.run_list.item(i)
            item.setHidden(not text_matches(self.runs[item.data(Qt.ItemDataRole.UserRole)], text))

    def _item_changed(self, item: QListWidgetItem) -> None:
        rid = item.data(Qt.ItemDataRole.UserRole)
        on = item.checkState() == Qt.CheckState.Checked
        if on == (rid in self.selected):
            return  # not a check or an uncheck (a new swatch, say): the order stays
        ids = [r for r in self.selected if r != rid] + ([rid] if on else [])
        self.set_runs(ids)

    def _drop_run(self, run_id: str) -> None:
        for key in [k for k in self.curves if k[0] == run_id]:
            self._refined.discard(key)
            for c in self.curves.pop(key):
                self.panels[key[1]].plot.removeItem(c)

    def run_ids(self) -> list[str]:
        return list(self.selected)

    def set_runs(self, run_ids: list[str]) -> None:
        """Compare exactly these runs (ids or unique prefixes); unknown ids are ignored."""
        resolved = []
        for rid in run_ids:
            row = self.runs.get(rid) or self.store.run(rid)
            if row is not None and row["id"] not in resolved:
                self.runs.setdefault(row["id"], row)
                resolved.append(row["id"])
        for rid in [r for r in self.selected if r not in resolved]:
            self._drop_run(rid)
            self.store.unwatch(rid)
        for rid in [r for r in resolved if r not in self.selected]:
            self.store.watch(rid)  # a compared run that trains is then read every tick: its progress is signalled
        self.selected = resolved
        used = {self.colors[r] for r in resolved if r in self.colors}
        free = [c for c in PALETTE if c not in used]
        for i, rid in enumerate(r for r in resolved if r not in self.colors):
            self.colors[rid] = free[i] if i < len(free) else pg.intColor(len(self.colors), hues=17).name()
        self._refresh_picker_choices()
        self.reload_runs()
        self._update_legend()
        self._redraw()
        self.runs_changed.emit(list(self.selected))

    def release(self) -> None:
        """The view is closing: its runs need no more watching."""
        for rid in self.selected:
            self.store.unwatch(rid)

    def set_run_visible(self, run_id: str, visible: bool) -> None:
        """Show or hide one compared run without forgetting it (its colour stays)."""
        (self.hidden.discard if visible else self.hidden.add)(run_id)
        if run_id in self.selected:
            self._update_legend()
        for (rid, index), (raw, main) in self.curves.items():
            if rid == run_id:
                main.setVisible(visible)
                raw.setVisible(visible and self._raw_wanted() and (rid, index) not in self._unsmoothed)
        if self._at_fit():
            self.fit()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.poll_live()  # a run may have grown while another tab was in front

    def _status_changed(self, run_id: str, _status: str) -> None:
        if run_id in self.selected:
            self._live_poll.request()

    def _poll_if_shown(self) -> None:
        if self.isVisible():
            self.poll_live()

    def poll_live(self) -> None:
        """Re-read the curves of compared runs that are training (and of those that just ended), so the
        charts follow them. The axes keep following too, unless the user has zoomed or panned."""
        self._live_poll.last = time.monotonic()
        status = {rid: (self.store.run(rid) or {}).get("status") for rid in self.selected}
        live = {rid for rid, st in status.items() if st in LIVE_STATUSES}
        grown = live | (self._live & set(self.selected))
        self._live = live
        if not grown:
            return
        self.data.forget(grown)
        for rid in grown:
            if rid in self.runs:
                self.runs[rid]["status"] = status[rid]
        self._redraw_keeping_zoom()

    def _ranges(self) -> list:
        return [p.plot.vb.viewRange() for p in self.panels]

    def refresh(self) -> None:
        """Drop cached rows and re-read everything (runs that were still training have grown)."""
        self.data.forget()
        self.reload_runs()
        self._refresh_picker_choices()
        self._redraw()

    # -- data -------------------------------------------------------------------------------------------
    def series(self, run_id: str, metric: str) -> np.ndarray:
        return self.data.series(run_id, metric, self.points_per_curve())

    def points_per_curve(self) -> int:
        """Rows to read per curve: more than the chart has pixels across would not show."""
        # the chart's holder is laid out even while its placeholder text shows (the plot's own size is stale then)
        panel = self.panels[0]
        width = panel.holder.width() - panel.plot.getAxis("left").maximumWidth()
        return int(min(MAX_POINTS, max(MIN_POINTS, POINTS_PER_PIXEL * width)))

    def _refresh_picker_choices(self) -> None:
        choices = self.data.choices(self.selected, {m for m, *_ in FIXED_PANELS}, self.points_per_curve())
        defaults = choices[:] + ["lr", "grad_norm"]
        for i, p in enumerate(self.panels[len(FIXED_PANELS):]):
            current = p.picker.currentData()
            p.picker.blockSignals(True)
            p.picker.clear()
            for c in choices:
                p.picker.addItem(("task score: " + c[len(EVAL_PREFIX):]) if c.startswith(EVAL_PREFIX) else c, c)
            want = current if current in choices else (defaults[i] if i < len(defaults) else None)
            if want in choices:
                p.picker.setCurrentIndex(choices.index(want))
            p.picker.blockSignals(False)
            self._set_free_metric(p, p.picker.currentData())

    def _set_free_metric(self, panel: _Panel, metric: str | None) -> None:
        panel.metric_name = metric
        if metric is None:
            panel.set_title("(no metric)", "value")
        elif metric.startswith(EVAL_PREFIX):
            panel.set_title("Task score: " + metric[len(EVAL_PREFIX):], "score")
        else:
            panel.set_title(metric, metric)

    def _pick_metric(self, panel: _Panel) -> None:
        self._set_free_metric(panel, panel.picker.currentData())
        self._redraw_panels([self.panels.index(panel)])

    # -- drawing ----------------------------------------------------------------------------------------
    def set_x_axis(self, axis: str) -> None:
        if axis not in X_AXES:
            raise ValueError(f"unknown x axis {axis!r}; one of {', '.join(X_AXES)}")
        self.x_axis = axis
        for b in self.x_buttons.buttons():
            b.setChecked(b.objectName() == f"x_{axis}")
        self._update_x_labels()
        self._redraw()
        self.x_axis_changed.emit(axis)

    def set_smoothing(self, weight: float) -> None:
        self.smoothing = min(max(float(weight), 0.0), 0.99)
        self.smooth_label.setText(f"{self.smoothing:.2f}")
        if self.smooth_slider.value() != int(round(self.smoothing * 100)):
            self.smooth_slider.blockSignals(True)
            self.smooth_slider.setValue(int(round(self.smoothing * 100)))
            self.smooth_slider.blockSignals(False)
        self._redraw_keeping_zoom()

    def _set_show_raw(self, on: bool) -> None:
        self.show_raw = on
        self._redraw_keeping_zoom()

    def _at_fit(self) -> bool:
        """Whether the charts still show the ranges the last fit set (the user has not zoomed or panned)."""
        return self._fitted is None or self._fitted == self._ranges()

    def _redraw_keeping_zoom(self) -> None:
        follow = self._at_fit()
        self._redraw(fit=follow)
        if not follow:
            self.refine()  # the user's zoomed range, re-read as finely as before

    def _raw_wanted(self) -> bool:
        return self.show_raw and self.smoothing > 0

    def _update_x_labels(self) -> None:
        _text, label, unit = X_AXES[self.x_axis]
        for p in self.panels:
            p.plot.setLabel("bottom", label, units=unit)

    def _redraw(self, fit: bool = True) -> None:
        self._refined_for = None
        self._redraw_panels(range(len(self.panels)), fit)

    def _redraw_panels(self, indices, fit: bool = True) -> None:
        """Replace the curves of these charts: compute every curve's arrays, fit the ranges, then add the items.

        The ranges are fitted from the arrays before any item exists. pyqtgraph's lazy auto-range fits at
        paint time, and with clip-to-view and downsampling each fit changes what the curves show, which
        asks for another fit and paint: 240 curves arriving at once cost ~3 paints per chart and a
        re-clip of every curve per range change. The user's zoom, pan and "A" button work as usual.
        """
        planned = []
        for index in indices:
            panel = self.panels[index]
            for key in [k for k in self.curves if k[1] == index]:
                self._refined.discard(key)
                for c in self.curves.pop(key):
                    panel.plot.removeItem(c)
            if panel.metric_name is None:
                continue
            for rid in self.selected:
                data = self.series(rid, panel.metric_name)
                if data.size:
                    logged = drawn_as_logged(panel.metric_name, data)
                    markers = is_sparse(panel.metric_name, data) and data.size <= MARKER_POINTS
                    total = self.data.total(rid, panel.metric_name, data.size)
                    planned.append((index, rid, logged, markers, *self._curve_arrays(data, total, logged)))
        shown = [(index, x, ys) for index, rid, logged, _m, x, y, smooth in planned if rid not in self.hidden
                 for ys in ((y, smooth) if self._raw_wanted() and not logged else (smooth,))]
        for index in indices:
            self.panels[index].show_placeholder(self._placeholder(index, {p[0] for p in planned}))
        if fit:
            self._fit(shown, indices, fit_x=len(indices) == len(self.panels))
        theme = self.follower.theme
        for index, rid, logged, markers, x, y, smooth in planned:
            color = self._color(rid)
            name = run_label(self.runs[rid])  # not listed on screen (the shared legend is); an export lists it
            # plain curve items for lines: PlotDataItem's clipping, downsampling and inner scatter item cost
            # ~3 ms per curve to set up, and a thinned curve has at most a few thousand points to draw
            raw = pg.PlotCurveItem(x, y, pen=pg.mkPen(theme.faint(color), width=1))
            if markers:
                main = pg.PlotDataItem(x, smooth, pen=pg.mkPen(color, width=1), name=name, symbol="o", symbolSize=5,
                                       symbolBrush=color, symbolPen=None)
            else:
                main = pg.PlotCurveItem(x, smooth, pen=pg.mkPen(color, width=1), name=name)
            (self._unsmoothed.add if logged else self._unsmoothed.discard)((rid, index))
            raw.setVisible(not logged and self._raw_wanted() and rid not in self.hidden)
            main.setVisible(rid not in self.hidden)
            self.panels[index].plot.addItem(raw)
            self.panels[index].plot.addItem(main)
            self.curves[(rid, index)] = (raw, main)

    def _placeholder(self, index: int, drawn: set[int]) -> str | None:
        """What a chart says instead of empty axes; None when it has curves to draw."""
        metric = self.panels[index].metric_name
        if not self.selected:
            return NO_RUNS
        if index in drawn:
            return None
        if metric is None:
            return "no other metric logged by these runs"
        if any((self.runs.get(rid) or {}).get("status") in LIVE_STATUSES for rid in self.selected):
            return f"waiting for the first {metric} rows…"
        return f"no {metric} logged by {'this run' if len(self.selected) == 1 else 'these runs'}"

    def _fit(self, curves, panels, fit_x: bool = True) -> None:
        """Set the shared x range (``fit_x``) and the y range of ``panels`` to the extent of ``curves``,
        given as (panel index, x, y) arrays."""
        for i in panels:
            self.panels[i].plot.vb.disableAutoRange()
            ys = extent(y for index, _x, y in curves if index == i)
            if ys is not None:  # (a flat series gets room around it, not pyqtgraph's arbitrary ±0.5)
                self.panels[i].plot.vb.setYRange(*padded_range(*ys), padding=0)
        xs = extent(x for _i, x, _y in curves) if fit_x else None
        if xs is not None:
            self.panels[0].plot.vb.setXRange(*xs, padding=0.02)  # the other charts are x-linked to it
        for p in self.panels:  # apply the ranges now, not in the first paint (which would ask for a second)
            p.plot.vb.updateMatrix()
        self._fitted = self._ranges()

    def fit(self) -> None:
        """Fit every chart to its visible curves (after showing or hiding a run)."""
        shown = [(i, c.xData, c.yData) for (_rid, i), pair in self.curves.items() for c in pair
                 if c.isVisible() and c.xData is not None]
        self._fit(shown, range(len(self.panels)))

    def _curve_arrays(self, data: np.ndarray, total: int, sparse: bool = False):
        """(x, raw y, smoothed y) of one curve on the current x axis."""
        return curve_arrays(data, total, self.x_axis, self.smoothing, sparse)

    def _set_curve_data(self, raw: pg.PlotCurveItem, main: pg.GraphicsObject, data: np.ndarray, total: int,
                        sparse: bool = False) -> None:
        x, y, smooth = self._curve_arrays(data, total, sparse)
        raw.setData(x, y)
        main.setData(x, smooth)

    def refine(self) -> None:
        """Re-read the visible range of thinned curves as finely as the overview (after zoom or pan)."""
        (x0, x1), _ = self.panels[0].plot.viewRange()
        if self._refined_for == (x0, x1, self.x_axis, len(self.curves)):
            return  # this range is drawn already (a zoom timer firing after an explicit refine)
        self._refined_for = (x0, x1, self.x_axis, len(self.curves))
        for (rid, index), (raw, main) in self.curves.items():
            metric = self.panels[index].metric_name
            zoomed = self.data.zoomed(rid, metric, self.x_axis, x0, x1, self.points_per_curve())
            if zoomed is None:
                continue  # not thinned: everything is drawn already
            rows, total, detailed = zoomed
            if detailed or (rid, index) in self._refined:  # (the overview is drawn already unless a zoom refined it)
                self._set_curve_data(raw, main, rows, total, drawn_as_logged(metric, rows))
            (self._refined.add if detailed else self._refined.discard)((rid, index))

    # -- exports ----------------------------------------------------------------------------------------
    def plots(self) -> dict[str, pg.PlotItem]:
        """Chart title -> PlotItem, for exporting."""
        return {p.title: p.plot for p in self.panels}

    def export_chart_dialog(self, title: str | None = None) -> None:
        ChartExportDialog(self.plots(), title, self).exec()

    def export_metrics(self, path: str | Path, fmt: str | None = None) -> int:
        return write_metrics(self.store, self.selected, path, fmt)

    def _export_metrics_dialog(self) -> None:
        if not self.selected:
            QMessageBox.information(self, "Export metrics", "Check at least one run to export its metrics.")
            return
        path, chosen = QFileDialog.getSaveFileName(
            self, "Export metrics", "metrics.csv", "CSV (*.csv);;JSON (*.json);;Parquet (*.parquet)")
        if not path:
            return
        fmt = Path(path).suffix.lstrip(".").lower()
        if fmt not in ("csv", "json", "parquet"):
            fmt = chosen.split()[0].lower()
            path += f".{fmt}"
        try:
            n = self.export_metrics(path, fmt)
        except (InputError, OSError) as e:
            QMessageBox.warning(self, "Export metrics", str(e))
            return
        QMessageBox.information(self, "Export metrics", f"Wrote {n:,} rows of {len(self.selected)} run(s) to {path}")


class ComparePanel(QWidget):
    """Charts, config diff and summary of the same runs, in tabs; the charts' run list drives the others."""

    runs_changed = Signal(list)
    run_activated = Signal(str)  # double-click in the summary: the main window may open that run

    def __init__(self, store: RunStore, run_ids: list[str] | tuple[str, ...] = (), parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.tabs = QTabWidget()
        self.charts = CompareView(store)
        self.diff = ConfigDiffView(store)
        self.summary = SummaryTable(store)
        self.tabs.addTab(self.charts, "Charts")
        self.tabs.addTab(self.diff, "Config diff")
        self.tabs.addTab(self.summary, "Summary")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.tabs)
        self.charts.runs_changed.connect(self._runs_changed)
        self.summary.run_activated.connect(self.run_activated)
        if run_ids:
            self.charts.set_runs(list(run_ids))

    def set_runs(self, run_ids: list[str]) -> None:
        self.charts.set_runs(run_ids)

    def _runs_changed(self, ids: list) -> None:
        self.diff.set_runs(ids)
        self.summary.set_runs(ids)
        self.runs_changed.emit(ids)
