"""What a run says while it trains, and the one place in engine/train that writes the run database.

Components are handed a ``Reporter`` (and the run's identity, engine.train.identity) instead of a
database: log lines, warnings, progress, metrics, meta, evaluations, checkpoints, artifacts, status.
``RunReporter`` is rank 0's (or the only process's): it owns the run's row (created, or claimed on
a resume), its folder and ``engine.log``, emits the JSON-line events and always leaves the row in a
final status. ``NullReporter`` is every other rank's: one run, one voice, so it drops everything
but errors, which go to stderr.
"""
from __future__ import annotations

import importlib
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Protocol

from engine import __version__
from engine.core.config import RunConfig
from engine.core.errors import FileSystemError
from engine.core.events import EventWriter
from engine.store import DatabaseError
from engine.store.rundb import RunDB, disk_fault, pid_alive
from engine.train.metrics import EventSink, MetricsLogger, Point, ProgressBar, TensorBoardSink

VERSIONED = ("torch", "numpy", "tokenizers", "datasets", "numba", "sqlite_utils")


class Reporter(Protocol):
    def start(self, max_steps: int) -> None:
        """The run is under way (status running, ``run_started``)."""

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def error(self, text: str) -> None:
        """A failure's details (a traceback) for the log; ``fail`` says what happened."""

    def progress(self, phase: str, done: int, total: int) -> None: ...

    def metrics_logger(self, total_steps: int) -> MetricsLogger:
        """Where the loop's metric rows go (events, the database, a progress bar, trackers)."""

    def meta(self, **items) -> None:
        """Facts about the run (parameters, kernels, precision, baselines) merged into its meta."""

    def artifact(self, kind: str, path: str, meta: dict | None = None) -> None: ...

    def evaluation(self, step: int, task: str, split: str, metrics: dict, *, shown: dict | None = None,
                   baselines: dict | None = None, shown_baselines: dict | None = None, data_path: str = "") -> None:
        """One evaluation: its row (every metric, the baselines) and an ``eval`` event with ``shown``
        (the headline metrics; all of them when None) and ``shown_baselines``."""

    def checkpoint_saved(self, step: int, tokens: int, path: str, nbytes: int, final: bool, sha256: str,
                         keep: int, best_step: int | None = None) -> None:
        """A checkpoint file was written; older ones beyond ``keep`` go (train.keep_checkpoints), except
        the best evaluation's (``best_step``: a fine-tuning recipe's, by its headline dev metric)."""

    def announce_checkpoint(self, step: int, path: str, nbytes: int, final: bool) -> None: ...

    def summary(self, summary: dict) -> None: ...

    def resumed(self, step: int, path: str) -> None:
        """The run continues from the checkpoint at ``step``: what was recorded after it goes."""

    def training(self) -> None:
        """The first step is about to run: from now on a failure is the run's, even on a resume."""

    def status(self, status: str) -> None: ...

    def finish(self, status: str, step: int, summary: dict) -> None: ...

    def fail(self, message: str, key: str | None = None, path: str | None = None, status: str = "failed") -> None: ...

    def close(self) -> None: ...


