"""Everything the charts of one run show, fed by live events or by rows read back from the database.

Both feeds go through the same ``add_metrics``/``add_eval`` calls, and points are keyed by step, so a
run seen first live and then re-read from the database (or the other way round) holds each step once.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from studio.models.run_store import FINAL_STATUSES
from studio.models.labels import MAJORITY
from studio.models.plot_buffers import GrowingArray, Series

LAYER_PREFIX = "sparsity/"
VAL_PREFIXES = ("val_", "val/")  # the engine also logs validation results as metrics (val_loss, val_perplexity)


class RunData:
    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        # one row per metrics event: step, tokens, flops, wall_time, flops_dense
        self.frames = GrowingArray(5)
        self.val: dict[str, Series] = {}  # eval metrics of split "val" (loss, perplexity, ...)
        self.dirty: set[str] = set()
        self.version = 0  # bumps on any change, so views know when to redraw
        self.max_steps: int | None = None
        self.eval_ids: set[Any] = set()
        # whether the run is still training, as its view knows it (None: not told; see ``training``)
        self.live: bool | None = None
        self.config: dict = {}  # the run's stored config, where its view has it (sparsity.method)

    # -- feeding -------------------------------------------------------------------------------------
    def add_metrics(self, step: int, tokens: float, wall_time: float, flops: float, flops_dense: float,
                    values: dict[str, Any]) -> bool:
        """One training step's metrics; False (ignored) if this step is already held."""
        if len(self.frames) and step <= self.frames.last(0):
            return self._add_late(step, tokens, wall_time, flops, values)
        self.frames.append((step, tokens or 0, flops or 0, wall_time or 0, flops_dense or 0))
        self._add_values(step, tokens, wall_time, flops, values)
        self.dirty.add("frames")
        self.version += 1
        return True

    def _add_late(self, step, tokens, wall_time, flops, values) -> bool:
        # a metric logged for a step we already have (the database writes a step's rows together; a
        # poll can straddle them): add only names not yet seen at this step
        added = False
        for name, v in values.items():
            if name.startswith(VAL_PREFIXES):
                added |= self.add_eval(step, {name[4:]: v}, tokens=tokens, wall_time=wall_time, flops=flops)
                continue
            s = self.series.get(name)
            if s is None or step > s.last_step:
                self._add_values(step, tokens, wall_time, flops, {name: v})
                added = True
        if added:
            self.version += 1
        return added

    def _add_values(self, step, tokens, wall_time, flops, values: dict[str, Any]) -> None:
        for name, v in values.items():
            if name.startswith(VAL_PREFIXES):
                self.add_eval(step, {name[4:]: v}, tokens=tokens, wall_time=wall_time, flops=flops)
                continue
            if v is None or isinstance(v, (dict, list, str)):
                continue
            s = self.series.get(name)
            if s is None:
                s = self.series[name] = Series()
            s.append((step, tokens or 0, flops or 0, wall_time or 0, float(v)))
            self.dirty.add(name)

    def add_eval(self, step: int, metrics: dict[str, Any], tokens: float | None = None,
                 wall_time: float | None = None, flops: float | None = None) -> bool:
        # an eval event carries only the step: borrow the x values of the nearest training frame
        if tokens is None:
            tokens, flops, wall_time = self.frame_at(step)
        added = False
        for name, v in metrics.items():
            if v is None or not isinstance(v, (int, float)):
                continue
            s = self.val.setdefault(name, Series(64))
            if step <= s.last_step:
                continue
            s.append((step, tokens, flops, wall_time, float(v)))
            added = True
        if added:
            self.dirty.add("val")
            self.version += 1
        return added

    def frame_at(self, step: int) -> tuple[float, float, float]:
        n = len(self.frames)
        if not n:
            return 0.0, 0.0, 0.0
        steps = self.frames.column(0)
        i = min(int(np.searchsorted(steps, step, side="left")), n - 1)
        return self.frames.column(1)[i], self.frames.column(2)[i], self.frames.column(3)[i]

    def add_event(self, ev: dict) -> bool:
        t = ev.get("type")
        if t == "metrics":
            return self.add_metrics(ev["step"], ev["tokens"], ev["wall_time"], ev["flops"], ev["flops_dense"],
                                    ev["metrics"])
        if t == "eval" and ev.get("split", "val") == "val":
            return self.add_eval(ev["step"], ev["metrics"])
        if t == "run_started":
            self.live = True
            if ev.get("max_steps"):
                self.max_steps = int(ev["max_steps"])
            self.config = ev.get("config") or self.config
        elif t in ("status", "run_finished") and ev.get("status"):
            self.live = ev["status"] not in FINAL_STATUSES
        return False

    def add_db_rows(self, rows: Iterable[dict]) -> int:
        """Rows of ``RunDB.metrics`` (long format, ordered by step) -> one add per step. Returns steps added."""
        added = 0
        step, head, values = None, None, {}
        for r in rows:
            if r["step"] != step:
                if step is not None:
                    added += self.add_metrics(step, *head, values)
                step, head, values = r["step"], (r["tokens"], r["wall_time"], r["flops"], r["flops_dense"]), {}
            values[r["name"]] = r["value"]
        if step is not None:
            added += self.add_metrics(step, *head, values)
        return added

    def add_db_evaluations(self, evals: Iterable[dict]) -> None:
        for e in evals:
            if e["id"] in self.eval_ids:
                continue
            self.eval_ids.add(e["id"])
            if e.get("split") in ("val", "validation", None, ""):
                self.add_eval(e["step"], e["metrics"])

    def truncate_after(self, step: int) -> None:
        """A run resumed from a checkpoint replays the steps after it: drop what we held past it."""
        for s in [*self.series.values(), *self.val.values(), self.frames]:
            s.truncate_after(step)
        self.dirty.update(self.series, {"val", "frames"})
        self.version += 1

    def clear(self) -> None:
        self.__init__()

    # -- reading ---------------------------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        return int(self.frames.last(0)) if len(self.frames) else None

    def latest(self, name: str) -> float | None:
        s = self.series.get(name)
        return float(s.y()[-1]) if s is not None and len(s) else None

    def latest_val(self, name: str = "loss") -> float | None:
        s = self.val.get(name)
        return float(s.y()[-1]) if s is not None and len(s) else None

    def training(self) -> bool:
        """Whether more steps may come: as the view told (``live``), else until the last step reaches
        ``max_steps`` (a run of unknown length may always grow). Charts of a finished run fit its data."""
        if self.live is not None:
            return self.live
        if self.max_steps and self.last_step is not None:
            return self.last_step < self.max_steps
        return True

    def static_masks(self) -> bool:
        """Whether the per-layer sparsity cannot change (``sparsity.method = "static"``): its heatmap
        would be one flat colour. Without the config: no mask churn logged and every layer's sparsity
        constant so far."""
        method = (self.config.get("sparsity") or {}).get("method")
        if method is not None:
            return method == "static"
        if "mask_churn" in self.series:
            return False
        for name in self.series:
            if name.startswith(LAYER_PREFIX):
                y = self.series[name].y()
                if len(y) and np.nanmax(y) != np.nanmin(y):
                    return False
        return True

    def layer_names(self) -> list[str]:
        return sorted(n[len(LAYER_PREFIX):] for n in self.series if n.startswith(LAYER_PREFIX))

    def flops_totals(self) -> tuple[float, float]:
        """Cumulative (sparse spent, dense-equivalent) FLOPs at the last step."""
        if not len(self.frames):
            return 0.0, 0.0
        return self.frames.last(2), self.frames.last(4)

    def seconds_per_step(self, window: int = 50) -> float | None:
        n = len(self.frames)
        if n < 2:
            return None
        k = max(0, n - 1 - window)
        steps, walls = self.frames.column(0), self.frames.column(3)
        ds = steps[-1] - steps[k]
        return float((walls[-1] - walls[k]) / ds) if ds > 0 else None

    def eta_seconds(self) -> float | None:
        sps, last = self.seconds_per_step(), self.last_step
        if sps is None or last is None or not self.max_steps:
            return None
        return max(0.0, (self.max_steps - last) * sps)

    def heatmap(self, max_cols: int = 400) -> tuple[np.ndarray, list[str], tuple[float, float]] | None:
        """Per-layer sparsity as an image (steps × layers), averaged into at most ``max_cols`` columns."""
        layers = self.layer_names()
        if not layers:
            return None
        ref = self.series[LAYER_PREFIX + layers[0]]
        steps = ref.x("step")
        n = len(steps)
        if n == 0:
            return None
        img = np.full((n, len(layers)), math.nan)
        for j, name in enumerate(layers):
            s = self.series[LAYER_PREFIX + name]
            m = min(len(s), n)
            img[:m, j] = s.y()[:m]
        if n > max_cols:  # equal bins; layer sparsity moves slowly, a bin mean is what the eye wants
            edges = np.linspace(0, n, max_cols + 1).astype(int)
            img = np.stack([np.nanmean(img[a:b], axis=0) for a, b in zip(edges[:-1], edges[1:])])
        return img, layers, (float(steps[0]), float(steps[-1]))


