"""The axes every metric row carries (step, tokens, FLOPs spent and dense-equivalent, wall time),
and a wall clock that leaves out pauses and carries over a resume."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.train.metrics import Point

STATE_KEYS = ("step", "tokens", "flops", "flops_dense")


@dataclass
class Counters:
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    flops_dense: float = 0.0
    wall_offset: float = 0.0   # wall time of the run before this process (resume)
    _started: float = field(default_factory=time.monotonic)
    _paused: float = 0.0

    def add_step(self, tokens: int, flops: float, flops_dense: float) -> None:
        self.step += 1
        self.tokens += tokens
        self.flops += flops
        self.flops_dense += flops_dense

    def start_clock(self) -> None:
        self._started, self._paused = time.monotonic(), 0.0

    def add_pause(self, seconds: float) -> None:
        self._paused += seconds

    def wall(self) -> float:
        return self.wall_offset + (time.monotonic() - self._started) - self._paused

    def point(self) -> Point:
        return Point(self.step, self.tokens, self.wall(), self.flops, self.flops_dense)

    def state(self) -> dict:
        return {**{k: getattr(self, k) for k in STATE_KEYS}, "wall_time": self.wall()}

    def load_state(self, ck: dict) -> None:
        for k in STATE_KEYS:
            setattr(self, k, ck[k])
        self.wall_offset = ck["wall_time"]
