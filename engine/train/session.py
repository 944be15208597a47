"""The lifecycle of one run, shared by every stage: database row, run folder, log file, events.

A session creates (or re-opens, for --resume) the run's row, writes ``engine.log`` in the run
folder, emits ``run_started``/``run_finished``/``error`` events, and always leaves the row in a
final status: completed, stopped or failed. The engine process is the only writer of its run's rows.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
import time
from pathlib import Path

from engine import __version__
from engine.core.config import RunConfig
from engine.core.events import EventWriter
from engine.store.rundb import RunDB
from engine.train.metrics import DatabaseSink, EventSink, MetricsLogger, ProgressBar, TensorBoardSink


def package_versions() -> dict[str, str]:
    out = {"mediswift": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", "tokenizers", "datasets", "numba", "sqlite_utils"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(mod, "__version__", "?")
    return out


class RunSession:
    writer = True  # the process that writes the run's rows, events and log (rank 0 of a group)

    def __init__(self, db: RunDB, events: EventWriter, cfg: RunConfig, runs_dir: Path, resume_id: str | None = None):
        self.db = db
        self.events = events
        self.cfg = cfg
        self.resumed_from: dict | None = None  # the run's row as it was before a resume
        self.trained = False  # set by the loop at its first step: from then on a failure is the run's
        if resume_id:
            row = db.get_run(resume_id)
            self.run_id = row["id"]
            self.run_dir = Path(row["run_dir"])
            db.mark_running(self.run_id)  # claim it first: two resumes of one run never both proceed
            self.resumed_from = row
            db.update_run(self.run_id, config=cfg.to_dict(), versions=package_versions())
        else:
            name = cfg.name or f"{cfg.stage}"
            self.run_id = db.create_run(name=name, stage=cfg.stage, config=cfg.to_dict(), parent_id=cfg.parent or None,
                                        versions=package_versions())
            self.run_dir = Path(runs_dir).expanduser().resolve() / self.run_id
            db.update_run(self.run_id, run_dir=str(self.run_dir))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = self._make_logger()
        self.t0 = time.monotonic()
        self.finished = False

    def _make_logger(self) -> logging.Logger:
        log = logging.getLogger(f"mediswift.run.{self.run_id}")
        log.setLevel(logging.INFO)
        log.propagate = False
        fh = logging.FileHandler(self.run_dir / "engine.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("[mediswift] %(message)s"))
        log.addHandler(err)
        return log

    # -- events ------------------------------------------------------------------------------------
    def start(self, max_steps: int) -> None:
        self.db.mark_running(self.run_id)
        self.db.merge_meta(self.run_id, pgid=os.getpgrp())  # what a forced stop of a re-attached studio kills
        row = self.db.get_run(self.run_id)
        # pgid: the group a forced stop kills, which holds every process of a torchrun group too
        self.events.emit("run_started", run_id=self.run_id, name=row["name"], stage=self.cfg.stage,
                         config=self.cfg.to_dict(), run_dir=str(self.run_dir), pid=row["pid"], max_steps=max_steps,
                         parent=self.cfg.parent or None, db=str(self.db.path), pgid=os.getpgrp(),
                         world=self.cfg.train.nproc * self.cfg.train.nnodes)
        self.info(f"run {self.run_id} ({self.cfg.stage}) started; folder {self.run_dir}")

    def info(self, message: str) -> None:
        self.log.info(message)
        self.events.emit("log", run_id=self.run_id, message=message)

    def warn(self, message: str) -> None:
        self.log.warning("warning: " + message)
        self.events.emit("warning", run_id=self.run_id, message=message)

    def progress(self, phase: str, done: int, total: int) -> None:
        self.events.emit("progress", run_id=self.run_id, phase=phase, done=done, total=total)
        if sys.stderr.isatty():  # a terminal gets a line that updates in place (the studio draws the events)
            sys.stderr.write(f"\r[mediswift] {phase}: {done:,}/{total:,} ({100 * done / max(1, total):.0f} %)"
                             + ("\n" if done >= total else ""))
            sys.stderr.flush()

    def status(self, status: str) -> None:
        self.db.set_status(self.run_id, status)
        self.events.emit("status", run_id=self.run_id, status=status)

    def metrics_logger(self, total_steps: int) -> MetricsLogger:
        sinks = [EventSink(self.events, self.run_id), DatabaseSink(self.db, self.run_id), ProgressBar(total_steps)]
        if "tensorboard" in self.cfg.train.report_to:
            sinks.append(TensorBoardSink(self.run_dir / "tensorboard"))
        return MetricsLogger(sinks)

    def finish(self, status: str, step: int, summary: dict) -> None:
        self.db.update_run(self.run_id, summary=summary)
        self.db.set_status(self.run_id, status)
        self.events.emit("run_finished", run_id=self.run_id, status=status, step=step, summary=summary)
        self.info(f"run {self.run_id} {status} at step {step}")
        self.finished = True

    def fail(self, message: str, key: str | None = None, path: str | None = None, status: str = "failed") -> None:
        prev = self.resumed_from
        if prev is not None and not self.trained and status == "failed":
            # a resume that failed before training leaves the run as it was (status and stored config)
            status = prev["status"]
            self.db.update_run(self.run_id, config=prev["config"], pid=prev["pid"], pid_start=prev["pid_start"])
        self.db.set_status(self.run_id, status, error=message)
        self.log.error("error: " + message)
        self.events.emit("error", run_id=self.run_id, message=message, key=key, path=path)
        self.events.emit("run_finished", run_id=self.run_id, status=status, step=-1, summary={})
        self.finished = True

    def close(self) -> None:
        self.db.flush_metrics()
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


class ReadOnlyRunDB:
    """The run database as a rank other than 0 sees it: reads pass through (a parent run, its
    checkpoints), writes are dropped, since rank 0 alone writes the run's rows."""

    WRITES = frozenset({"create_run", "update_run", "mark_running", "set_status", "merge_meta", "delete_run",
                        "reap_crashed", "log_metrics", "flush_metrics", "insert_metric_rows", "truncate_metrics",
                        "add_evaluation", "add_checkpoint", "replace_checkpoint_file", "add_artifact",
                        "delete_checkpoint"})

    def __init__(self, db: RunDB):
        self._db = db

    def __getattr__(self, name: str):
        if name in self.WRITES:
            return lambda *a, **k: None
        return getattr(self._db, name)


