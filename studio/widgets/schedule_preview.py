"""Before launch: the sparsity a pre-training run plans, step by step, and its FLOPs per step.

Drawn from the same schedule the engine follows (engine.core.sparsity_schedule, plain arithmetic),
for the form's current method, distribution, model family and shape: the overall sparsity and each
layer group's (attention, MLP; they differ under ERK), the mask updates as ticks, and the training
FLOPs per step (the family's formula, engine.core.flops; GMP's denser early steps, RigL's
dense-gradient update steps).
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QGroupBox, QLabel, QVBoxLayout, QWidget

from engine.core.config import RunConfig
from engine.core.flops import flop_model_for_model
from engine.core.registry import PRETRAIN
from engine.core.sparsity_schedule import Schedule, layer_shapes, planned
from studio.widgets.chart_style import ChartTheme, ThemeFollower, compact_ticks, outside_legend, style_plot

MAX_POINTS = 2000  # a long run is drawn on a coarser grid; the plan itself is per step
GROUP_PENS = {"attention": "#3182bd", "mlp": "#e6550d"}


class SchedulePreview(QGroupBox):
    def __init__(self, parent: QWidget | None = None):
        super().__init__("Sparsity schedule (planned)", parent)
        self.setObjectName("schedule_preview")
        lay = QVBoxLayout(self)
        self.note = QLabel("", objectName="schedule:note")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #666;")
        self.glw = pg.GraphicsLayoutWidget()
        self.glw.setMinimumHeight(230)
        self.sparsity_plot = self.glw.addPlot(row=0, col=0)
        self.sparsity_plot.setLabel("left", "sparsity")
        outside_legend(self.sparsity_plot)  # under the plot (it becomes the plot's legend): never over a curve
        self.sparsity_plot.setYRange(0, 1, padding=0.02)
        self.total = self.sparsity_plot.plot(pen=pg.mkPen("#444", width=2), name="all")  # recoloured per theme
        self.groups = {g: self.sparsity_plot.plot(pen=pg.mkPen(c, width=1, style=pg.QtCore.Qt.PenStyle.DashLine),
                                                  name=g) for g, c in GROUP_PENS.items()}
        self.ticks = self.sparsity_plot.plot(pen=None, symbol="t1", symbolSize=6, symbolBrush="#31a354",
                                             symbolPen=None, name="mask update")
        self.flops_plot = self.glw.addPlot(row=1, col=0)
        self.flops_plot.setLabel("left", "FLOPs / step")
        self.flops_plot.setLabel("bottom", "step")
        self.flops_plot.setXLink(self.sparsity_plot)
        self.flops = self.flops_plot.plot(pen=pg.mkPen("#d62728", width=1))
        for plot in (self.sparsity_plot, self.flops_plot):
            for side in ("left", "bottom"):
                compact_ticks(plot.getAxis(side))  # '1.05G', not '1046898278.44'
        lay.addWidget(self.glw)
        lay.addWidget(self.note)
        self.plan: dict | None = None
        self.follower = ThemeFollower(self, self._apply_theme)

    def _apply_theme(self, theme: ChartTheme) -> None:
        self.glw.setBackground(theme.background)
        for plot in (self.sparsity_plot, self.flops_plot):
            style_plot(plot, theme)
        self.total.setPen(pg.mkPen(theme.text, width=2))
        self.note.setStyleSheet(f"color: {theme.muted.name()};")

    def show_config(self, cfg: RunConfig | None) -> None:
        """Draw the plan of ``cfg`` (a pre-training config); hidden for other stages."""
        if cfg is None or cfg.stage != PRETRAIN:
            self.setVisible(cfg is None and self.plan is not None)
            return
        self.setVisible(True)
        m, tc = cfg.model, cfg.train
        sched = Schedule.from_config(cfg)
        # the family's matrices and FLOP formula (grouped-query k/v, SwiGLU's three MLP matrices), as the
        # engine's estimate counts them
        fm = flop_model_for_model(m, cfg.tokenizer.vocab_size, 0.0)
        self.plan = planned(sched, layer_shapes(m), tc.max_steps, fm)
        tokens = tc.batch_size * tc.grad_accum * m.n_ctx * tc.nproc * tc.nnodes
        step = np.asarray(self.plan["step"], dtype=float)
        keep = np.unique(np.linspace(0, len(step) - 1, min(len(step), MAX_POINTS)).astype(int))
        self.total.setData(step[keep], np.asarray(self.plan["sparsity"])[keep])
        for g, curve in self.groups.items():
            curve.setData(step[keep], np.asarray(self.plan["groups"][g])[keep])
        upd = np.asarray(self.plan["updates"], dtype=float)
        self.ticks.setData(upd, np.asarray(self.plan["sparsity"])[upd.astype(int) - 1] if len(upd) else upd)
        fl = np.asarray(self.plan["flops_per_token"]) * tokens
        self.flops.setData(step, fl)  # every step: RigL's update steps are single-step spikes
        # from zero: a static run's flat line would otherwise get a hair-thin range and ten-digit tick labels
        self.flops_plot.setYRange(0, float(fl.max()) * 1.08 if len(fl) and fl.max() > 0 else 1, padding=0)
        total = float(fl.sum())
        self.note.setText(f"{sched.method}: {len(upd)} mask updates"
                          + (f" from step {int(upd[0])} to {int(upd[-1])}" if len(upd) else "")
                          + f"; {total:.3g} training FLOPs over {tc.max_steps} steps")

    def total_flops(self) -> float | None:
        return None if self.plan is None else float(np.sum(self.plan["flops_per_token"]))
