"""Planning a sweep: grid arguments into validated run configs, and equal training FLOPs; then
queueing it (one entry per grid point, and after each the ``--then`` configs chained to it).

``--grid key=v1,v2,…`` (repeatable) spans the cartesian product of its values. Every point is built
into a full RunConfig here, before anything is queued, so a wrong key, a value of the wrong type or
a value out of range is refused at once with the key named, and no entry is created. So is a point this
machine cannot run (``check_machine``: ``train.nproc`` against its cores or GPUs, and the other checks
``train`` makes of a process group that need no network), a grid value given twice (``0.5,0.50``: the
same value once typed), and a sweep name that is not one printable line. Points are built from one
validated base config, each re-validating only the sections its grid values touch, and queued in one
transaction: a 10,000-point grid queues in seconds.

``parent`` may be a grid key (``--grid parent=ID1,ID2``: the same fine-tuning or prompting recipe from
several parents); every parent a point names, by --set or --grid, is checked against the run database
before anything is queued (``check_parents``).

``prepare_sweep`` does all of that for one ``SweepRequest`` (the command's arguments as given) and
``submit_sweep`` queues what it prepared: ``mediswift sweep`` and the studio's New sweep dialog both go
through this pair, so the same request queues the same entries from either.

``--equal-flops BUDGET`` gives every point the ``train.max_steps`` whose training FLOPs (the engine's
own FLOP model, engine.core.flops, with a dynamic method's schedule) come closest to the budget, so
every run's spend is within half a step of it. Each count's FLOPs are a closed form (static) or a sum
over the schedule's mask updates (``planned_flops_per_token``), never a walk over the steps, and the
count is found by bisection over them: milliseconds for any budget. No torch.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.core import registry
from engine.core.config import (MAX_NAME, RunConfig, config_from, load_config, load_toml, name_problem,
                                parse_overrides, parse_value, safe_name)
from engine.core.errors import InputError
from engine.core.flops import flop_model_for_model
from engine.core.machine_checks import check_processes, gpu_count
from engine.core.paths import default_runs_dir, list_presets, resolve_preset
from engine.orchestrate.queue import Queue, absolute_sets, check_parallel
from engine.store.queries import find_run
from engine.store.rundb import RunDB


@dataclass
class Point:
    values: dict              # grid key -> value
    cfg: RunConfig
    sets: list[str]           # the --set items this point's run gets (grid values included)
    flops_per_step: float = 0.0
    planned_flops: float = 0.0

    @property
    def label(self) -> str:
        return " ".join(f"{k.split('.')[-1]}={_text(v)}" for k, v in self.values.items())


def by_epochs(p: Point) -> bool:
    """The point's run counts train.epochs (its steps come from the task's examples when it starts), as
    engine.train.plan decides: a train.max_steps given with --set, a grid or a FLOP budget turns them off."""
    given = {kv.split("=", 1)[0].strip() for kv in p.sets}
    return bool(p.cfg.train.epochs) and not p.planned_flops and "train.max_steps" not in given


def length_text(p: Point) -> str:
    """'4 epochs' or '120 steps': how long the point's run is planned to be."""
    tc = p.cfg.train
    return f"{tc.epochs} epoch{'s' if tc.epochs != 1 else ''}" if by_epochs(p) else f"{tc.max_steps} steps"


@dataclass
class Plan:
    grid: dict                # key -> list of values, in the order given
    points: list[Point] = field(default_factory=list)
    budget: float | None = None


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["sparsity.level=0,0.5", "model.d_model=64,128"]`` -> {key: [values]} (types checked later)."""
    if not items:
        raise InputError("a sweep needs at least one --grid key=v1,v2,… (an empty grid has no runs)", key="grid")
    grid: dict[str, list] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise InputError(f"--grid expects key=v1,v2,…, got {item!r}", key="grid")
        values = [v.strip() for v in text.split(",")]
        if not text.strip() or any(not v for v in values):
            raise InputError(f"--grid {key} has an empty value ({item!r}); give key=v1,v2,…", key=key)
        if key in grid:
            raise InputError(f"--grid {key} is given twice; list all its values in one --grid", key=key)
        grid[key] = values
    return grid


def _same_key(v):
    """Grid values that are the same setting once typed compare equal under this: 0.5 and 0.50, 1 and 1.0."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("number", v)  # 3 and 3.0 are one dict key; 2**60 and 2**60 + 1 stay two (no float rounding)
    return ("other", json.dumps(v, sort_keys=True, default=str))