class FollowerSession:
    """A rank other than 0 of a process group: the run's identity and folder (rank 0's), reads of the
    database, and nothing written: no rows, no events, no log lines (errors still go to stderr)."""

    writer = False

    def __init__(self, db: RunDB, cfg: RunConfig, run_id: str, run_dir: str, rank: int, resumed: bool):
        self.db = ReadOnlyRunDB(db)
        self.events = EventWriter(enabled=False)
        self.cfg = cfg
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.resumed_from = {} if resumed else None
        self.trained = False
        self.finished = False
        self.t0 = time.monotonic()
        self.log = logging.getLogger(f"mediswift.rank{rank}.{run_id}")
        self.log.setLevel(logging.ERROR)
        self.log.propagate = False
        if not self.log.handlers:
            err = logging.StreamHandler(sys.stderr)
            err.setFormatter(logging.Formatter(f"[mediswift rank {rank}] %(message)s"))
            self.log.addHandler(err)

    def start(self, max_steps: int) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def progress(self, phase: str, done: int, total: int) -> None:
        pass

    def status(self, status: str) -> None:
        pass

    def metrics_logger(self, total_steps: int) -> MetricsLogger:
        return MetricsLogger([])

    def finish(self, status: str, step: int, summary: dict) -> None:
        self.finished = True

    def fail(self, message: str, key: str | None = None, path: str | None = None, status: str = "failed") -> None:
        self.log.error("error: " + message)
        self.finished = True

    def close(self) -> None:
        pass
