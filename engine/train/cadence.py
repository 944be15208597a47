"""When the loop evaluates and checkpoints: every ``train.eval_every`` / ``train.checkpoint_every``
steps, and once at the end, never twice for the same step. ``BestKeeper``: which evaluation was the
best so far, and when early stopping ends the run."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Cadence:
    eval_every: int
    checkpoint_every: int
    max_steps: int
    last_eval_step: int = -1

    def eval_due(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.max_steps

    def final_eval_due(self, step: int) -> bool:
        """After the loop: a stopped run gets a last evaluation unless its last step had one."""
        return step > 0 and step != self.last_eval_step

    def checkpoint_due(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 and step < self.max_steps  # the final one is saved after the loop


@dataclass
class BestKeeper:
    """The best development evaluation of a fine-tuning or prompting run (``enabled`` with
    train.epochs or train.early_stopping_patience): the loop checkpoints its step, retention keeps that
    checkpoint, and eval and export use it. ``patience`` evaluations in a row without a better headline
    metric end the run (0: never). A tie is no improvement: the earlier evaluation stays the best."""
    enabled: bool = False
    patience: int = 0
    metric: str | None = None
    best: float | None = None
    best_step: int | None = None
    best_path: str | None = None  # the checkpoint written at best_step
    since_best: int = 0

    def observe(self, step: int, score: tuple[str, float, bool] | None) -> bool:
        """The evaluation at ``step`` scored ``score`` (metric, value, lower is better); True when it
        is the best so far."""
        if not self.enabled or score is None:
            return False
        metric, value, lower = score
        better = math.isfinite(value) and (self.best is None or (value < self.best if lower else value > self.best))
        if better:
            self.metric, self.best, self.best_step, self.since_best = metric, value, step, 0
        else:
            self.since_best += 1
        return better

    def should_stop(self) -> bool:
        return self.enabled and self.patience > 0 and self.since_best >= self.patience

    def record(self) -> dict:
        """What the run's meta says of its best evaluation (``best_checkpoint``)."""
        return {"step": self.best_step, "metric": self.metric, "value": self.best}

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "best_path": self.best_path,
                "since_best": self.since_best}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.metric, self.best = state.get("metric"), state.get("best")
            self.best_step, self.since_best = state.get("best_step"), int(state.get("since_best") or 0)
            self.best_path = state.get("best_path")
