"""What the Compare charts draw, without widgets: each compared run's series read through the run store
once and kept (a thinned overview per run and metric, with its row count in the database, and the
run's task-score series), and the arithmetic that turns a series into a curve (x on the chosen axis,
raw and smoothed y, a zoomed range merged in at full detail)."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from engine.core.registry import LM
from studio.models.plot_buffers import ema
from studio.models.run_store import SERIES_DTYPE, RunStore

EVAL_PREFIX = "eval:"  # metric choices that come from the evaluations table (task scores)
EVAL_METRICS = ("val_loss", "val_perplexity")  # logged at evaluations only: markers, no smoothing
SPARSE_POINTS = 20  # any series this short is drawn the same way
# schedules the run follows, not noisy measurements: smoothing would only draw a lagged copy of them
SCHEDULES = ("lr", "sparsity")


def is_sparse(metric: str, data: np.ndarray) -> bool:
    """A series drawn as logged (markers, no smoothing): evaluations, task scores, very short series."""
    return metric in EVAL_METRICS or metric.startswith(EVAL_PREFIX) or data.size < SPARSE_POINTS


def drawn_as_logged(metric: str, data: np.ndarray) -> bool:
    """A series drawn unsmoothed, without a raw shadow: the sparse ones and the schedules (learning rate)."""
    return metric in SCHEDULES or is_sparse(metric, data)


def curve_arrays(data: np.ndarray, total: int, x_axis: str, smoothing: float,
                 sparse: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, raw y, smoothed y) of one series on the ``x_axis``; ``total`` is its row count in the database;
    ``sparse``: drawn as logged (smoothed y is y)."""
    x = data[x_axis].astype(np.float64)
    y = data["value"]
    if sparse:
        return x, y, y
    # a thinned series keeps every k-th row: w^k per kept point smooths like w per row
    k = max(1.0, (total - 1) / max(data.size - 1, 1))
    return x, y, ema(y, smoothing ** k if smoothing > 0 else 0.0)


def extent(arrays: Iterable[np.ndarray]) -> tuple[float, float] | None:
    """The finite (min, max) over the arrays; None when they hold no finite value."""
    lo, hi = math.inf, -math.inf
    for a in arrays:
        a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return (lo, hi) if lo <= hi else None


class CompareData:
    """Series of compared runs, read once through the run store and kept until ``forget``."""

    def __init__(self, store: RunStore):
        self.store = store
        self.overview: dict[tuple[str, str], np.ndarray] = {}  # thinned rows per (run, metric)
        self.totals: dict[tuple[str, str], int] = {}  # rows in the database per (run, metric)
        self.evals: dict[str, dict[str, np.ndarray]] = {}  # run -> task-score series

    def series(self, run_id: str, metric: str, points: int) -> np.ndarray:
        """The run's metric (or ``eval:`` task score), thinned to about ``points`` rows."""
        key = (run_id, metric)
        if key not in self.overview:
            if metric.startswith(EVAL_PREFIX):
                scores = self._evals(run_id, points)
                self.overview[key] = scores.get(metric[len(EVAL_PREFIX):], np.zeros(0, SERIES_DTYPE))
            else:
                self.overview[key], self.totals[key] = self.store.series(run_id, metric, points)
        return self.overview[key]

    def total(self, run_id: str, metric: str, default: int = 0) -> int:
        return self.totals.get((run_id, metric), default)

    def cached(self, run_id: str, metric: str) -> np.ndarray | None:
        return self.overview.get((run_id, metric))

    def eval_keys(self, run_id: str, points: int) -> list[str]:
        return list(self._evals(run_id, points))

    def _evals(self, run_id: str, points: int) -> dict[str, np.ndarray]:
        if run_id not in self.evals:
            # language-model validation has its own chart; only task evaluations need parsing here, and
            # their x positions come from the (cached) training-loss rows
            has_tasks = self.store.has_task_evaluations(run_id)
            self.evals[run_id] = (self.store.eval_series(run_id, self.series(run_id, "loss", points))
                                  if has_tasks else {})
        return self.evals[run_id]

    def choices(self, run_ids: list[str], fixed: set[str], points: int) -> list[str]:
        """What a free chart may show: the runs' task scores (``eval:...``), then their other metrics."""
        names = [n for n in self.store.metric_names(run_ids) if n not in fixed and not n.startswith("sparsity/")]
        evals = sorted({k for rid in run_ids for k in self.eval_keys(rid, points) if not k.startswith(LM + "/")})
        return [EVAL_PREFIX + k for k in evals] + names

    def forget(self, run_ids: Iterable[str] | None = None) -> None:
        """Drop what was read (of these runs, or all): it is read again when next drawn."""
        ids = None if run_ids is None else set(run_ids)
        for key in [k for k in self.overview if ids is None or k[0] in ids]:
            del self.overview[key]
            self.totals.pop(key, None)
        for rid in [r for r in self.evals if ids is None or r in ids]:
            del self.evals[rid]

    def zoomed(self, run_id: str, metric: str, x_axis: str, x0: float, x1: float,
               points: int) -> tuple[np.ndarray, int, bool] | None:
        """(rows, row density, detailed): the overview with the visible range [x0, x1] re-read at full
        detail and the density that smooths it like the rest, or, when that range is most of the run, the
        overview itself (detailed False); None when the overview is not thinned (all of it is drawn)."""
        over = self.overview.get((run_id, metric))
        total = self.totals.get((run_id, metric), 0)
        if over is None or total <= over.size:
            return None  # not thinned: everything is drawn already
        x = over[x_axis]
        i0 = max(int(np.searchsorted(x, x0, side="left")) - 1, 0)
        i1 = min(int(np.searchsorted(x, x1, side="right")), over.size - 1)
        if (i1 - i0) > 0.8 * over.size:  # zoomed out: the overview
            return over, total, False
        lo, hi = int(over["step"][i0]), int(over["step"][i1])
        detail, n = self.store.series(run_id, metric, points, steps=(lo, hi))
        merged = np.concatenate([over[:i0], detail, over[i1 + 1:]])
        k_total = int(round(n * over.size / max(i1 - i0 + 1, 1)))  # density of the visible part, for smoothing
        return merged, max(k_total, merged.size), True
