"""What every training stage's loop shares: the wall clock without pauses, the axes of a metrics
point, bf16 autocast on CUDA, and waiting out a pause between steps."""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from .metrics_log import Point


class StageLoop:
    # set by the stage: session, control, device, counters, and _t_start/_paused when the loop begins
    s: object
    control: object
    device: torch.device
    step: int
    tokens: int
    flops: float
    flops_dense: float
    wall_offset: float

    def wall(self) -> float:
        return self.wall_offset + (time.monotonic() - self._t_start) - self._paused

    def point(self) -> Point:
        return Point(self.step, self.tokens, self.wall(), self.flops, self.flops_dense)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _pause_wait(self) -> None:
        t = time.monotonic()
        self.s.status("paused")
        self.s.info(f"paused at step {self.step}")
        while self.control.pause_requested.is_set() and not self.control.stop_requested.is_set():
            self.control.wake.wait(0.5)
            self.control.wake.clear()
        self._paused += time.monotonic() - t
        self.s.status("running")
        self.s.info("resumed" if not self.control.stop_requested.is_set() else "stopping")
