"""The New sweep dialog's side of the engine: plan a sweep, describe the plan, queue it, and say which
``mediswift sweep`` command does the same.

Planning and queueing are the very calls ``mediswift sweep`` makes (``engine.orchestrate.sweep``:
``prepare_sweep`` then ``submit_sweep``), given the same ``SweepRequest``, so the dialog queues exactly
the entries the command it shows would queue. Nothing here imports torch: planning, the FLOP budget
included, is the engine's torch-free arithmetic.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from engine.core import registry
from engine.core.config import load_toml
from engine.core.paths import default_runs_dir, list_presets, presets_dir
from engine.orchestrate.queue import Queue
from engine.orchestrate.sweep import SweepRequest, length_text, parse_budget, prepare_sweep, submit_sweep
from engine.store.rundb import RunDB

__all__ = ["SweepRequest", "budget_value", "chain_presets", "command_args", "command_text", "plan_preview",
           "queue_sweep"]


def chain_presets() -> list[str]:
    """The bundled presets ``--then`` accepts: stages that start from a parent (fine-tuning, prompting)."""
    out = []
    for name in list_presets():
        stage = str(load_toml(presets_dir() / f"{name}.toml").get("stage", registry.PRETRAIN))
        spec = registry.STAGES.get(stage)
        if spec is not None and spec.needs_parent:
            out.append(name)
    return out


def plan_preview(db: RunDB, request: SweepRequest) -> dict:
    """What the request would queue, checked as the command checks it (InputError on the first problem):
    the sweep's name, each grid point (label, planned length, planned training FLOPs), the chained stages,
    the budget and the runs folder."""
    prepared = prepare_sweep(db, request)
    points = [{"label": p.label, "length": length_text(p), "max_steps": p.cfg.train.max_steps,
               "flops": p.planned_flops or None} for p in prepared.plan.points]
    return {"name": prepared.name, "points": points, "then": [t.stage for t in prepared.then],
            "entries": len(points) * (1 + len(prepared.then)), "budget": prepared.plan.budget,
            "runs_dir": prepared.runs_dir}


def queue_sweep(db: RunDB, request: SweepRequest) -> tuple[str, list[int]]:
    """Check, plan and queue the request as ``mediswift sweep`` does: the sweep id and its entry ids."""
    return submit_sweep(Queue(db), prepare_sweep(db, request))


def budget_value(text: str) -> float:
    """An --equal-flops budget as the command reads it (InputError if it is not a positive number)."""
    return parse_budget(text)


def command_args(request: SweepRequest, db_path: str | Path) -> list[str]:
    """The ``mediswift sweep`` arguments that make this request (``--runs-dir`` only where it is not the
    default next to the database)."""
    args = ["mediswift", "sweep", request.config]
    for item in request.sets:
        args += ["--set", item]
    for item in request.grid:
        args += ["--grid", item]
    if request.equal_flops is not None:
        args += ["--equal-flops", request.equal_flops]
    if request.name is not None:
        args += ["--name", request.name]
    for item in request.then:
        args += ["--then", item]
    if request.parallel is not None:
        args += ["--parallel", str(request.parallel)]
    if request.runs_dir is not None and Path(request.runs_dir).expanduser().resolve() != default_runs_dir(db_path):
        args += ["--runs-dir", request.runs_dir]
    return args + ["--db", str(db_path)]


def command_text(request: SweepRequest, db_path: str | Path) -> str:
    return shlex.join(command_args(request, db_path))