def check_duplicates(grid: dict[str, list[str]], typed: dict[str, list]) -> None:
    """InputError naming the key and the values when a --grid key lists one value twice (as typed, or
    as written: ``0.5,0.50``, ``1,1``), which would queue identical runs."""
    for key, values in typed.items():
        first: dict = {}
        for text, v in zip(grid[key], values):
            k = _same_key(v)
            if k in first:
                same = f"{first[k]} and {text}" if first[k] != text else f"{text} twice"
                raise InputError(f"--grid {key} repeats a value: {same} (the same setting); list each value once",
                                 key=key)
            first[k] = text


def plan_sweep(config_path, sets: list[str], grid_items: list[str], budget_text: str | None = None,
               vocab_size: int | None = None) -> Plan:
    """Every grid point as a validated config (InputError naming the key on the first bad one)."""
    base = parse_overrides(sets)
    grid = parse_grid(grid_items)
    for key in grid:
        if key in base:
            raise InputError(f"{key} is both a --set and a --grid key; give it in one place", key=key)
    budget = parse_budget(budget_text) if budget_text is not None else None
    if budget is not None and "train.max_steps" in grid:
        raise InputError("--equal-flops sets train.max_steps; it cannot also be a --grid key", key="train.max_steps")
    typed = {k: [parse_overrides([f"{k}={v}"])[k] for v in vals] for k, vals in grid.items()}
    check_duplicates(grid, typed)
    plan = Plan(grid=typed, budget=budget)
    build = _point_builder(config_path, base)
    keys = list(typed)
    for combo in itertools.product(*(range(len(typed[k])) for k in keys)):
        values = {k: typed[k][i] for k, i in zip(keys, combo)}
        cfg = build(values)  # unknown keys, wrong types, ranges: named here
        point_sets = list(sets) + [f"{k}={grid[k][i]}" for k, i in zip(keys, combo)]
        plan.points.append(Point(values, cfg, point_sets))
    checked: set[tuple] = set()
    for p in plan.points:  # what train would refuse of this machine, before anything is queued
        tc = p.cfg.train
        sig = (p.cfg.stage, p.cfg.sparsity.method, tc.nproc, tc.nnodes, tc.strategy, tc.device, tc.threads,
               tc.rdzv_endpoint)
        if sig not in checked:
            checked.add(sig)
            check_machine(p.cfg)
    if budget is not None:
        for p in plan.points:
            equalize(p, budget, vocab_size)
    return plan


def _point_builder(config_path, base: dict):
    """values -> the point's validated RunConfig. The config file is read once; when the base config
    (file + --set) is valid on its own, each point re-validates only the sections its values touch
    (RunConfig.with_values); otherwise (a base that only its grid values complete, such as a fine-tuning
    whose parent is a grid key) each point is built whole from the file's settings."""
    d = load_toml(config_path) if config_path else {}
    try:
        base_cfg = config_from(d, base)
    except InputError:
        return lambda values: config_from(d, {**base, **values})
    return base_cfg.with_values


def check_machine(cfg: RunConfig) -> None:
    """The checks ``train`` makes of a run's processes (engine.core.machine_checks), with its wording: a
    point this machine cannot run is refused before it is queued instead of failing when its turn comes."""
    check_processes(cfg, gpu_count() if cfg.train.device != "cpu" else 0)


def parse_budget(text: str) -> float:
    try:
        value = float(parse_value(text)) if not isinstance(parse_value(text), bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"--equal-flops must be a positive number of training FLOPs (e.g. 2e13), got {text!r}",
                         key="equal_flops")
    return value


def run_flops(cfg: RunConfig, steps: int, vocab_size: int | None = None) -> float:
    """Training FLOPs of ``steps`` optimizer steps of a pre-training config, as its run will count them:
    tokens per step times the FLOP model's training FLOPs per token (a dynamic method's plan summed over
    its phases, one per mask update, RigL's dense-gradient updates included: the sum of the per-step
    plan, exactly, without going step by step). Static: one product, whatever ``steps``."""
    m, tc = cfg.model, cfg.train
    vocab = vocab_size or cfg.tokenizer.vocab_size
    tokens = tc.batch_size * tc.grad_accum * m.n_ctx * tc.nproc * tc.nnodes
    if cfg.sparsity.method == "static":
        fm = flop_model_for_model(m, vocab, cfg.sparsity.level)
        return steps * tokens * fm.train_per_token(True)
    from engine.core.sparsity_schedule import Schedule, layer_shapes, planned_flops_per_token

    c = cfg.with_values({"train.max_steps": steps})  # validated; the schedule's default end_step follows it
    return tokens * planned_flops_per_token(Schedule.from_config(c), layer_shapes(m), steps,
                                            flop_model_for_model(m, vocab, 0.0))


