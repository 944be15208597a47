"""A run, prepared: everything decided and checked before anything is written.

``prepare_run`` turns a request (a config or a run to resume, the ``--set`` overrides) and the run
database (read, never written) into a ``RunPlan``: the final config (a child run's model shape is its parent's, a run
resumed on another number of processes keeps its global batch), the parent resolved once, the
resume checkpoint opened, the inputs, the process group and the memory checked, the precision and
the number of processes decided. Bad input raises InputError here, so it leaves no run row behind.
``engine.train.launch.run_plan`` runs the plan; a plan pickles, which is how the workers of a
process group receive it.

A worker of a group a user started with their own ``torchrun -m engine train ...`` prepares its own
plan: the group's checks are the user's torchrun's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core import registry
from engine.core.config import RunConfig, from_dict, load_config, load_toml, parse_overrides
from engine.core.errors import InputError
from engine.core.paths import default_runs_dir, list_presets, resolve_preset
from engine.data.corpus import check_corpus_spec
from engine.model.checkpoint import load_checkpoint
from engine.model.runs import RunRef, check_parent, good_checkpoint
from engine.store.rundb import RunDB
from engine.train.child import child_config
from engine.train.estimate import available_memory, estimate
from engine.train.group import check_group, in_group, world_size
from engine.train.identity import continues_import
from engine.train.metrics import check_reporters
from engine.train.precision import Precision, choose_precision
from engine.train.runtime import resolve_device


@dataclass(frozen=True)
class RunRequest:
    """What a user asks for: ``mediswift train CONFIG`` or ``--resume RUN_ID``."""
    config: str | None = None          # CONFIG.toml, or a preset name
    overrides: tuple[str, ...] = ()    # KEY=VALUE items, as given to --set
    resume: str | None = None          # a run id (or a unique prefix)
    runs_dir: str | None = None        # where run folders go (default: next to the database)
    ignore_memory_check: bool = False


@dataclass
class Resume:
    """The checkpoint a resumed run continues from. ``state`` is the opened file; it stays in the
    process that opened it (a worker of a group opens the file again)."""
    run_id: str
    checkpoint: str
    train_loss: float | None = None  # the last training loss logged up to the checkpoint (the summary's)
    state: dict | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "state": None}

    def opened(self) -> dict:
        if self.state is None:
            self.state = load_checkpoint(self.checkpoint)
        return self.state


@dataclass(frozen=True)
class RunPlan:
    cfg: RunConfig
    db_path: str
    runs_dir: str
    world: int = 1                       # processes that train it (1: this one)
    precision: Precision | None = None   # what the products compute in (None: a stage without a training loop)
    parent: RunRef | None = None
    resume: Resume | None = None
    notes: tuple[str, ...] = ()          # said once the run exists (how a resume keeps its global batch)


def prepare_run(request: RunRequest, db: RunDB) -> RunPlan:
    worker = in_group()  # a process of a torchrun group a user started: its group is checked already
    overrides = parse_overrides(list(request.overrides))
    if request.resume and request.config:
        raise InputError("give either CONFIG or --resume RUN_ID (a resumed run keeps its own config; adjust it with --set)",
                         key="config")
    explicit: set[str] = set(overrides)  # config keys the user gave (a child's model shape is its parent's otherwise)
    notes: tuple[str, ...] = ()
    resume = None
    if request.resume:
        cfg, resume, note = _resume(db, request.resume, overrides, check_status=not worker)
        notes = (note,) if note else ()
    else:
        if not request.config:
            raise InputError("train needs a CONFIG.toml (or a preset name such as 'demo'), or --resume RUN_ID",
                             key="config")
        path = resolve_preset(request.config)
        if not path.is_file():
            raise InputError(f"config file not found: {request.config} (presets: {', '.join(list_presets())})",
                             key="config", path=str(path))
        cfg = load_config(path, overrides)
        explicit |= {f"model.{k}" for k in load_toml(path).get("model", {})}
    spec = registry.stage(cfg.stage)
    parent, precision = check_inputs(cfg, db)
    if spec.takes_parent_shape or continues_import(cfg, parent):
        # the model shape comes from the parent; only an explicitly given model.n_ctx is honoured
        cfg = child_config(cfg, parent, explicit, resuming=resume is not None)
    if not worker:
        check_group(cfg, resuming=resume is not None)
        if spec.trains and not request.ignore_memory_check:
            check_memory(cfg)
    runs_dir = Path(request.runs_dir) if request.runs_dir else default_runs_dir(db.path)
    return RunPlan(cfg, str(db.path), str(runs_dir), world=world_size(cfg) if spec.trains else 1,
                   precision=precision, parent=parent, resume=resume, notes=notes)


def _resume(db: RunDB, run_id: str, overrides: dict, check_status: bool) -> tuple[RunConfig, Resume, str | None]:
    row = db.get_run(run_id)
    if row is None:
        raise InputError(f"cannot resume: unknown run {run_id}", key="resume")
    # (a worker of a group reads the row after its rank 0 may have claimed it: the claim itself is the check)
    if check_status and row["status"] in ("running", "paused"):
        raise InputError(f"cannot resume run {row['id']}: it is still {row['status']} (pid {row['pid']})", key="resume")
    if check_status and row["status"] == "completed" and "train.max_steps" not in overrides:
        raise InputError(f"run {row['id']} already completed; to train further add --set train.max_steps=N", key="resume")
    stored = from_dict(row["config"])
    cfg, note = keep_global_batch(stored, stored.replace(overrides), overrides)
    path = good_checkpoint(db, row["id"])
    if path is None:
        raise InputError(f"cannot resume run {row['id']}: it has no intact checkpoint to continue from", key="resume")
    state = load_checkpoint(path)  # opened before the run is touched: a bad file changes nothing
    return cfg, Resume(row["id"], str(path), _last_loss(db, row["id"], int(state["step"])), state), note


def _last_loss(db: RunDB, run_id: str, step: int) -> float | None:
    """The training loss last logged up to ``step``: what the run's summary says until it logs another."""
    rows = [r for r in db.metrics(run_id, names=["loss"]) if r["step"] <= step]
    return None if not rows or rows[-1]["value"] is None else float(rows[-1]["value"])


