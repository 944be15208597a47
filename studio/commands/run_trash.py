"""Deleting runs: the studio's trash (Delete puts a run there, Undo takes it back) and deleting for good,
which only emptying the trash does.

A run in the trash is whole: its database rows and its run folder are untouched; the run store just
leaves it out of every list (``RunStore.hide_run``). Emptying the trash (the browser's *Empty trash*,
or the studio quitting) deletes each run's rows and folder as ``delete_run`` does. A studio that dies
first loses nothing: the runs are simply back in the lists the next time.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from engine.core.processes import pid_alive
from engine.store.rundb import LIVE_STATUSES, RunDB
from studio.models.run_store import RunStore


class RunBusyError(RuntimeError):
    pass


def is_live(run: dict) -> bool:
    """The run's engine process is alive (it writes the run's rows)."""
    return run["status"] in LIVE_STATUSES and pid_alive(run.get("pid"), run.get("pid_start"))


def run_folder(run: dict) -> Path | None:
    """The run's folder, only if it is one: named after the run id, so a bad run_dir never deletes more."""
    p = Path(run.get("run_dir") or "")
    return p if run.get("run_dir") and p.name == run["id"] and p.is_dir() else None


def _deletable(run: dict | None, run_id: str) -> dict:
    """The run, if it may be deleted: KeyError for none, RunBusyError while its engine (the writer) is alive."""
    if run is None:
        raise KeyError(run_id)
    if is_live(run):
        raise RunBusyError(f"run {run['id']} is {run['status']} (pid {run['pid']}); stop it before deleting it")
    return run


def delete_run(db: RunDB, run_id: str, remove_folder: bool = True) -> Path | None:
    """Delete the run's rows (metrics, evaluations, checkpoints, artifacts, run) and its folder, for good."""
    run = _deletable(db.get_run(run_id), run_id)
    folder = run_folder(run) if remove_folder else None
    db.delete_run(run["id"])
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return folder


def trash_run(store: RunStore, run_id: str) -> dict:
    """Hide a run as deleted; its row. KeyError for an unknown run, RunBusyError while its engine is alive."""
    run = _deletable(store.run(run_id), run_id)
    store.hide_run(run["id"], run)
    return run


def restore_run(store: RunStore, run_id: str | None = None) -> dict | None:
    """Take a run out of the trash (the last one put there by default); its row, or None if it was empty."""
    hidden = store.hidden_runs()
    run = next((r for r in hidden if r["id"] == run_id), None) if run_id else (hidden[-1] if hidden else None)
    if run is not None:
        store.unhide_runs([run["id"]])
    return run


def empty_trash(store: RunStore) -> tuple[list[str], list[str]]:
    """Delete every run in the trash for good (rows and folder): (deleted ids, ids kept because their engine
    came back to life: those leave the trash and show again)."""
    deleted, kept = [], []
    for run in store.hidden_runs():
        try:
            delete_run(store.db, run["id"])
            deleted.append(run["id"])
        except KeyError:  # deleted elsewhere meanwhile: nothing left to do
            deleted.append(run["id"])
        except RunBusyError:
            kept.append(run["id"])
    store.unhide_runs(deleted + kept)
    return deleted, kept
