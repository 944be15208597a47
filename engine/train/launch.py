"""Running a prepared plan (engine.train.plan): in this process, or as a process group.

``run_plan`` returns the run's exit code: 0 completed or stopped, 1 failed, 2 bad input, 3 a
file-system or disk error (a full disk, the file-size limit, a read-only folder: one line naming the
path and the errno), 130 interrupted twice. Whatever happens after the run's row exists is recorded
on the run (its status and error) by the reporter, and said once: by rank 0 in a group.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from engine.core import registry
from engine.core.errors import EXIT_BAD_INPUT, EXIT_IO_ERROR, FileSystemError, InputError, error_line
from engine.core.events import EventWriter
from engine.store import DatabaseError
from engine.store.rundb import RunDB, disk_fault
from engine.train.control import Control
from engine.train.distributed import from_environment
from engine.train.group import in_group, launch, record_run_id
from engine.train.identity import RunIdentity
from engine.train.loop import TrainLoop
from engine.train.plan import RunPlan
from engine.train.reporter import NullReporter, Reporter, RunReporter

LOST_GROUP = ("Connection closed", "Connection reset", "gloo", "NCCL", "Broken pipe")


def run_plan(plan: RunPlan) -> int:
    if in_group():  # a worker of a user's own torchrun: this process is one rank
        return run_rank(plan)
    if plan.world > 1:
        if plan.resume:
            plan.resume.state = None  # each worker opens the checkpoint itself; this process only watches
        return launch(plan, run_rank)  # each worker runs run_rank(plan)
    return run_here(plan)


def run_stage(plan: RunPlan, run: RunIdentity, report: Reporter, control: Control) -> str:
    """The stage the config names (engine.core.registry), run by the one training loop; a stage that
    does not train (the vocabulary) is a function of the run."""
    spec = registry.stage(run.cfg.stage)
    impl = registry.load_impl(spec.impl)
    if not spec.trains:
        return impl(run, report)
    return TrainLoop(run, report, control, impl(), plan.precision, plan.resume).run()


def run_here(plan: RunPlan) -> int:
    """The whole run in this process."""
    try:
        report = _open_run(plan)
    except FileSystemError as e:  # the row is failed with it already (or was never written)
        say_error(e, event=True)
        return EXIT_IO_ERROR
    run = RunIdentity(report.run_id, report.run_dir, plan.cfg, plan.parent)
    control = Control()
    control.install()
    try:
        status = run_stage(plan, run, report, control)
        return 0 if status in ("completed", "stopped") else 1
    except InputError as e:
        report.fail(str(e), key=e.key, path=e.path)
        say_error(e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        report.fail("interrupted twice; stopped without a final checkpoint", status="stopped")
        return 130
    except Exception as e:  # noqa: BLE001 - record any failure before exiting
        fault = disk_fault(e, plan.db_path)
        if fault is not None:  # the file system refused a write: the run fails with the path and errno
            report.fail(str(fault), path=fault.filename)
            say_error(fault)
            return EXIT_IO_ERROR
        report.error(traceback.format_exc())
        report.fail(f"{type(e).__name__}: {e}")
        return 1
    finally:
        control.uninstall()
        report.close()


def run_rank(plan: RunPlan) -> int:
    """One rank of a process group: rank 0 holds the run (its reporter, rows, events and lease) and
    tells the others its id; they follow silently. A failure of the group's communication (a rank
    died) ends the run as crashed, not failed: resuming it is the remedy."""
    cfg = plan.cfg
    group = from_environment(cfg.train.strategy, cfg.train.device != "cpu")
    if group.is_writer:
        try:
            report = _open_run(plan)
        except (InputError, FileSystemError) as e:
            group.broadcast((None, None))  # the others end too
            say_error(e, event=True)
            return EXIT_IO_ERROR if isinstance(e, FileSystemError) else EXIT_BAD_INPUT
        record_run_id(report.run_id)
        group.broadcast((report.run_id, str(report.run_dir)))
        run = RunIdentity(report.run_id, report.run_dir, cfg, plan.parent)
    else:
        run_id, run_dir = group.broadcast(None)
        if run_id is None:
            return EXIT_BAD_INPUT  # rank 0 refused the run (and said why)
        report = NullReporter(group.rank, run_id)
        run = RunIdentity(run_id, Path(run_dir), cfg, plan.parent, writer=False)
    control = Control(read_stdin=group.is_writer)
    control.install()
    lost = False
    try:
        status = run_stage(plan, run, report, control)
        return 0 if status in ("completed", "stopped") else 1
    except InputError as e:
        report.fail(str(e), key=e.key, path=e.path)
        if group.is_writer:
            say_error(e)
        return EXIT_BAD_INPUT
    except Exception as e:  # noqa: BLE001 - record any failure before exiting
        text = str(e)
        fault = None if not group.is_writer else disk_fault(e, plan.db_path)
        if fault is not None:  # rank 0's file system refused a write: the run fails with the path and errno
            report.fail(str(fault), path=fault.filename)
            say_error(fault)
            return EXIT_IO_ERROR
        lost = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(w in text for w in LOST_GROUP))
        if not lost:
            report.error(traceback.format_exc())
        report.fail(f"{type(e).__name__}: {e}" if not lost else
                    f"a process of the group was lost ({type(e).__name__}: {text.splitlines()[0] if text else ''}); "
                    "resume the run to continue from its last checkpoint", status="crashed" if lost else "failed")
        return 1
    finally:
        control.uninstall()
        report.close()
        if lost:
            # the run is recorded; tearing down a group that lost a member (its destructor included)
            # waits on the dead peer, so leave at once
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        group.close()


def _open_run(plan: RunPlan) -> RunReporter:
    """The run's row and folder (a resume claims its row): from here on the run exists."""
    try:
        report = RunReporter(RunDB(plan.db_path), EventWriter(), plan.cfg, Path(plan.runs_dir),
                             resume_id=plan.resume.run_id if plan.resume else None)
    except DatabaseError as e:  # the database's file system refused the row (a damaged file keeps its message)
        fault = disk_fault(e, plan.db_path)
        if fault is None:
            raise
        raise fault from None
    for note in plan.notes:
        report.info(note)
    return report


def say_error(e: InputError | FileSystemError, event: bool = False) -> None:
    """The one stderr line of bad input or a file-system error (``mediswift: error: ...``); for an
    error found before the run existed (``event``), also the ``error`` event a reader of stdout waits
    for (the reporter sends it once the run exists)."""
    error_line(str(e))
    if event:
        if isinstance(e, FileSystemError):
            EventWriter().emit("error", message=str(e), key=None, path=e.filename)
        else:
            EventWriter().emit("error", message=str(e), key=e.key or None, path=e.path)
