"""Live event schema: one JSON object per line on the engine's stdout.

Ground floor (no torch, no Qt): the engine emits these and the studio parses them with the same
table, so both sides agree on what each event carries. Documented in docs/events.md.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any

SCHEMA_VERSION = 1

# type -> required fields (besides "type", "v" and "time", which every event carries)
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "run_started": ("run_id", "name", "stage", "config", "run_dir", "pid", "max_steps"),
    "progress": ("run_id", "phase", "done", "total"),
    "metrics": ("run_id", "step", "tokens", "wall_time", "flops", "flops_dense", "metrics"),
    "eval": ("run_id", "step", "split", "metrics"),
    "checkpoint": ("run_id", "step", "path"),
    "status": ("run_id", "status"),
    "log": ("message",),
    "warning": ("message",),
    "run_finished": ("run_id", "status", "step", "summary"),
    "error": ("message",),
}

STATUSES = ("created", "running", "paused", "completed", "stopped", "failed", "crashed")


class EventError(ValueError):
    pass


def make_event(type_: str, **fields: Any) -> dict:
    if type_ not in EVENT_FIELDS:
        raise EventError(f"unknown event type {type_!r}")
    missing = [f for f in EVENT_FIELDS[type_] if f not in fields]
    if missing:
        raise EventError(f"event {type_!r} lacks {', '.join(missing)}")
    return {"type": type_, "v": SCHEMA_VERSION, "time": time.time(), **fields}


def validate_event(obj: Any) -> dict:
    """Check a parsed event against the schema; returns it or raises EventError naming the problem."""
    if not isinstance(obj, dict):
        raise EventError("event is not a JSON object")
    t = obj.get("type")
    if t not in EVENT_FIELDS:
        raise EventError(f"unknown event type {t!r}")
    missing = [f for f in ("v", "time", *EVENT_FIELDS[t]) if f not in obj]
    if missing:
        raise EventError(f"event {t!r} lacks {', '.join(missing)}")
    if t == "metrics" and not isinstance(obj["metrics"], dict):
        raise EventError("metrics.metrics must be an object")
    return obj


def parse_line(line: str | bytes) -> dict | None:
    """Parse one stdout line; None for blank or non-JSON lines (e.g. stray prints from libraries)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return validate_event(json.loads(line))
    except (json.JSONDecodeError, EventError):
        return None


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; a diverged loss must still produce a parseable line
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Writes events as JSON lines to a stream (stdout by default), flushing each line."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled

    def emit(self, type_: str, **fields: Any) -> dict:
        event = make_event(type_, **fields)
        if self.enabled:
            try:
                self.stream.write(json.dumps(_clean(event), separators=(",", ":")) + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                # the reader went away (studio closed): the run continues, the database keeps the record
                self.enabled = False
        return event
