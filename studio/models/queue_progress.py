"""Where a queue entry's run stands: its step out of how many, the share done and the time left, from the
run's row and the counters of its last metric row. No widgets."""
from __future__ import annotations

from dataclasses import dataclass

from studio.models import formatting as fmt


@dataclass(frozen=True)
class EntryProgress:
    step: int | None = None
    total: int | None = None
    fraction: float | None = None
    eta_s: float | None = None

    @property
    def step_text(self) -> str:
        if self.step is None:
            return ""
        return f"{self.step:,}" + (f" / {self.total:,}" if self.total else "")

    @property
    def percent_text(self) -> str:
        return "" if self.fraction is None else f"{100 * self.fraction:.0f} %"

    @property
    def eta_text(self) -> str:
        return "" if self.eta_s is None else fmt.duration(self.eta_s)


def planned_steps(run: dict) -> int | None:
    """The run's length in steps: what a by-epochs run worked out when it started, else train.max_steps."""
    epochs = (run.get("meta") or {}).get("epochs") or {}
    steps = epochs.get("max_steps") or ((run.get("config") or {}).get("train") or {}).get("max_steps")
    return int(steps) if steps else None


def entry_progress(run: dict | None, last: dict | None) -> EntryProgress:
    """``run``: the entry's run row (None before it has one); ``last``: its last metric row's step and
    training seconds (``RunStore.last_points``). The time left is the remaining steps at the run's mean
    pace so far, while it runs."""
    if run is None:
        return EntryProgress()
    summary = run.get("summary") or {}
    step = int(last["step"]) if last and last.get("step") is not None else summary.get("step")
    total = planned_steps(run)
    if step is None:
        return EntryProgress(total=total, fraction=0.0 if run["status"] == "running" and total else None)
    if run["status"] == "completed":
        return EntryProgress(step, total, 1.0)
    fraction = min(1.0, step / total) if total else None
    eta = None
    wall = (last or {}).get("wall_time")
    if run["status"] == "running" and total and step > 0 and wall:
        eta = max(0, total - step) * float(wall) / step
    return EntryProgress(step, total, fraction, eta)
