"""What ``mediswift train`` was asked, read and checked before torch loads.

A mistyped key, a missing config file or an unknown run id is answered in well under a second: these
checks need only the config parser and the run database. ``prepare_run`` starts from what they
return, so each check is made once and says the same thing from the CLI, the queue and the studio.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from engine.core.config import RunConfig, load_config, load_toml, parse_overrides
from engine.core.errors import InputError
from engine.core.paths import list_presets, resolve_preset
from engine.store.rundb import RunDB


@dataclass(frozen=True)
class RunRequest:
    """What a user asks for: ``mediswift train CONFIG`` or ``--resume RUN_ID``."""
    config: str | None = None          # CONFIG.toml, or a preset name
    overrides: tuple[str, ...] = ()    # KEY=VALUE items, as given to --set
    resume: str | None = None          # a run id (or a unique prefix)
    runs_dir: str | None = None        # where run folders go (default: next to the database)
    ignore_memory_check: bool = False


@dataclass(frozen=True)
class ReadRequest:
    overrides: dict
    explicit: frozenset[str]           # config keys the user gave (a child's shape is its parent's otherwise)
    cfg: RunConfig | None = None       # a new run's config; None for a resume (the stored one is kept)
    row: dict | None = None            # the resumed run's database row


def in_group() -> bool:
    """This process is a worker that torchrun started (ours or a user's own ``torchrun -m engine``)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_follower() -> bool:
    """A worker of a group other than rank 0: rank 0 speaks for the run."""
    return in_group() and os.environ.get("RANK") != "0"


def read_request(request: RunRequest, db: RunDB, check_status: bool = True) -> ReadRequest:
    """The request's overrides and config (or the run it resumes), with every check that needs no model:
    InputError naming the key or file. ``check_status``: refuse a run that is live or already completed
    (a worker of a group reads the row after its rank 0 may have claimed it: the claim itself is the check)."""
    overrides = parse_overrides(list(request.overrides))
    if request.resume and request.config:
        raise InputError("give either CONFIG or --resume RUN_ID (a resumed run keeps its own config; adjust it with --set)",
                         key="config")
    explicit = set(overrides)
    if request.resume:
        row = db.get_run(request.resume)
        if row is None:
            raise InputError(f"cannot resume: unknown run {request.resume}", key="resume")
        if check_status and row["status"] in ("running", "paused"):
            raise InputError(f"cannot resume run {row['id']}: it is still {row['status']} (pid {row['pid']})", key="resume")
        if check_status and row["status"] == "completed" and not {"train.max_steps", "train.epochs"} & set(overrides):
            more = "train.epochs" if row["config"].get("train", {}).get("epochs") else "train.max_steps"
            raise InputError(f"run {row['id']} already completed; to train further add --set {more}=N", key="resume")
        return ReadRequest(overrides, frozenset(explicit), row=row)
    if not request.config:
        raise InputError("train needs a CONFIG.toml (or a preset name such as 'demo'), or --resume RUN_ID", key="config")
    path = resolve_preset(request.config)
    if not path.is_file():
        raise InputError(f"config file not found: {request.config} (presets: {', '.join(list_presets())})",
                         key="config", path=str(path))
    cfg = load_config(path, overrides)
    explicit |= {f"model.{k}" for k in load_toml(path).get("model", {})}
    return ReadRequest(overrides, frozenset(explicit), cfg=cfg)
