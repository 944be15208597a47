"""The engine's command line: ``mediswift`` (also ``python -m engine``): the parser and the entry point.

Each command lives in its own module, which adds its parser (``register``) and holds what it does;
a command module imports the engine's heavier layers (torch) inside the command, so the parser and
the light commands start fast.

Exit codes: 0 success (a stopped run included), 1 internal failure, 2 bad input (one clear line on
stderr naming the field or file, plus an ``error`` event on stdout for commands that stream events),
3 a file-system or disk error (a full disk, the file-size limit, a read-only or immutable folder: one
line naming the path and the errno; a run it hits ends ``failed`` with that line as its error).
"""
from __future__ import annotations

import argparse
import os
import sys

# Idle OpenMP threads of torch (and numba) spin by default; when cores are shared (the studio, a
# second run, tests) the spinning threads steal the cores the working ones need and steps get
# several times slower. Passive waiting costs little when the machine is quiet. A user's own
# setting wins. Must happen before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.cli import (  # noqa: E402
    checkpoints_cmd,
    config_cmd,
    estimate_cmd,
    eval_cmd,
    export_cmd,
    import_cmd,
    inspect_cmd,
    metrics_cmd,
    runs_cmd,
    sweep_cmd,
    train_cmd,
)
from engine.core.errors import EXIT_BAD_INPUT, EXIT_IO_ERROR, error_line  # noqa: E402
from engine.core.errors import FileSystemError, InputError  # noqa: E402
from engine.core.events import EventWriter  # noqa: E402
from engine.core.paths import default_db_path  # noqa: E402
from engine.store import DatabaseError  # noqa: E402
from engine.store.rundb import disk_fault  # noqa: E402

# in the order `mediswift --help` lists them
COMMANDS = (train_cmd, runs_cmd, inspect_cmd, metrics_cmd, estimate_cmd, checkpoints_cmd, config_cmd,
            eval_cmd, export_cmd, import_cmd, sweep_cmd)


def with_db(sp: argparse.ArgumentParser, db: bool = True) -> argparse.ArgumentParser:
    """A command that reads or writes the run database takes ``--db``."""
    if db:
        sp.add_argument("--db", help="run database (default: $MEDISWIFT_DB or ~/.local/share/mediswift/runs.db)")
    return sp


EXIT_CODES = ("exit codes: 0 success (a stopped run included), 1 internal failure (the run holds the error), "
              "2 bad input (one line naming the field or file), 3 a file-system or disk error (one line naming "
              "the path and the errno), 130 interrupted")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mediswift", description="MediSwift engine: sparse pre-training of domain GPT models.",
                                epilog=EXIT_CODES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub, with_db)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # commands whose stdout a program reads get the error as an event too
    streams_events = args.command == "train" or (args.command == "estimate" and args.json)
    try:
        return args.fn(args)
    except InputError as e:
        error_line(str(e))
        if streams_events:
            EventWriter().emit("error", message=str(e), key=getattr(e, "key", None) or None, path=getattr(e, "path", None))
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return 0
    except (DatabaseError, OSError) as e:
        db = getattr(args, "db", None) or default_db_path()
        fault = disk_fault(e, db)  # a full disk, the file-size limit, a read-only folder: the path and errno
        if isinstance(e, OSError) and (fault is None or fault.filename in (None, "?")):
            # a write that names no file (a full disk under an export): the file the command writes
            fault = FileSystemError.of(e, e.filename or getattr(args, "out", None) or None,
                                       action="write" if getattr(args, "out", None) else "read or write")
        if fault is not None:
            error_line(str(fault))
            if streams_events:
                EventWriter().emit("error", message=str(fault), key=None, path=fault.filename)
            return EXIT_IO_ERROR
        # a damaged or foreign file where the run database should be
        error_line(f"the run database {db} is damaged or not a run database ({e})")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