def keep_global_batch(stored: RunConfig, cfg: RunConfig, overrides: dict) -> tuple[RunConfig, str | None]:
    """A run resumed on another number of processes keeps its global batch (processes x batch_size x
    grad_accum), and so its batch order and schedule, by changing grad_accum where it divides; an
    explicit train.grad_accum wins."""
    old, new = world_size(stored), world_size(cfg)
    if old == new or "train.grad_accum" in overrides:
        return cfg, None
    total = old * stored.train.grad_accum
    if total % new:
        return cfg, (f"the run continues on {new} processes (it ran on {old}) and its global batch changes from {total} "
                     f"to {new * cfg.train.grad_accum} micro-batches per step: {total} is not divisible by {new}")
    return cfg.replace({"train.grad_accum": total // new}), (
        f"the run continues on {new} process{'es' if new > 1 else ''} (it ran on {old}) with train.grad_accum = "
        f"{total // new}, keeping its global batch of {total} micro-batches per step and so its batch order")


def check_inputs(cfg: RunConfig, db: RunDB) -> tuple[RunRef | None, Precision | None]:
    """Checks that need no heavy work, done before a run row exists (so bad input leaves no run
    behind); returns the parent and the precision the run will train in."""
    spec = registry.stage(cfg.stage)
    if spec.reads_corpus or not registry.task(cfg.task.name).labelled:
        check_corpus_spec(cfg.data.corpus)
    parent = check_parent(db, cfg)
    if not spec.trains:
        return parent, None
    check_reporters(cfg.train.report_to)
    return parent, choose_precision(cfg.train.precision, _device(cfg.train.device))  # fp16 on a CPU, say


def _device(name: str) -> torch.device:
    """The device rank 0 (or this worker of a user's torchrun) computes on."""
    device = resolve_device(name)
    if device.type == "cuda" and in_group():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_memory(cfg: RunConfig) -> None:
    """A run that cannot fit in this machine's memory is refused before it starts (not an allocation
    traceback); the processes of a group on this machine count together."""
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return  # GPU memory is another budget; the device itself reports it
    est = estimate(cfg, probe_steps=0)
    need, have = est.get("memory_per_process_bytes", est["memory_bytes"]) * cfg.train.nproc, available_memory()
    if need > 0.9 * have:
        raise InputError(f"the run needs about {need / 2**30:.1f} GiB of memory and this machine has {have / 2**30:.1f} GiB "
                         "available; use a smaller model or train.batch_size (or pass --ignore-memory-check)", key="model")