# -- what a finished fine-tuning or prompting run adds to its charts (read from its row and artifacts) --


def baseline_scores(run: dict, kind: str = MAJORITY) -> dict[str, float]:
    """A baseline's development scores (``{"dev_accuracy": 0.55, ...}``) from the run's meta: ``majority``
    (the default) or ``tfidf_lr`` (TF-IDF + logistic regression); empty where the run has none stored
    (runs from before that baseline, or one that was skipped)."""
    scores = ((run.get("meta") or {}).get("baselines") or {}).get(kind) or {}
    return {f"dev_{k}": float(v) for k, v in scores.items()
            if k in ("accuracy", "macro_f1", "micro_f1") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def prompt_tokens(run: dict, artifacts: list[dict]) -> list[list[tuple[str, float | None]]]:
    """Per prompt vector, its nearest vocabulary tokens (token, cosine) from the run's prompt artifacts,
    else the token strings kept in the run's meta."""
    for art in reversed(artifacts):
        rows = (art.get("meta") or {}).get("nearest_tokens")
        if rows:
            return [[(t.get("token", ""), t.get("cos")) if isinstance(t, dict) else (str(t), None) for t in row]
                    for row in rows]
    rows = (run.get("meta") or {}).get("prompt_nearest_tokens") or []
    return [[(str(t), None) for t in row] for row in rows]