def equalize(p: Point, budget: float, vocab_size: int | None = None) -> None:
    """Set the point's train.max_steps to the step count whose FLOPs come closest to ``budget``."""
    if p.cfg.stage != registry.PRETRAIN:
        raise InputError(f"--equal-flops balances pre-training runs; this config is a {p.cfg.stage} stage", key="equal_flops")
    one = run_flops(p.cfg, 1, vocab_size)
    if one > budget:
        raise InputError(f"--equal-flops {budget:.4g} is less than one training step of {p.label} ({one:.4g} FLOPs)",
                         key="equal_flops")
    lo, hi = 1, max(1, int(budget // one))  # static: exact; dynamic steps cost at most the first (densest) one … or more
    while run_flops(p.cfg, hi, vocab_size) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest step count within the budget, by bisection (FLOPs grow with steps)
        mid = (lo + hi) // 2
        if run_flops(p.cfg, mid, vocab_size) <= budget:
            lo = mid
        else:
            hi = mid
    under, over = run_flops(p.cfg, lo, vocab_size), run_flops(p.cfg, lo + 1, vocab_size)
    steps, spent = (lo, under) if budget - under <= over - budget else (lo + 1, over)
    p.cfg = p.cfg.replace({"train.max_steps": steps})
    p.sets.append(f"train.max_steps={steps}")
    p.flops_per_step = spent / steps
    p.planned_flops = spent


# -- queueing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Then:
    """A ``--then`` config: chained after every grid point's run, with that run as its parent."""
    path: Path                # the config file
    given: str                # as the user named it (a preset name or a path)
    stage: str


def check_then(path: Path, given: str) -> Then:
    """A --then config must be a stage that starts from a parent, and valid apart from that parent."""
    stage = str(load_toml(path).get("stage", registry.PRETRAIN))  # a config without `stage` pre-trains
    spec = registry.STAGES.get(stage)
    if spec is None or not spec.needs_parent:
        raise InputError(f"--then {given} is a {stage} config; --then chains a finetune or prompt stage after each run",
                         key="then", path=str(path))
    # its parent comes from the queue; everything else is checked now, this machine's processes included
    check_machine(load_config(path, {"parent": "queued"}))
    return Then(path, given, stage)


def check_parents(db: RunDB, plan: Plan) -> None:
    """Every parent the plan's points name (``--set parent=ID`` or ``--grid parent=ID1,ID2``) is a run of
    this database that the point's stage can start from: a fine-tuning or prompting needs a run of one of
    its parent stages with a checkpoint, a pre-training a vocabulary, pre-training or imported run.
    InputError naming ``parent`` on the first that is not, so a bad id leaves no sweep or entry behind."""
    seen: set[tuple[str, str]] = set()
    for p in plan.points:
        given, st = p.cfg.parent, p.cfg.stage
        if not given or (given, st) in seen:
            continue
        seen.add((given, st))
        row = find_run(db, given, "parent", "parent run")
        spec = registry.stage(st)
        if row["stage"] not in spec.parents:
            raise InputError(f"parent run {row['id']} is a {row['stage']} run; a {st} run starts from a "
                             f"{' or '.join(spec.parents)} run", key="parent")
        if spec.needs_parent and db.latest_checkpoint(row["id"]) is None:
            raise InputError(f"parent run {row['id']} ({row['status']}) has no checkpoint to start from yet",
                             key="parent")


def parent_vocab(db: RunDB, sets: list[str]) -> int | None:
    """A pre-training that reuses a parent's tokenizer has that tokenizer's size (for the FLOP budget)."""
    parent = parse_overrides(sets).get("parent")
    if not parent:
        return None
    row = db.get_run(parent)
    return (row or {}).get("summary", {}).get("vocab_size") if row else None


def default_name(plan: Plan, config_path: Path) -> str:
    """The base config's name (or file name) and the grid's keys: ``demo × level × d_model``."""
    return safe_name(f"{plan.points[0].cfg.name or config_path.stem} × {' × '.join(k.split('.')[-1] for k in plan.grid)}")


def check_sweep_name(name: str) -> str:
    """A sweep's name (it heads each of its runs' names): one printable line of at most MAX_NAME characters."""
    problem = name_problem(name)
    if problem:
        raise InputError(f"--name {problem}: a sweep name must be one line of printable text of at most "
                         f"{MAX_NAME} characters", key="name")
    return name


def queue_sweep(queue: Queue, plan: Plan, name: str, config_path: Path, config_name: str, sets: list[str],
                then: list[Then], runs_dir: str, cwd: str) -> tuple[str, list[int]]:
    """Record the sweep and queue its entries (a snapshot of each config's text); its id and the entry ids.
    Each point's chained entries follow it, so its chain finishes before the next point starts."""
    check_sweep_name(name)
    # paths as absolute as the entries' (Queue.add makes theirs so): the sweep reads the same from anywhere
    spec = {"config": str(Path(cwd, config_path).resolve()), "sets": absolute_sets(sets, cwd), "grid": plan.grid,
            "equal_flops": plan.budget, "then": [str(Path(cwd, t.path).resolve()) for t in then],
            "runs_dir": str(Path(cwd, runs_dir).resolve())}
    text = config_path.read_text(encoding="utf-8")
    then_text = [t.path.read_text(encoding="utf-8") for t in then]
    items: list[dict] = []
    for p in plan.points:
        head = len(items)
        # run names as train will check them: one printable line, cut to MAX_NAME (a long grid's labels)
        items.append({"label": p.label, "point": p.values, "stage": p.cfg.stage,
                      "config_name": config_name, "config_text": text,
                      "sets": _named(p.sets, safe_name(f"{name} · {p.label}")), "runs_dir": runs_dir, "cwd": cwd})
        for t, t_text in zip(then, then_text):
            stem = Path(t.given).stem
            items.append({"label": f"{p.label} → {stem}", "point": p.values,
                          "stage": t.stage, "config_name": t.given, "config_text": t_text,
                          "sets": [f"name={safe_name(f'{name} · {p.label} · {stem}')}"], "runs_dir": runs_dir,
                          "cwd": cwd, "after": head})
    sweep_id = queue.create_sweep(name, spec)  # only once every entry is built: nothing half-queued
    for it in items:
        it["sweep_id"] = sweep_id
    return sweep_id, queue.add(items)


def _named(sets: list[str], name: str) -> list[str]:
    """A run's --set items with its name first, unless they name it already."""
    return sets if any(s.split("=", 1)[0].strip() == "name" for s in sets) else [f"name={name}", *sets]


# -- one request, from the command line or the studio --------------------------------------------------


@dataclass
class SweepRequest:
    """One ``mediswift sweep`` as given: CONFIG and the --grid, --set, --then items as typed, the budget as
    text. Relative paths mean what they mean from this process's working directory, as on the command line."""
    config: str                                         # CONFIG: a TOML file or a preset name
    grid: list[str]                                     # --grid KEY=V1,V2,…
    sets: list[str] = field(default_factory=list)       # --set KEY=VALUE
    equal_flops: str | None = None                      # --equal-flops BUDGET
    name: str | None = None                             # --name
    then: list[str] = field(default_factory=list)       # --then CONFIG
    parallel: int | None = None                         # --parallel (None: as the queue is)
    runs_dir: str | None = None                         # --runs-dir (None: next to the database)


@dataclass
class PreparedSweep:
    """A request checked whole and planned: what ``submit_sweep`` queues. Nothing is written yet."""
    request: SweepRequest
    plan: Plan
    config_path: Path
    then: list[Then]
    name: str
    runs_dir: str
    cwd: str


def config_path(given: str, key: str) -> Path:
    """A config file named as on the command line (a path or a preset name), absolute; InputError if none."""
    path = resolve_preset(given)
    if not path.is_file():
        raise InputError(f"config file not found: {given} (presets: {', '.join(list_presets())})", key=key,
                         path=str(path))
    return path.resolve()


def prepare_sweep(db: RunDB, req: SweepRequest) -> PreparedSweep:
    """Every check ``mediswift sweep`` makes before it writes, in its order, and the plan: InputError on the
    first problem, with nothing written."""
    path = config_path(req.config, "config")
    if req.parallel is not None:
        check_parallel(req.parallel)
    if req.name is not None:
        check_sweep_name(req.name)
    plan = plan_sweep(path, req.sets, req.grid, req.equal_flops, parent_vocab(db, req.sets))
    check_parents(db, plan)
    then_paths = [(config_path(c, "then"), c) for c in req.then]  # every file found, then each checked
    then = [check_then(p, given) for p, given in then_paths]
    runs_dir = str(Path(req.runs_dir).expanduser().resolve() if req.runs_dir else default_runs_dir(db.path))
    return PreparedSweep(req, plan, path, then, req.name or default_name(plan, path), runs_dir, os.getcwd())


def submit_sweep(queue: Queue, prepared: PreparedSweep) -> tuple[str, list[int]]:
    """Queue a prepared sweep (and set the queue's parallelism if it asked): its id and entry ids."""
    req = prepared.request
    out = queue_sweep(queue, prepared.plan, prepared.name, prepared.config_path, str(req.config), req.sets,
                      prepared.then, prepared.runs_dir, prepared.cwd)
    if req.parallel is not None:
        queue.set_parallel(req.parallel)
    return out
