"""A run's engine.log, read from the end: its last lines, and what was appended since the last read (a
re-attached run's log pane)."""
from __future__ import annotations

from pathlib import Path


class FileTail:
    """Reads what was appended to a file since the last call (the engine.log of a re-attached run)."""

    def __init__(self, path: str | Path, from_end_bytes: int | None = None):
        self.path = Path(path)
        self.offset = 0
        if from_end_bytes is not None and self.path.exists():
            self.offset = max(0, self.path.stat().st_size - from_end_bytes)

    def read_new(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # rotated or truncated
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1  # only whole lines; the rest comes next time
        self.offset += cut
        return data[:cut].decode("utf-8", errors="replace").splitlines()


def tail_lines(path: str | Path, n: int = 40) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            return fh.read().decode("utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []
