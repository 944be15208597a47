"""When the loop evaluates and checkpoints: every ``train.eval_every`` / ``train.checkpoint_every``
steps, and once at the end, never twice for the same step."""
from __future__ import annotations

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