def package_versions() -> dict[str, str]:
    out = {"mediswift": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
        out[name] = getattr(mod, "__version__", "?")
    return out


class RunReporter:
    """Rank 0's reporter. Opening it creates the run's row and folder (or claims a stopped run's row
    on ``resume_id``: two resumes of one run never both proceed); the process is then the only writer
    of the run's rows."""

    def __init__(self, db: RunDB, events: EventWriter, cfg: RunConfig, runs_dir: Path, resume_id: str | None = None):
        self.db, self.events, self.cfg = db, events, cfg
        self.resumed_from: dict | None = None  # the run's row as it was before a resume
        self.trained = False
        if resume_id:
            row = db.get_run(resume_id)
            self.run_id = row["id"]
            self.run_dir = Path(row["run_dir"])
            db.mark_running(self.run_id)  # the claim
            self.resumed_from = row
            db.update_run(self.run_id, config=cfg.to_dict(), versions=package_versions())
        else:
            self.run_id = db.create_run(name=cfg.name or cfg.stage, stage=cfg.stage, config=cfg.to_dict(),
                                        parent_id=cfg.parent or None, versions=package_versions())
            self.run_dir = Path(runs_dir).expanduser().resolve() / self.run_id
        try:
            if not resume_id:
                db.update_run(self.run_id, run_dir=str(self.run_dir))
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.log = self._make_logger()
            except OSError as e:
                raise FileSystemError.of(e, self.run_dir) from None
        except (OSError, DatabaseError) as e:
            # the folder or the row could not be written (prepare_run checked the runs folder; the disk
            # filled since, say): the run ends failed with the reason now, never left ``created``
            fault = disk_fault(e, db.path)
            if fault is None:
                raise
            if resume_id:
                prev = self.resumed_from or {}
                db.record_failure(self.run_id, prev.get("status") or "crashed", str(fault))
            else:
                db.record_failure(self.run_id, "failed", str(fault))
            raise fault from None

    def _make_logger(self) -> logging.Logger:
        log = logging.getLogger(f"mediswift.run.{self.run_id}")
        log.setLevel(logging.INFO)
        log.propagate = False
        fh = QuietFileHandler(self.run_dir / "engine.log", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("[mediswift] %(message)s"))
        log.addHandler(err)
        return log

    def start(self, max_steps: int) -> None:
        cfg = self.cfg
        self.db.mark_running(self.run_id)
        self.db.merge_meta(self.run_id, pgid=os.getpgrp())  # what a forced stop of a re-attached studio kills
        row = self.db.get_run(self.run_id)
        # pgid: the group a forced stop kills, which holds every process of a torchrun group too
        self.events.emit("run_started", run_id=self.run_id, name=row["name"], stage=cfg.stage, config=cfg.to_dict(),
                         run_dir=str(self.run_dir), pid=row["pid"], max_steps=max_steps, parent=cfg.parent or None,
                         db=str(self.db.path), pgid=os.getpgrp(), world=cfg.train.nproc * cfg.train.nnodes)
        self.info(f"run {self.run_id} ({cfg.stage}) started; folder {self.run_dir}")

    def info(self, message: str) -> None:
        self.log.info(message)
        self.events.emit("log", run_id=self.run_id, message=message)

    def warn(self, message: str) -> None:
        self.log.warning("warning: " + message)
        self.events.emit("warning", run_id=self.run_id, message=message)

    def error(self, text: str) -> None:
        self.log.error(text)

    def progress(self, phase: str, done: int, total: int) -> None:
        self.events.emit("progress", run_id=self.run_id, phase=phase, done=done, total=total)
        if sys.stderr.isatty():  # a terminal gets a line that updates in place (the studio draws the events)
            sys.stderr.write(f"\r[mediswift] {phase}: {done:,}/{total:,} ({100 * done / max(1, total):.0f} %)"
                             + ("\n" if done >= total else ""))
            sys.stderr.flush()

    def metrics_logger(self, total_steps: int) -> MetricsLogger:
        sinks = [EventSink(self.events, self.run_id), DatabaseSink(self.db, self.run_id), ProgressBar(total_steps)]
        if "tensorboard" in self.cfg.train.report_to:
            sinks.append(TensorBoardSink(self.run_dir / "tensorboard"))
        return MetricsLogger(sinks)

    def meta(self, **items) -> None:
        self.db.merge_meta(self.run_id, **items)

    def artifact(self, kind: str, path: str, meta: dict | None = None) -> None:
        self.db.add_artifact(self.run_id, kind, path, meta)

    def evaluation(self, step: int, task: str, split: str, metrics: dict, *, shown: dict | None = None,
                   baselines: dict | None = None, shown_baselines: dict | None = None, data_path: str = "") -> None:
        extra = {} if shown_baselines is None else {"baselines": shown_baselines}
        self.events.emit("eval", run_id=self.run_id, step=step, split=split,
                         metrics=metrics if shown is None else shown, **extra)
        self.db.add_evaluation(self.run_id, step, task, split, metrics, baselines, data_path)

    def checkpoint_saved(self, step: int, tokens: int, path: str, nbytes: int, final: bool, sha256: str,
                         keep: int, best_step: int | None = None) -> None:
        self.db.add_checkpoint(self.run_id, step, tokens, path, nbytes, final, sha256)
        removed = retain(self.db, self.run_id, keep, self.run_dir, best_step)
        if removed:
            self.info(f"removed {len(removed)} older checkpoint{'s' if len(removed) > 1 else ''} "
                      f"(train.keep_checkpoints = {keep}): steps {', '.join(map(str, removed))}")

    def announce_checkpoint(self, step: int, path: str, nbytes: int, final: bool) -> None:
        self.events.emit("checkpoint", run_id=self.run_id, step=step, path=path, bytes=nbytes, final=final)

    def summary(self, summary: dict) -> None:
        self.db.update_run(self.run_id, summary=summary)

    def resumed(self, step: int, path: str) -> None:
        self.db.truncate_metrics(self.run_id, step)
        self.info(f"resumed from {path} at step {step}")

    def training(self) -> None:
        self.trained = True

    def status(self, status: str) -> None:
        self.db.set_status(self.run_id, status)
        self.events.emit("status", run_id=self.run_id, status=status)

    def finish(self, status: str, step: int, summary: dict) -> None:
        self.db.update_run(self.run_id, summary=summary)
        self.db.set_status(self.run_id, status)
        self.events.emit("run_finished", run_id=self.run_id, status=status, step=step, summary=summary)
        self.info(f"run {self.run_id} {status} at step {step}")

    def fail(self, message: str, key: str | None = None, path: str | None = None, status: str = "failed") -> None:
        prev = self.resumed_from
        try:
            if prev is not None and not self.trained and status == "failed":
                # a resume that failed before training leaves the run as it was (status and stored config)
                status = prev["status"]
                self.db.update_run(self.run_id, config=prev["config"], pid=prev["pid"], pid_start=prev["pid_start"])
            self.db.set_status(self.run_id, status, error=message)
        except DatabaseError as e:
            if disk_fault(e, self.db.path) is None:
                raise
            # the database's own writes fail (a full disk, the file-size limit): the status goes in
            # after the pending rows are dropped and the write-ahead log is given back
            self.db.record_failure(self.run_id, status, message)
        self.log.error("error: " + message)
        self.events.emit("error", run_id=self.run_id, message=message, key=key, path=path)
        self.events.emit("run_finished", run_id=self.run_id, status=status, step=-1, summary={})

    def close(self) -> None:
        try:
            self.db.flush_metrics()
        except DatabaseError as e:
            if disk_fault(e, self.db.path) is None:
                raise  # (rows that a disk fault refused are lost; the run already says why it ended)
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


class QuietFileHandler(logging.FileHandler):
    """``engine.log``: a line the file system refuses (a full disk) is dropped, not a logging traceback
    on stderr; the run's one error line says what happened."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class NullReporter:
    """A rank other than 0: no rows, no events, no log lines; errors still reach stderr."""

    def __init__(self, rank: int, run_id: str):
        self.log = logging.getLogger(f"mediswift.rank{rank}.{run_id}")
        self.log.setLevel(logging.ERROR)
        self.log.propagate = False
        if not self.log.handlers:
            err = logging.StreamHandler(sys.stderr)
            err.setFormatter(logging.Formatter(f"[mediswift rank {rank}] %(message)s"))
            self.log.addHandler(err)

    def error(self, text: str) -> None:
        self.log.error(text)

    def fail(self, message: str, key: str | None = None, path: str | None = None, status: str = "failed") -> None:
        self.log.error("error: " + message)

    def metrics_logger(self, total_steps: int) -> MetricsLogger:
        return MetricsLogger([])

    def _drop(self, *args, **kwargs) -> None:
        pass

    start = info = warn = progress = meta = artifact = evaluation = checkpoint_saved = _drop
    announce_checkpoint = summary = resumed = training = status = finish = close = _drop


class DatabaseSink:
    """Rows are deferred and committed every ``rundb.FLUSH_S`` (and before any other write of the run):
    fast steps share a commit, slow steps still reach the database as they happen."""

    def __init__(self, db: RunDB, run_id: str):
        self.db, self.run_id = db, run_id

    def write(self, point: Point, metrics: dict[str, float]) -> None:
        self.db.log_metrics(self.run_id, point.step, point.tokens, point.wall_time, point.flops, point.flops_dense,
                            metrics, defer=True)


def retain(db: RunDB, run_id: str, keep: int, run_dir, best_step: int | None = None) -> list[int]:
    """Keep the ``keep`` newest checkpoints and the one with the lowest validation loss (an evaluation
    at its step) when it is not among them, or, given ``best_step``, the one at that step (the best
    evaluation by the task's headline metric); remove the others' files (inside the run folder only)
    and rows. Returns the steps removed. ``keep`` 0 keeps everything."""
    rows = db.checkpoints(run_id)
    if keep <= 0 or len(rows) <= keep:
        return []
    loss = {}
    for e in db.evaluations(run_id):
        value = (e.get("metrics") or {}).get("loss")
        if value is not None and e["split"] in ("val", "dev"):
            loss[e["step"]] = float(value)
    kept = {r["id"] for r in rows[-keep:]}
    scored = [r for r in rows if r["step"] in loss]
    if best_step is not None:
        kept |= {r["id"] for r in rows if r["step"] == best_step}
    elif scored:
        kept.add(min(scored, key=lambda r: (loss[r["step"]], -r["step"]))["id"])
    root = Path(run_dir).resolve()
    removed = []
    for r in rows:
        if r["id"] in kept:
            continue
        f = Path(r["path"])
        if f.resolve().is_relative_to(root) and not f.is_symlink():  # never a file outside the run folder
            f.unlink(missing_ok=True)
        db.delete_checkpoint(r["id"])
        removed.append(int(r["step"]))
    return removed


def record_lost_run(db_path: str, run_id: str, message: str, status: str = "crashed") -> None:
    """A group's launcher ends the run rank 0 could not end itself (it died): a run whose process is
    gone is never left running."""
    db = RunDB(db_path)
    try:
        row = db.get_run(run_id)
        if row and row["status"] in ("running", "paused") and not pid_alive(row["pid"], row["pid_start"]):
            db.set_status(row["id"], status, error=message)
    finally:
        db.close()
