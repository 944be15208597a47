"""The engine's one error type for bad input. Ground floor: no torch, no Qt.

Whatever the user gave that cannot be used (a config value, a file, a run id, a flag) raises
``InputError`` with a message that names the problem, and the config key and/or file it is about.
The CLI turns it into exit code 2 and one line on stderr (plus an ``error`` event where stdout
carries events); a training stage records it on the run as ``failed``; the studio shows it next to
the field ``key`` names.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: ``key`` is the dotted config key (``train.lr``) or flag (``run_id``) it concerns,
    ``path`` the file, when there is one."""

    def __init__(self, message: str, key: str | None = None, path: str | None = None):
        super().__init__(message)
        self.key = key
        self.path = path


EXIT_BAD_INPUT = 2  # what every command exits with on bad input


def error_line(message: str) -> None:
    """The one line on stderr that bad input gets: ``mediswift: error: ...``."""
    import sys

    sys.stderr.write(f"mediswift: error: {message}\n")
    sys.stderr.flush()
