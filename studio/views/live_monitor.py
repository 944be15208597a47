"""Live charts of one run (pyqtgraph): loss, validation loss, learning rate, throughput, sparsity,
a layer × step sparsity heatmap and cumulative FLOPs spent vs dense-equivalent; for fine-tuning and
soft prompting, the task scores on the development set (``dev_accuracy``, ``dev_macro_f1``,
``dev_micro_f1``: the rows ``engine.train.finetune`` logs) with the majority baseline (dashed) and the TF-IDF +
logistic regression baseline (dotted) as labelled lines, each shown only when present.

Plot items are created once; a timer hands each changed curve the points worth drawing of its
growing numpy buffers: the min and max of each bin (``PeakDecimator``, kept incrementally, so spikes
stay), at most ~4k points whatever the length; a zoomed-in view gets the visible part at full detail.
Monitors that are not on screen skip their ticks and catch up when shown.

The x range follows a training run up to its ``max_steps`` and fits the data of a finished one; a flat
series gets a padded y range; legends sit under their charts; colours and text sizes follow the
palette and the application font (``studio.widgets.chart_style``); before the first step a placeholder
stands in for the charts.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QCheckBox, QComboBox, QGridLayout, QHBoxLayout, QLabel, QPushButton, QSlider, QVBoxLayout, QWidget,
)

from studio.models import formatting as fmt
from studio.models.labels import BASELINE_LABELS, MAJORITY, TFIDF
from studio.models.plot_buffers import EMA, PeakDecimator, peak_indices
from studio.models.run_data import LAYER_PREFIX, RunData
from studio.widgets.chart_export import ChartExportDialog
from studio.widgets.chart_placeholder import ChartPlaceholder
from studio.widgets.chart_style import (
    ChartTheme, ThemeFollower, compact_ticks, is_flat, outside_legend, padded_range, set_title, style_plot,
)

pg.setConfigOptions(antialias=False)

X_AXIS_LABELS = {"step": ("step", None), "tokens": ("tokens", None), "flops": ("FLOPs spent", "FLOP"),
                 "wall_time": ("wall time", "s")}
LOSS_COLOR, VAL_COLOR = "#08519c", "#e6550d"  # the raw loss is a faint shade of the smoothed one
REFRESH_MS = 100
MAX_BINS = 1024  # min+max per bin: ~2k points per curve, ~4 per pixel of a chart a third of the screen wide
ZOOM_MS = 60  # after a zoom or pan settles, the visible part is re-read at full detail
TASK_PREFIX = "dev_"  # task scores on the development set, logged as metric rows at each evaluation
DEV_LOSS = "dev_loss"  # drawn with the losses, not with the scores (another scale)
TASK_COLORS = {"dev_accuracy": "#1f77b4", "dev_macro_f1": "#2ca02c", "dev_micro_f1": "#9467bd"}
TASK_NAMES = {"dev_accuracy": "accuracy", "dev_macro_f1": "macro-F1", "dev_micro_f1": "micro-F1"}
# a baseline's reference line: pen style and where its label sits along the line (majority on the left,
# TF-IDF on the right, so two close values do not print over each other)
BASELINE_STYLES = {MAJORITY: (Qt.PenStyle.DashLine, 0.02, (0, 1)), TFIDF: (Qt.PenStyle.DotLine, 0.98, (1, 1))}
FIT_PAD = 0.02  # a finished run's x range: its data and this fraction of it past the last point
WAITING = "waiting for the first step…"


def _nice_ceil(v: float) -> float:
    """Smallest 1, 2, 2.5 or 5 × 10^k not below v (a range end that keeps tick labels round)."""
    k = 10.0 ** np.floor(np.log10(v))
    return float(next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= v))


def _configure(plot: pg.PlotItem, title: str, y_label: str, units: str | None = None, legend: bool = True) -> None:
    set_title(plot, title, ChartTheme.of())
    plot.setLabel("left", y_label, units=units)
    plot.showGrid(x=False, y=False)  # grid lines cost more to paint than the curves; toggle in the bar
    plot.setDownsampling(auto=True, mode="peak")
    plot.setClipToView(True)
    for side in ("left", "bottom"):
        compact_ticks(plot.getAxis(side))
    if legend:  # a chart of one curve is named by its title
        outside_legend(plot)


class LiveMonitor(QWidget):
    def __init__(self, data: RunData | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.data = data or RunData()
        self.x_axis = "step"
        self.ema = EMA(0.6)
        self.task_curves: dict[str, pg.PlotDataItem] = {}
        self._full: dict[pg.PlotDataItem, tuple[np.ndarray, np.ndarray]] = {}  # what each curve holds, undecimated
        self._decimators: dict[pg.PlotDataItem, PeakDecimator] = {}
        self._detail: dict[pg.PlotDataItem, tuple[int, int, np.ndarray]] = {}  # zoomed part: (i0, i1, indices)
        self.baseline_lines: list[pg.InfiniteLine] = []
        self._drawn_version = -1
        self._heat_version = -1
        self._build()
        self.timer = QTimer(self, interval=REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.zoom_timer = QTimer(self, singleShot=True, interval=ZOOM_MS)
        self.zoom_timer.timeout.connect(self._zoomed)
        self.loss_plot.sigXRangeChanged.connect(lambda *_a: self.zoom_timer.start())  # x is linked: one is enough

    # -- layout ---------------------------------------------------------------------------------------
    def _build(self) -> None:
        bar = QHBoxLayout()
        bar.addWidget(QLabel("x axis"))
        self.x_combo = QComboBox(objectName="x_axis")
        for key, (label, _u) in X_AXIS_LABELS.items():
            self.x_combo.addItem(label, key)
        self.x_combo.currentIndexChanged.connect(lambda _i: self.set_x_axis(self.x_combo.currentData()))
        bar.addWidget(self.x_combo)
        bar.addSpacing(12)
        bar.addWidget(QLabel("smoothing"))
        self.smooth = QSlider(Qt.Orientation.Horizontal, objectName="smoothing")
        self.smooth.setRange(0, 99)
        self.smooth.setValue(60)
        self.smooth.setFixedWidth(120)
        self.smooth.setToolTip("Exponential moving average of the training loss (0 = raw)")
        self.smooth_label = QLabel("0.60")
        self.smooth.valueChanged.connect(lambda v: self.set_smoothing(v / 100))
        bar.addWidget(self.smooth)
        bar.addWidget(self.smooth_label)
        bar.addSpacing(12)
        self.log_loss = QCheckBox("log loss", objectName="log_loss")
        self.log_loss.toggled.connect(lambda on: self.loss_plot.setLogMode(y=on))
        self.log_x = QCheckBox("log x", objectName="log_x")
        self.log_x.toggled.connect(self._set_log_x)
        self.log_flops = QCheckBox("log FLOPs", objectName="log_flops")
        self.log_flops.toggled.connect(lambda on: self.flops_plot.setLogMode(y=on))
        self.grid = QCheckBox("grid", objectName="grid")
        self.grid.toggled.connect(lambda on: [p.showGrid(x=on, y=on, alpha=0.2) for p in self.line_plots])
        for w in (self.log_loss, self.log_x, self.log_flops, self.grid):
            bar.addWidget(w)
        bar.addStretch(1)
        self.export_button = QPushButton("Export chart…", objectName="export_chart")
        self.export_button.setToolTip("Save one of these charts as PNG or SVG at a chosen size")
        self.export_button.clicked.connect(lambda _c=False: self.export_chart_dialog())
        bar.addWidget(self.export_button)

        # headline numbers, as in a W&B run summary: palette colours and sizes relative to the font
        self.summary: dict[str, QLabel] = {}
        self.summary_titles: dict[str, QLabel] = {}
        strip = QGridLayout()
        for i, (key, title) in enumerate((("step", "Step"), ("tokens", "Tokens"), ("loss", "Loss (EMA)"),
                                          ("val", "Val loss / ppl"), ("tps", "Tokens/s"), ("sparsity", "Sparsity"),
                                          ("saved", "FLOPs saved"))):
            t = QLabel(title)
            t.setForegroundRole(QPalette.ColorRole.PlaceholderText)
            v = QLabel("–", objectName=f"summary:{key}")
            strip.addWidget(t, 0, i)
            strip.addWidget(v, 1, i)
            self.summary[key] = v
            self.summary_titles[key] = t
        self.flops_saved_label = self.summary["saved"]

        self.glw = pg.GraphicsLayoutWidget()
        self._pens: dict[pg.GraphicsObject, tuple[str, dict, bool]] = {}  # item -> (colour, pen options, faint)
        self.loss_plot = self.glw.addPlot(row=0, col=0)
        _configure(self.loss_plot, "Loss", "loss")
        self.loss_raw = self._styled(self.loss_plot.plot(name="train"), LOSS_COLOR, faint=True)
        self.loss_ema = self._styled(self.loss_plot.plot(name="train (EMA)"), LOSS_COLOR)
        self.val_curve = self._styled(self.loss_plot.plot(symbol="o", symbolSize=6, symbolPen=None, name="validation"),
                                      VAL_COLOR)
        # a task fine-tune's loss on the development set; its legend entry appears with its first point
        self.dev_loss_curve = self._styled(pg.PlotDataItem(symbol="o", symbolSize=6, symbolPen=None,
                                                           name="development"), VAL_COLOR)
        self.lr_plot = self.glw.addPlot(row=0, col=1)
        _configure(self.lr_plot, "Learning rate", "lr", legend=False)
        self.lr_curve = self._styled(self.lr_plot.plot(name="lr"), "#31a354")
        self.tps_plot = self.glw.addPlot(row=0, col=2)
        _configure(self.tps_plot, "Throughput", "tokens/s", legend=False)
        self.tps_curve = self._styled(self.tps_plot.plot(name="tokens/s"), "#756bb1")
        self.flops_plot = self.glw.addPlot(row=1, col=0)
        _configure(self.flops_plot, "Cumulative training FLOPs", "FLOPs", units="FLOP")
        self.dense_curve = self._styled(self.flops_plot.plot(name="dense-equivalent"), "#999999",
                                        style=Qt.PenStyle.DashLine)
        self.sparse_curve = self._styled(self.flops_plot.plot(name="sparse (spent)"), "#d62728")
        self.sparsity_plot = self.glw.addPlot(row=1, col=1)
        _configure(self.sparsity_plot, "Sparsity, mask churn and gradient norm", "sparsity / churn / grad norm")
        self.sparsity_curve = self._styled(self.sparsity_plot.plot(name="sparsity"), "#636363")
        self.grad_curve = self._styled(self.sparsity_plot.plot(name="grad norm"), "#fdae6b")
        # dynamic sparsity: the fraction of connections each mask update replaced, a point per update
        self.churn_curve = self._styled(self.sparsity_plot.plot(pen=None, symbol="t", symbolSize=7, symbolPen=None,
                                                                name="mask churn"), "#3182bd", line=False)
        self.heat_plot = self.glw.addPlot(row=1, col=2)
        set_title(self.heat_plot, "Sparsity per layer (layer × step)", ChartTheme.of())
        self.heat_plot.setLabel("bottom", "step")
        self.heat_img = pg.ImageItem(axisOrder="col-major")
        self.heat_plot.addItem(self.heat_img)
        self.heat_bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"), width=12,
                                        interactive=False)
        self.heat_bar.setImageItem(self.heat_img, insert_in=self.heat_plot)
        self.heat_empty = pg.TextItem("no per-layer sparsity logged yet", anchor=(0.5, 0.5))
        self.heat_plot.addItem(self.heat_empty)
        self.heat_empty.setPos(0.5, 0.5)
        self.heat_shown = True  # hidden for static masks: one flat colour says nothing
        self._waiting = WAITING
        self._sparsity_wide = False
        # task scores: built now (plot items are created once), put on the grid with the first score
        self.task_plot = pg.PlotItem()
        _configure(self.task_plot, "Task scores (development set)", "score")
        self.task_plot.setYRange(0, 1, padding=0.02)
        self.task_plot.getAxis("left").enableAutoSIPrefix(False)
        self.task_plot.setXLink(self.loss_plot)
        self.task_shown = False
        self.line_plots = [self.loss_plot, self.lr_plot, self.tps_plot, self.flops_plot, self.sparsity_plot]
        for p in self.line_plots[1:]:
            p.setXLink(self.loss_plot)
        # the shared x range follows the run (to max_steps, or in ~25 % jumps) until the user zooms or pans
        self._following_x = True
        self._flat: set[pg.PlotItem] = set()  # charts whose y range we padded around a flat series
        for p in [*self.line_plots, self.task_plot]:
            p.getViewBox().sigRangeChangedManually.connect(self._stop_following_x)
        self._label_x()
        # a legend entry appears with its curve's first point: a fine-tune logs no validation loss or
        # sparsity, and an empty "validation" entry would only mislead
        self._unlisted: dict[pg.PlotDataItem, tuple[pg.PlotItem, str]] = {}
        for plot, curve in ((self.loss_plot, self.val_curve), (self.sparsity_plot, self.sparsity_curve),
                            (self.sparsity_plot, self.grad_curve), (self.sparsity_plot, self.churn_curve)):
            plot.legend.removeItem(curve)
            self._unlisted[curve] = (plot, curve.name())

        # before the first step: a line of text instead of six empty 0–1 charts
        self.charts = ChartPlaceholder(self.glw, WAITING)
        self.charts.show_text(WAITING)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(bar)
        lay.addLayout(strip)
        lay.addWidget(self.charts, 1)
        self.follower = ThemeFollower(self, self._apply_theme)

    def _styled(self, item, color: str, faint: bool = False, line: bool = True, **pen):
        """Remember ``item``'s colour, so a palette change can redraw it readably (``_apply_theme``)."""
        self._pens[item] = (color, pen if line else None, faint)
        return item

    def _apply_theme(self, theme: ChartTheme) -> None:
        """Colours and text sizes from the palette and the font: after any change of either."""
        self.glw.setBackground(theme.background)
        for p in [*self.line_plots, self.task_plot, self.heat_plot]:
            style_plot(p, theme)
        for item, (color, pen, faint) in self._pens.items():
            c = theme.faint(color) if faint else theme.readable(color)
            if pen is not None:
                item.setPen(pg.mkPen(c, width=1, **pen))
            if item.opts.get("symbol") is not None:
                item.setSymbolBrush(c)
        for name, curve in self.task_curves.items():
            c = theme.readable(TASK_COLORS.get(name, "#777"))
            curve.setPen(pg.mkPen(c, width=1))
            curve.setSymbolBrush(c)
        self.heat_empty.setColor(theme.muted)
        self.heat_bar.axis.setTextPen(theme.text)
        self.heat_bar.axis.setTickFont(theme.font(0.9))
        for line in self.baseline_lines:
            line.label.setColor(theme.readable(TASK_COLORS.get(line.score_name, "#777")))
        value_font = theme.font(1.3, bold=True)
        for v in self.summary.values():
            v.setFont(value_font)
        for t in self.summary_titles.values():
            t.setFont(theme.font(1.0))

    # -- options ---------------------------------------------------------------------------------------
    def set_x_axis(self, axis: str) -> None:
        self.x_axis = axis
        i = self.x_combo.findData(axis)
        if i != self.x_combo.currentIndex():
            self.x_combo.setCurrentIndex(i)
        self._label_x()
        self._following_x = True
        for p in self.line_plots:
            p.enableAutoRange()
        self.redraw(force=True)

    def _label_x(self) -> None:
        label, units = X_AXIS_LABELS[self.x_axis]
        for p in [*self.line_plots, self.task_plot]:
            p.setLabel("bottom", label, units=units)

    def set_smoothing(self, w: float) -> None:
        self.smooth_label.setText(f"{w:.2f}")
        self.ema.reset(w)
        self.redraw(force=True)

    def _set_log_x(self, on: bool) -> None:
        for p in [*self.line_plots, self.task_plot]:
            p.setLogMode(x=on)
            if on:  # log views are in log10 units: leave the x range to pyqtgraph's auto-range
                p.enableAutoRange(x=True)
        self._following_x = not on

    def _stop_following_x(self, *_args) -> None:
        self._following_x = False

    def _x_target(self, x0: float, x1: float) -> tuple[float, float] | None:
        """The x range the charts should show, or None to grow in jumps: a finished run's data with a
        small margin; a training run on the step axis up to its ``max_steps`` (where it is heading)."""
        lo = min(x0, 0.0)
        if not self.data.training():
            return lo, x1 + FIT_PAD * max(x1 - lo, 1e-12)
        end = self.data.max_steps
        if self.x_axis == "step" and end and end > x1:
            return lo, end + FIT_PAD * (end - lo)
        return None

    def _follow_x(self) -> None:
        """Keep the shared x range on the run without changing it with every point.

        Axis ticks are laid out again whenever a range changes; with auto-range that happened on
        every redraw and cost about a third of it. So a training run's range is set once to its
        ``max_steps`` (step axis) or grows in jumps of about 25 %; a finished run's fits its data. A
        view the user zoomed or panned is left alone."""
        d = self.data
        vb = self.loss_plot.getViewBox()
        auto = bool(vb.autoRangeEnabled()[0])
        if auto and not self.log_x.isChecked():
            self._following_x = True  # auto-range asked for (the "A" button, a new x axis): we take it over
        if not self._following_x or not len(d.frames):
            return
        xs = d.frames.column({"step": 0, "tokens": 1, "flops": 2, "wall_time": 3}[self.x_axis])
        x0, x1 = float(xs[0]), float(xs[-1])
        lo, hi = vb.viewRange()[0]
        target = self._x_target(x0, x1)
        if target is not None:
            if not auto and abs(lo - target[0]) + abs(hi - target[1]) <= 1e-9 * max(abs(target[1]), 1.0):
                return
        elif not auto and lo <= x0 and x1 <= hi and (hi - x0) <= 3 * max(x1 - x0, 1e-12):
            return
        for p in [*self.line_plots, self.task_plot]:
            p.enableAutoRange(x=False)
        if target is None:
            target = (min(x0, 0.0) if x0 >= 0 else x0, x0 + _nice_ceil(1.25 * max(x1 - x0, 1e-12)))
        self.loss_plot.setXRange(*target, padding=0)

    def _pad_flat(self) -> None:
        """A chart whose curves are all flat (a constant learning rate, a fixed sparsity) gets a padded y
        range around the value; pyqtgraph's auto-range would keep an arbitrary span (40.0–41.0). When the
        series stop being flat, auto-range takes over again."""
        for p in self.line_plots:
            vb = p.getViewBox()
            if p.getAxis("left").logMode or not (vb.autoRangeEnabled()[1] or p in self._flat):
                continue
            ys = [c.yData[np.isfinite(c.yData)] for c in p.listDataItems()
                  if c.isVisible() and c.yData is not None and len(c.yData)]
            ys = [y for y in ys if y.size]
            if not ys:
                continue
            lo, hi = min(float(y.min()) for y in ys), max(float(y.max()) for y in ys)
            if is_flat(lo, hi):
                vb.enableAutoRange(y=False)
                p.setYRange(*padded_range(lo, hi), padding=0)
                self._flat.add(p)
            elif p in self._flat:
                self._flat.discard(p)
                vb.enableAutoRange(y=True)

    # -- task scores -----------------------------------------------------------------------------------
    def _show_task_plot(self) -> None:
        """Put the score chart on the grid: in the heatmap's place when no layer sparsity is logged (a
        dense fine-tune has none), else on a row of its own."""
        if self.task_shown:
            return
        self.task_shown = True
        if not self.data.layer_names() or not self.heat_shown:
            self._hide_heatmap()
            self._widen_sparsity(False)
            self.glw.addItem(self.task_plot, row=1, col=2)
        else:
            self.glw.addItem(self.task_plot, row=2, col=0, colspan=3)
        self.line_plots.append(self.task_plot)
        self.task_plot.setLogMode(x=self.log_x.isChecked())

    def _task_curve(self, name: str) -> pg.PlotDataItem:
        curve = self.task_curves.get(name)
        if curve is None:
            color = self.follower.theme.readable(TASK_COLORS.get(name, pg.intColor(len(self.task_curves) + 3).name()))
            curve = self.task_plot.plot(pen=pg.mkPen(color, width=1), symbol="o", symbolSize=5, symbolBrush=color,
                                        symbolPen=None, name=TASK_NAMES.get(name, name[len(TASK_PREFIX):]))
            self.task_curves[name] = curve
        return curve

    def set_baselines(self, baselines: dict[str, float], kind: str = MAJORITY) -> None:
        """Labelled lines at a baseline's scores (``{"dev_accuracy": 0.55, ...}``), in each score's colour;
        replaces the lines of that kind only (``majority`` dashed, ``tfidf_lr`` dotted), so both can show."""
        for line in [ln for ln in self.baseline_lines if ln.baseline_kind == kind]:
            self.task_plot.removeItem(line)
            self.baseline_lines.remove(line)
        style, position, anchor = BASELINE_STYLES.get(kind, BASELINE_STYLES[MAJORITY])
        for name, value in baselines.items():
            color = self.follower.theme.readable(TASK_COLORS.get(name, "#777"))
            line = pg.InfiniteLine(pos=value, angle=0, pen=pg.mkPen(color, width=1, style=style),
                                   label=f"{BASELINE_LABELS.get(kind, kind)} {TASK_NAMES.get(name, name)} {value:.3f}",
                                   labelOpts={"position": position, "color": color, "anchors": [anchor, anchor]})
            line.baseline_kind, line.score_name = kind, name
            self.task_plot.addItem(line)
            self.baseline_lines.append(line)

    def baseline_kinds(self) -> dict[str, list[float]]:
        """kind -> the values of its lines on the score chart (what a test or a screenshot checks)."""
        out: dict[str, list[float]] = {}
        for line in self.baseline_lines:
            out.setdefault(line.baseline_kind, []).append(float(line.value()))
        return out

    def task_metric_names(self) -> list[str]:
        return sorted(n for n in self.data.series if n.startswith(TASK_PREFIX) and n != DEV_LOSS)

    # -- export ----------------------------------------------------------------------------------------
    def plots(self) -> dict[str, pg.PlotItem]:
        """Chart title -> PlotItem of the charts on screen (for export)."""
        out = {}
        for p in [*self.line_plots, *([self.heat_plot] if self.heat_plot.scene() is not None else [])]:
            title = p.titleLabel.text or "chart"
            out[title] = p
        return out

    def export_chart_dialog(self, title: str | None = None) -> None:
        ChartExportDialog(self.plots(), title, self).exec()

    # -- drawing ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Timer tick: redraw only when the data changed since the last tick and the charts are on screen
        (a run in a background tab costs nothing; its changes wait in ``data.dirty``)."""
        if self.data.version != self._drawn_version and self.isVisible():
            self.redraw()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        self.refresh()

    def _draw(self, curve: pg.PlotDataItem, x: np.ndarray, y: np.ndarray) -> None:
        """Hand ``curve`` the points worth drawing; the full arrays stay for queries and zooming."""
        self._full[curve] = (x, y)
        dec = self._decimators.get(curve)
        if dec is None:
            dec = self._decimators[curve] = PeakDecimator(MAX_BINS)
        idx = dec.indices(y) if len(x) == len(y) else None
        if idx is None:
            curve.setData(x, y)
            return
        detail = self._detail.get(curve)
        if detail is not None and detail[1] <= len(y):
            i0, i1, inner = detail
            idx = np.concatenate([idx[idx < i0], inner, idx[idx >= i1]])
        curve.setData(x[idx], y[idx])

    def _zoomed(self) -> None:
        """The x range changed: draw the visible part of long curves at full detail (or drop it when the
        view follows the data again)."""
        auto_x = self.loss_plot.getViewBox().autoRangeEnabled()[0]
        (x0, x1), _ = self.loss_plot.viewRange()
        changed = False
        for curve, (x, y) in self._full.items():
            if len(x) <= 2 * MAX_BINS or len(x) != len(y) or self.log_x.isChecked():
                continue
            i0 = max(int(np.searchsorted(x, x0, side="left")) - 1, 0)
            i1 = min(int(np.searchsorted(x, x1, side="right")) + 1, len(x))
            if auto_x or (i1 - i0) * 2 > len(x):  # most of the series is visible: the overview is as fine
                changed |= self._detail.pop(curve, None) is not None
                continue
            self._detail[curve] = (i0, i1, peak_indices(y, i0, i1, MAX_BINS))
            changed = True
        if changed:
            for curve, (x, y) in list(self._full.items()):
                self._draw(curve, x, y)

    def redraw(self, force: bool = False) -> None:
        d, ax = self.data, self.x_axis
        dirty = set(d.series) | {"val", "frames"} if force else set(d.dirty)
        d.dirty.clear()
        self._drawn_version = d.version
        loss = d.series.get("loss")
        if loss is not None and ("loss" in dirty or force):
            y = loss.y()
            smooth = self.ema.follow(y, loss.cuts)  # starts over after a resume truncated the series
            x = loss.x(ax)
            self._draw(self.loss_raw, x, y)
            self._draw(self.loss_ema, x, smooth)
        for name, curve in (("lr", self.lr_curve), ("tokens_per_s", self.tps_curve),
                            ("sparsity", self.sparsity_curve), ("grad_norm", self.grad_curve),
                            ("mask_churn", self.churn_curve)):
            s = d.series.get(name)
            if s is not None and name in dirty:
                self._draw(curve, s.x(ax), s.y())
        if "val" in dirty and "loss" in d.val:
            s = d.val["loss"]
            self._draw(self.val_curve, s.x(ax), s.y())
        for name in sorted(n for n in dirty if n.startswith(TASK_PREFIX)):  # sorted: a stable legend order
            s = d.series.get(name)
            if s is None or not len(s):
                continue
            if name == DEV_LOSS:
                if self.dev_loss_curve.scene() is None:
                    self.loss_plot.addItem(self.dev_loss_curve)
                self._draw(self.dev_loss_curve, s.x(ax), s.y())
                continue
            self._show_task_plot()
            self._draw(self._task_curve(name), s.x(ax), s.y())
        if "frames" in dirty and len(d.frames):
            col = {"step": 0, "tokens": 1, "flops": 2, "wall_time": 3}[ax]
            x = d.frames.column(col)
            self._draw(self.sparse_curve, x, d.frames.column(2))
            self._draw(self.dense_curve, x, d.frames.column(4))
        if self._unlisted:
            for curve in [c for c in self._unlisted if c.yData is not None and len(c.yData)]:
                plot, name = self._unlisted.pop(curve)
                plot.legend.addItem(curve, name)
        if any(n.startswith(LAYER_PREFIX) for n in dirty) and d.version != self._heat_version:
            self._draw_heatmap()
        self._show_charts(bool(len(d.frames) or d.series))
        self._follow_x()
        self._pad_flat()
        self._update_summary()

    def _show_charts(self, on: bool) -> None:
        """The charts once there is something to draw; the placeholder before."""
        self.charts.show_text(None if on else self._waiting)

    def set_placeholder(self, text: str | None) -> None:
        """What stands in for the charts while no step is logged (``None``: the default waiting text);
        e.g. why a run that failed at launch has no charts."""
        self._waiting = text or WAITING
        self._show_charts(bool(len(self.data.frames) or self.data.series))

    def _hide_heatmap(self) -> None:
        self.heat_shown = False
        if self.heat_plot.scene() is not None:
            self.glw.removeItem(self.heat_plot)
        self.heat_plot.hide()

    def _widen_sparsity(self, wide: bool) -> None:
        """With nothing in the heatmap's place, the sparsity chart takes its room."""
        if wide != self._sparsity_wide:
            self._sparsity_wide = wide
            self.glw.removeItem(self.sparsity_plot)
            self.glw.addItem(self.sparsity_plot, row=1, col=1, colspan=2 if wide else 1)

    def _draw_heatmap(self) -> None:
        self._heat_version = self.data.version
        if self.data.static_masks():  # every layer keeps its initial level: one flat colour says nothing
            if self.heat_shown and not self.task_shown:
                self._hide_heatmap()
                self._widen_sparsity(True)
            return
        if not self.heat_shown and not self.task_shown:  # (no config known, and the levels began to move)
            self.heat_shown = True
            self.heat_plot.show()
            self._widen_sparsity(False)
            self.glw.addItem(self.heat_plot, row=1, col=2)
        hm = self.data.heatmap()
        if hm is None:
            return
        img, layers, (s0, s1) = hm
        self.heat_empty.hide()
        self.heat_img.setImage(img, autoLevels=False, levels=(0.0, 1.0))
        # each column centred on its steps: one column (a single evaluation) is not 1 step wide
        cols = img.shape[0]
        col = (s1 - s0) / (cols - 1) if cols > 1 and s1 > s0 else max(s0, 1.0)
        self.heat_img.setRect(QRectF(s0 - col / 2, 0, (s1 - s0) + col, len(layers)))
        ticks = [(i + 0.5, name.removeprefix("blocks.")) for i, name in enumerate(layers)]  # "0.mlp.fc": room for the map
        step = max(1, len(ticks) // 12)  # keep labels readable on deep models
        self.heat_plot.getAxis("left").setTicks([ticks[::step]])

    def _update_summary(self) -> None:
        d = self.data
        last = d.last_step
        self.summary["step"].setText("–" if last is None else (
            f"{last:,}" + (f" / {d.max_steps:,}" if d.max_steps else "")))
        self.summary["tokens"].setText(fmt.si(d.frames.last(1)) if len(d.frames) else "–")
        self.summary["loss"].setText(f"{self.ema.values()[-1]:.4f}" if len(self.ema.out) else "–")
        vl, ppl = d.latest_val("loss"), d.latest_val("perplexity")
        score = next((n for n in ("dev_accuracy", "dev_micro_f1") if n in d.series), None)
        if vl is None and score is not None:  # a task fine-tune: its headline is the development score
            self.summary_titles["val"].setText(f"Dev {TASK_NAMES[score]}")
            self.summary["val"].setText(f"{d.latest(score):.3f}")
        else:
            self.summary["val"].setText("–" if vl is None else f"{vl:.4f}" + (f" / {ppl:.1f}" if ppl else ""))
        tps = d.latest("tokens_per_s")
        self.summary["tps"].setText(fmt.si(tps))
        sp = d.latest("sparsity")
        self.summary["sparsity"].setText("–" if sp is None else f"{100 * sp:.1f} %")
        spent, dense = d.flops_totals()
        if dense > 0:
            ratio = f" ({dense / spent:.2f}×)" if spent > 0 else ""
            self.flops_saved_label.setText(f"{fmt.flops(dense - spent)}{ratio}")
            self.flops_saved_label.setToolTip(
                f"spent {fmt.flops(spent)} (sparse) vs {fmt.flops(dense)} dense-equivalent")

    # -- queries for tests and the runs browser -----------------------------------------------------------
    def curve_points(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The full (not downsampled) data a curve holds."""
        curves = {"loss": self.loss_raw, "loss_ema": self.loss_ema, "val_loss": self.val_curve, "lr": self.lr_curve,
                  "mask_churn": self.churn_curve,
                  "tokens_per_s": self.tps_curve, "sparsity": self.sparsity_curve, "flops": self.sparse_curve,
                  "flops_dense": self.dense_curve, "grad_norm": self.grad_curve, DEV_LOSS: self.dev_loss_curve,
                  **self.task_curves}
        if name not in curves:
            return np.empty(0), np.empty(0)
        curve = curves[name]
        x, y = self._full.get(curve, (None, None))
        return (np.asarray(x) if x is not None else np.empty(0)), (np.asarray(y) if y is not None else np.empty(0))
