"""Live charts of one run (pyqtgraph): loss, validation loss, learning rate, throughput, sparsity,
a layer × step sparsity heatmap and cumulative FLOPs spent vs dense-equivalent.

Plot items are created once; a timer hands each changed curve views of its growing numpy buffers
(``setData``), and pyqtgraph's peak downsampling plus clip-to-view keep redraws cheap at millions of
points while keeping spikes (min and max of each bin are drawn).
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtWidgets import QCheckBox, QComboBox, QGridLayout, QHBoxLayout, QLabel, QSlider, QVBoxLayout, QWidget

from . import formatting as fmt
from .plot_buffers import EMA
from .run_data import LAYER_PREFIX, RunData

pg.setConfigOptions(antialias=False, background="w", foreground="#333")

X_AXIS_LABELS = {"step": ("step", None), "tokens": ("tokens", None), "flops": ("FLOPs spent", "FLOP"),
                 "wall_time": ("wall time", "s")}
RAW_PEN = pg.mkPen("#9ecae1", width=1)
EMA_PEN = pg.mkPen("#08519c", width=2)
VAL_PEN = pg.mkPen("#e6550d", width=2)
REFRESH_MS = 100


def _configure(plot: pg.PlotItem, title: str, y_label: str, units: str | None = None) -> None:
    plot.setTitle(title, size="10pt")
    plot.setLabel("left", y_label, units=units)
    plot.showGrid(x=False, y=False)  # grid lines cost more to paint than the curves; toggle in the bar
    plot.setDownsampling(auto=True, mode="peak")
    plot.setClipToView(True)
    plot.addLegend(offset=(-8, 8), labelTextSize="8pt")


class LiveMonitor(QWidget):
    def __init__(self, data: RunData | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.data = data or RunData()
        self.x_axis = "step"
        self.ema = EMA(0.6)
        self._drawn_version = -1
        self._heat_version = -1
        self._build()
        self.timer = QTimer(self, interval=REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()

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

        # headline numbers, as in a W&B run summary
        self.summary: dict[str, QLabel] = {}
        strip = QGridLayout()
        for i, (key, title) in enumerate((("step", "Step"), ("tokens", "Tokens"), ("loss", "Loss (EMA)"),
                                          ("val", "Val loss / ppl"), ("tps", "Tokens/s"), ("sparsity", "Sparsity"),
                                          ("saved", "FLOPs saved"))):
            t = QLabel(title)
            t.setStyleSheet("color: #777; font-size: 11px;")
            v = QLabel("–", objectName=f"summary:{key}")
            v.setStyleSheet("font-size: 15px; font-weight: 600;")
            strip.addWidget(t, 0, i)
            strip.addWidget(v, 1, i)
            self.summary[key] = v
        self.flops_saved_label = self.summary["saved"]

        self.glw = pg.GraphicsLayoutWidget()
        self.loss_plot = self.glw.addPlot(row=0, col=0)
        _configure(self.loss_plot, "Loss", "loss")
        self.loss_raw = self.loss_plot.plot(pen=RAW_PEN, name="train")
        self.loss_ema = self.loss_plot.plot(pen=EMA_PEN, name="train (EMA)")
        self.val_curve = self.loss_plot.plot(pen=VAL_PEN, symbol="o", symbolSize=6, symbolBrush="#e6550d",
                                             symbolPen=None, name="validation")
        self.lr_plot = self.glw.addPlot(row=0, col=1)
        _configure(self.lr_plot, "Learning rate", "lr")
        self.lr_curve = self.lr_plot.plot(pen=pg.mkPen("#31a354", width=2), name="lr")
        self.tps_plot = self.glw.addPlot(row=0, col=2)
        _configure(self.tps_plot, "Throughput", "tokens/s")
        self.tps_curve = self.tps_plot.plot(pen=pg.mkPen("#756bb1", width=1), name="tokens/s")
        self.flops_plot = self.glw.addPlot(row=1, col=0)
        _configure(self.flops_plot, "Cumulative training FLOPs", "FLOPs", units="FLOP")
        self.dense_curve = self.flops_plot.plot(pen=pg.mkPen("#999", width=2, style=Qt.PenStyle.DashLine),
                                                name="dense-equivalent")
        self.sparse_curve = self.flops_plot.plot(pen=pg.mkPen("#d62728", width=2), name="sparse (spent)")
        self.sparsity_plot = self.glw.addPlot(row=1, col=1)
        _configure(self.sparsity_plot, "Sparsity and gradient norm", "sparsity")
        self.sparsity_curve = self.sparsity_plot.plot(pen=pg.mkPen("#636363", width=2), name="sparsity")
        self.grad_curve = self.sparsity_plot.plot(pen=pg.mkPen("#fdae6b", width=1), name="grad norm")
        self.heat_plot = self.glw.addPlot(row=1, col=2)
        self.heat_plot.setTitle("Sparsity per layer (layer × step)", size="10pt")
        self.heat_plot.setLabel("bottom", "step")
        self.heat_img = pg.ImageItem(axisOrder="col-major")
        self.heat_plot.addItem(self.heat_img)
        self.heat_bar = pg.ColorBarItem(values=(0, 1), colorMap=pg.colormap.get("viridis"), width=12,
                                        interactive=False)
        self.heat_bar.setImageItem(self.heat_img, insert_in=self.heat_plot)
        self.heat_empty = pg.TextItem("no per-layer sparsity logged yet", color="#999", anchor=(0.5, 0.5))
        self.heat_plot.addItem(self.heat_empty)
        self.heat_empty.setPos(0.5, 0.5)
        self.line_plots = [self.loss_plot, self.lr_plot, self.tps_plot, self.flops_plot, self.sparsity_plot]
        for p in self.line_plots[1:]:
            p.setXLink(self.loss_plot)
        self._label_x()

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(bar)
        lay.addLayout(strip)
        lay.addWidget(self.glw, 1)

    # -- options ---------------------------------------------------------------------------------------
    def set_x_axis(self, axis: str) -> None:
        self.x_axis = axis
        i = self.x_combo.findData(axis)
        if i != self.x_combo.currentIndex():
            self.x_combo.setCurrentIndex(i)
        self._label_x()
        self.redraw(force=True)
        for p in self.line_plots:
            p.enableAutoRange()

    def _label_x(self) -> None:
        label, units = X_AXIS_LABELS[self.x_axis]
        for p in self.line_plots:
            p.setLabel("bottom", label, units=units)

    def set_smoothing(self, w: float) -> None:
        self.smooth_label.setText(f"{w:.2f}")
        self.ema.reset(w)
        self.redraw(force=True)

    def _set_log_x(self, on: bool) -> None:
        for p in self.line_plots:
            p.setLogMode(x=on)

    # -- drawing ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Timer tick: redraw only when the data changed since the last tick."""
        if self.data.version != self._drawn_version:
            self.redraw()

    def redraw(self, force: bool = False) -> None:
        d, ax = self.data, self.x_axis
        dirty = set(d.series) | {"val", "frames"} if force else set(d.dirty)
        d.dirty.clear()
        self._drawn_version = d.version
        loss = d.series.get("loss")
        if loss is not None and ("loss" in dirty or force):
            y = loss.y()
            if len(self.ema.out) > len(y):  # truncated (resume): recompute
                self.ema.reset()
            self.ema.extend(y[len(self.ema.out):])
            x = loss.x(ax)
            self.loss_raw.setData(x, y)
            self.loss_ema.setData(x, self.ema.values())
        for name, curve in (("lr", self.lr_curve), ("tokens_per_s", self.tps_curve),
                            ("sparsity", self.sparsity_curve), ("grad_norm", self.grad_curve)):
            s = d.series.get(name)
            if s is not None and name in dirty:
                curve.setData(s.x(ax), s.y())
        if "val" in dirty and "loss" in d.val:
            s = d.val["loss"]
            self.val_curve.setData(s.x(ax), s.y())
        if "frames" in dirty and len(d.frames):
            col = {"step": 0, "tokens": 1, "flops": 2, "wall_time": 3}[ax]
            x = d.frames.column(col)
            self.sparse_curve.setData(x, d.frames.column(2))
            self.dense_curve.setData(x, d.frames.column(4))
        if any(n.startswith(LAYER_PREFIX) for n in dirty) and d.version != self._heat_version:
            self._draw_heatmap()
        self._update_summary()

    def _draw_heatmap(self) -> None:
        self._heat_version = self.data.version
        hm = self.data.heatmap()
        if hm is None:
            return
        img, layers, (s0, s1) = hm
        self.heat_empty.hide()
        self.heat_img.setImage(img, autoLevels=False, levels=(0.0, 1.0))
        width = max(s1 - s0, 1.0)
        self.heat_img.setRect(QRectF(s0, 0, width, len(layers)))
        ticks = [(i + 0.5, name) for i, name in enumerate(layers)]
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
        curve = {"loss": self.loss_raw, "loss_ema": self.loss_ema, "val_loss": self.val_curve, "lr": self.lr_curve,
                 "tokens_per_s": self.tps_curve, "sparsity": self.sparsity_curve, "flops": self.sparse_curve,
                 "flops_dense": self.dense_curve, "grad_norm": self.grad_curve}[name]
        x, y = curve.getOriginalDataset()
        return (np.asarray(x) if x is not None else np.empty(0)), (np.asarray(y) if y is not None else np.empty(0))
