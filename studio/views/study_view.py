"""The Study view of a sweep: what its grid found, as the MediSwift paper draws it.

* **Validation loss against training FLOPs**, one colour per sparsity level: each run's validation curve
  (thin) and its final or best value (a marker, joined across the runs of one level), so runs of equal
  FLOPs line up in one column and a larger sparse model is seen against a smaller dense one.
* **Downstream scores** of the runs chained after each point (``sweep --then``): their dev score as a
  bar, the majority baseline (a dash), the TF-IDF + logistic regression baseline (a diamond) and the
  zero-shot parent (a cross) beside it; a baseline the run has not stored (older runs) is not drawn.
* **A table** of every point and chained run; CSV export of it, PNG/SVG export of both charts.

Everything comes from the run store (the sweep's study); it refreshes, at most every few seconds, while
the sweep's runs progress. Legends sit under the charts; each bar's tick label is three short lines (grid
point, stage, task) cut to the bar's width, so neighbours never print over each other; colours and text
sizes follow the palette and the application font.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import (
    QComboBox, QFileDialog, QHBoxLayout, QLabel, QPushButton, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout,
    QWidget,
)

from studio.models.labels import MAJORITY, PALETTE, TFIDF, ZERO_SHOT, stage_tick
from studio.models.run_store import RunStore, study_csv
from studio.models.throttle import Throttle
from studio.widgets.chart_export import ChartExportDialog
from studio.widgets.chart_placeholder import ChartPlaceholder
from studio.widgets.chart_style import (
    TICK, ChartTheme, ThemeFollower, compact_ticks, outside_legend, set_title, style_plot,
)

TABLE_COLUMNS = ("Entry", "Run", "Point", "Status", "Sparsity", "d_model", "Steps", "FLOPs", "Final val loss",
                 "Best val loss", "Chained run", "Task", "Score", "Majority", "TF-IDF", "Zero-shot")
# the baselines beside each chained run's bar: kind -> (legend name, symbol, size, pen colour, brush)
BASELINE_MARKERS = {MAJORITY: ("majority baseline", "_", 28, "#000000", None),
                    TFIDF: ("TF-IDF + LR baseline", "d", 11, "#8C564B", "#8C564B"),
                    ZERO_SHOT: ("zero-shot parent", "x", 12, "#555", "#555")}
REFRESH_MS = 3000  # while the sweep's runs progress, the study is read again at most this often
LOSS_TITLE, SCORE_TITLE = "Validation loss against training FLOPs", "Downstream dev scores of the chained runs"
NO_SCORES = "no downstream scores yet: chain runs after the grid (sweep … --then CONFIG)"


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def _baseline(child: dict, kind: str) -> float | None:
    """A chained run's baseline of one kind on its headline metric; None where not stored (or skipped)."""
    v = (child["baselines"].get(kind) or {}).get(child["metric"]) if child["metric"] else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class StudyView(QWidget):
    run_activated = Signal(str)
    compare_requested = Signal(list)  # the sweep's grid runs, for the Compare tab

    def __init__(self, store: RunStore, sweep_id: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.store = store
        self.sweep_id = sweep_id
        self.study: dict = {}
        self._build()
        self.progress = Throttle(self._auto_refresh, REFRESH_MS, self)
        store.runs_progressed.connect(self.progress.request)
        store.queue_changed.connect(self.progress.request)
        self.refresh()

    def _build(self) -> None:
        self.title = QLabel(objectName="study_title")
        self.title.setWordWrap(True)
        self.which = QComboBox(objectName="loss_kind")
        self.which.addItem("final validation loss", "final_val_loss")
        self.which.addItem("best validation loss", "best_val_loss")
        self.which.currentIndexChanged.connect(self._draw)
        export = QPushButton("Export chart…", objectName="export_chart")
        export.clicked.connect(self.export_chart_dialog)
        export_csv = QPushButton("Export CSV…", objectName="export_csv")
        export_csv.clicked.connect(self._export_csv_dialog)
        compare = QPushButton("Compare runs", objectName="compare_runs")
        compare.setToolTip("The grid's runs in the Compare tab: every curve on a shared FLOPs axis, config diff")
        compare.clicked.connect(lambda: self.compare_requested.emit(self.run_ids()))
        bar = QHBoxLayout()
        bar.addWidget(self.title, 1)
        bar.addWidget(self.which)
        bar.addWidget(compare)
        bar.addWidget(export)
        bar.addWidget(export_csv)

        theme = ChartTheme.of()
        self.loss_plot = pg.PlotWidget()
        set_title(self.loss_plot.getPlotItem(), LOSS_TITLE, theme)
        self.loss_plot.setLabel("bottom", "training FLOPs", units="FLOP")
        self.loss_plot.setLabel("left", "validation loss")
        self.loss_plot.showGrid(x=True, y=True, alpha=0.2)
        for side in ("left", "bottom"):
            compact_ticks(self.loss_plot.getAxis(side))
        self.loss_legend = outside_legend(self.loss_plot.getPlotItem(), theme)
        self.score_plot = pg.PlotWidget()
        set_title(self.score_plot.getPlotItem(), SCORE_TITLE, theme)
        self.score_plot.setLabel("left", "dev score")
        self.score_plot.showGrid(y=True, alpha=0.2)
        self.score_plot.getAxis("left").enableAutoSIPrefix(False)  # scores in [0, 1], not "x0.001"
        self.score_legend = outside_legend(self.score_plot.getPlotItem(), theme)
        self.score_bars: list = []
        # the tick labels are cut to each bar's width: again when the chart is resized
        self.score_plot.getPlotItem().getViewBox().sigResized.connect(lambda *_a: self._score_ticks())

        self.table = QTableWidget(objectName="study_table")
        self.table.setColumnCount(len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(TABLE_COLUMNS))
        self.table.horizontalHeaderItem(TABLE_COLUMNS.index("TF-IDF")).setToolTip(
            "TF-IDF over word 1-2-grams + logistic regression, fitted on the task's training split and scored on "
            "the same examples (– where the run has none stored)")
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.cellDoubleClicked.connect(self._open_row)

        self.loss_holder = ChartPlaceholder(self.loss_plot, "no validation loss logged by the sweep's runs yet")
        self.score_holder = ChartPlaceholder(self.score_plot, NO_SCORES)
        charts = QSplitter(Qt.Orientation.Horizontal)
        charts.addWidget(self.loss_holder)
        charts.addWidget(self.score_holder)
        charts.setStretchFactor(0, 3)
        charts.setStretchFactor(1, 2)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(charts)
        split.addWidget(self.table)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(split, 1)
        self.follower = ThemeFollower(self, self._apply_theme)

    def _apply_theme(self, theme: ChartTheme) -> None:
        for w in (self.loss_plot, self.score_plot):
            w.setBackground(theme.background)
            style_plot(w.getPlotItem(), theme)
        if self.study:
            self._draw()

    # -- data -------------------------------------------------------------------------------------
    def refresh(self) -> None:
        self.progress.last = time.monotonic()
        self.study = self.store.sweep_study(self.sweep_id)
        sw, spec = self.study["sweep"], self.study["spec"]
        grid = ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in spec.get("grid", {}).items())
        done = sum(1 for p in self.study["points"] if p["status"] == "completed")
        budget = f" · {spec['equal_flops']:.3g} training FLOPs each" if spec.get("equal_flops") else ""
        self.title.setText(f"<b>{sw['name']}</b> ({sw['id']}) · {grid}{budget} · {done}/{len(self.study['points'])} "
                           "runs completed")
        self._draw()
        self._fill_table()

    def _auto_refresh(self) -> None:
        if self.isVisible() and any(p["status"] in ("waiting", "running") or
                                    any(c["status"] in ("waiting", "running") for c in p["children"])
                                    for p in self.study.get("points", [])):
            self.refresh()

    def run_ids(self) -> list[str]:
        return [p["run_id"] for p in self.study.get("points", []) if p["run_id"]]

    def levels(self) -> list[float]:
        return sorted({p["sparsity"] for p in self.study["points"] if p["sparsity"] is not None})

    def _draw(self) -> None:
        if not self.study:
            return
        key = self.which.currentData()
        self.loss_plot.clear()
        self.loss_legend.clear()
        self.marker_series: dict[float, tuple[np.ndarray, np.ndarray]] = {}
        theme = self.follower.theme
        for i, level in enumerate(self.levels()):
            color = theme.readable(PALETTE[i % len(PALETTE)])
            pts = [p for p in self.study["points"] if p["sparsity"] == level]
            for p in pts:
                c = p["curve"]
                if len(c["flops"]) > 1:
                    self.loss_plot.plot(c["flops"], c["val_loss"], pen=pg.mkPen(theme.faint(color), width=1))
            ends = sorted((p["flops"], p[key]) for p in pts if p["flops"] and p[key] is not None)
            if ends:
                x, y = np.array([e[0] for e in ends]), np.array([e[1] for e in ends])
                self.marker_series[level] = (x, y)
                self.loss_plot.plot(x, y, pen=pg.mkPen(color, width=2), symbol="o", symbolSize=9,
                                    symbolBrush=color, symbolPen=theme.background, name=f"sparsity {level:.0%}")
        self.loss_holder.show_text(None if self.loss_plot.getPlotItem().listDataItems() else
                                   "no validation loss logged by the sweep's runs yet")
        self._draw_scores()

    def _draw_scores(self) -> None:
        self.score_plot.clear()
        self.score_legend.clear()
        rows = [(p, c) for p in self.study["points"] for c in p["children"] if c["metric"]]
        self.score_bars = rows
        self.baseline_markers: dict[str, pg.PlotDataItem] = {}  # kind -> its markers (only kinds some run has)
        self.score_holder.show_text(None if rows else NO_SCORES)
        if not rows:
            return
        # the metrics go on the axis label, not the title: a long title was cut at the chart's width
        metrics = ", ".join(sorted({f"{c['task']} {c['metric']}" for _, c in rows}))
        self.score_plot.setLabel("left", f"dev score ({metrics})" if len(metrics) <= 40 else "dev score")
        keys = list(self.study["spec"].get("grid", {}))
        self.score_plot.setLabel("bottom", " · ".join(k.split(".")[-1] for k in keys) + " → stage" if keys else "")
        self.score_plot.getAxis("left").setToolTip(f"dev scores: {metrics}")
        theme = self.follower.theme
        x = np.arange(len(rows), dtype=float)
        colors = {lv: theme.readable(PALETTE[i % len(PALETTE)]) for i, lv in enumerate(self.levels())}
        scores = [c["metrics"].get(c["metric"]) or 0.0 for _, c in rows]
        brushes = [pg.mkBrush(colors.get(p["sparsity"], "#888")) for p, _ in rows]
        self.score_plot.addItem(pg.BarGraphItem(x=x, height=scores, width=0.6, brushes=brushes))
        for kind, (name, symbol, size, pen, brush) in BASELINE_MARKERS.items():
            values = [_baseline(c, kind) for _, c in rows]
            at = [i for i, v in enumerate(values) if v is not None]
            if at:
                self.baseline_markers[kind] = self.score_plot.plot(
                    [x[i] for i in at], [values[i] for i in at], pen=None, symbol=symbol, symbolSize=size,
                    symbolPen=pg.mkPen(theme.readable(pen), width=2 if kind == MAJORITY else 1), name=name,
                    **({"symbolBrush": theme.readable(brush)} if brush else {}))
        self.score_plot.setRange(xRange=(-0.5, len(rows) - 0.5), padding=0.02)
        self.score_plot.enableAutoRange(y=True)
        self._score_ticks()

    def score_tick_lines(self) -> list[tuple[str, ...]]:
        """Per bar, its label's lines, whole (the axis cuts them to fit): the grid point's values (their keys
        are the axis label), the stage, and the task where the bars are not all of one task."""
        several_tasks = len({c["task"] for _p, c in self.score_bars}) > 1
        out = []
        for p, c in self.score_bars:
            values = p.get("values") or {}
            point = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values.values()) or p["label"]
            out.append((point, stage_tick(c["stage"]), *([c["task"] or ""] if several_tasks else [])))
        return out

    def _score_ticks(self) -> None:
        """Tick labels of the bars, each line cut to the bar's share of the width (with room between
        neighbours): labels such as "ft pubmedqa" and "prompt pubmedqa" never run into each other."""
        if not self.score_bars:
            return
        axis = self.score_plot.getAxis("bottom")
        vb = self.score_plot.getPlotItem().getViewBox()
        (x0, x1), _ = vb.viewRange()
        slot = vb.width() / max(x1 - x0, 1e-9) - 8  # pixels per bar (one x unit), less a gap
        fm = QFontMetrics(self.follower.theme.font(TICK))
        lines = self.score_tick_lines()
        ticks = [(float(i), "\n".join(fm.elidedText(line, Qt.TextElideMode.ElideRight, max(int(slot), 12))
                                      for line in bar))
                 for i, bar in enumerate(lines)]
        self.score_ticks = ticks
        axis.setTicks([ticks])
        axis.setHeight(max(len(bar) for bar in lines) * fm.lineSpacing() + 12)  # (pyqtgraph makes room for one)

    def _fill_table(self) -> None:
        rows = []
        for p in self.study["points"]:
            base = [p["entry"], p["run_id"], p["label"], p["status"], _fmt(p["sparsity"], ".2f"), p["d_model"],
                    p["steps"], _fmt(p["flops"], ".4g"), _fmt(p["final_val_loss"]), _fmt(p["best_val_loss"])]
            for c in p["children"] or [None]:
                if c is None:
                    rows.append(base + ["", "", "", "", "", ""])
                    continue
                m = c["metric"]
                rows.append(base + [c["run_id"] or c["status"], c["task"] or "", _fmt(c["metrics"].get(m)) if m else "",
                                    *(_fmt(_baseline(c, kind)) if m else "" for kind in (MAJORITY, TFIDF, ZERO_SHOT))])
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for col, v in enumerate(row):
                self.table.setItem(r, col, QTableWidgetItem("" if v is None else str(v)))
        self.table.resizeColumnsToContents()

    def _open_row(self, row: int, col: int) -> None:
        item = self.table.item(row, 10 if col >= 10 else 1)
        if item and item.text() and len(item.text()) == 8:
            self.run_activated.emit(item.text())

    # -- exports ----------------------------------------------------------------------------------
    def plots(self) -> dict[str, pg.PlotItem]:
        return {"Validation loss against training FLOPs": self.loss_plot.getPlotItem(),
                "Downstream scores": self.score_plot.getPlotItem()}

    def export_chart_dialog(self) -> None:
        ChartExportDialog(self.plots(), None, self).exec()

    def export_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(study_csv(self.study), encoding="utf-8")
        return path

    def _export_csv_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the study", f"{self.study['sweep']['name']}.csv",
                                              "CSV (*.csv)")
        if path:
            self.export_csv(path if path.endswith(".csv") else path + ".csv")
