"""One metrics call fanned out to sinks: JSON-lines events, the run database (the reporter's
``DatabaseSink``, engine.train.reporter), a terminal progress bar, and the experiment trackers of
``train.report_to`` (TensorBoard). A sink is any object with ``write(point, metrics)``; ``close()``
is optional. Another tracker is another sink."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Protocol

from engine.core.events import EventWriter


@dataclass
class Point:
    """Where a measurement was taken: every metric row carries these axes."""
    step: int
    tokens: int
    wall_time: float
    flops: float
    flops_dense: float


class Sink(Protocol):
    def write(self, point: Point, metrics: dict[str, float]) -> None: ...


class EventSink:
    def __init__(self, events: EventWriter, run_id: str):
        self.events, self.run_id = events, run_id

    def write(self, point: Point, metrics: dict[str, float]) -> None:
        self.events.emit("metrics", run_id=self.run_id, step=point.step, tokens=point.tokens,
                         wall_time=round(point.wall_time, 4), flops=point.flops, flops_dense=point.flops_dense,
                         metrics=metrics)


class TensorBoardSink:
    """Scalars in TensorBoard event files (``tensorboard --logdir RUN_DIR/tensorboard``): every metric at
    its step, plus the FLOPs counters, so TensorBoard's step axis and the run database agree."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=5)

    def write(self, point: Point, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=point.step)
        self.writer.add_scalar("counters/flops_spent", point.flops, global_step=point.step)
        self.writer.add_scalar("counters/tokens", point.tokens, global_step=point.step)

    def close(self) -> None:
        self.writer.close()


def check_reporters(names: list[str]) -> None:
    """Each tracker of ``train.report_to`` is installed (before a run row exists)."""
    import importlib.util

    from engine.core.errors import InputError

    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise InputError("train.report_to includes 'tensorboard' but the tensorboard package is not installed: "
                         "pip install 'mediswift-studio[tensorboard]'", key="train.report_to")


class ProgressBar:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total_steps: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total_steps
        self.enabled = self.stream.isatty()
        self._last = 0.0

    def write(self, point: Point, metrics: dict[str, float]) -> None:
        if not self.enabled or (time.monotonic() - self._last < 0.2 and point.step < self.total):
            return
        self._last = time.monotonic()
        frac = point.step / max(1, self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta = point.wall_time / frac - point.wall_time if frac > 0 else 0.0
        loss = metrics.get("loss")
        text = f"\r[{bar}] {point.step}/{self.total} loss {loss:.4f} " if loss is not None else f"\r[{bar}] {point.step}/{self.total} "
        text += f"{metrics.get('tokens_per_s', 0):,.0f} tok/s ETA {eta:,.0f}s "
        self.stream.write(text)
        if point.step >= self.total:
            self.stream.write("\n")
        self.stream.flush()


class MetricsLogger:
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, metrics: dict[str, float], point: Point) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        for sink in self.sinks:
            sink.write(point, clean)

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close:
                close()
