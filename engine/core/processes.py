"""Is a process still the one we started? A pid and its kernel start time, so a recycled pid is not
mistaken for a run's engine or the queue's runner.

Ground floor (no torch, no Qt, no SQLite): the store's run lease, the queue's orchestration and the
studio's engine handle all ask the same question through these two functions.
"""
from __future__ import annotations

import os


def process_start(pid: int) -> str:
    """Kernel start time of a process (Linux); "" where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int | None, start: str | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``start``, is still the process that started then)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start:
        now = process_start(pid)
        if now and now != start:
            return False
    # a zombie (killed, not yet reaped by its parent) is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except OSError:
        pass
    return True
