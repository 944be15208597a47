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

import errno
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core import registry
from engine.core.config import RunConfig, from_dict
from engine.core.errors import FileSystemError, InputError
from engine.core.paths import default_runs_dir
from engine.data.corpus import check_corpus_spec
from engine.model.checkpoint import load_checkpoint
from engine.model.runs import RunRef, check_parent, good_checkpoint
from engine.store.rundb import RunDB
from engine.tasks import get_task
from engine.tasks.base import Encoder, ExampleLoader
from engine.train.child import child_config
from engine.core.machine_checks import available_memory
from engine.train.estimate import StepShape, estimate
from engine.train.group import check_group, world_size
from engine.train.identity import continues_import
from engine.train.metrics import check_reporters
from engine.train.precision import Precision, choose_precision
from engine.train.request import ReadRequest, RunRequest, in_group, read_request
from engine.train.runtime import resolve_device


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


def prepare_run(request: RunRequest, db: RunDB, read: ReadRequest | None = None) -> RunPlan:
    """``read``: what ``read_request`` already returned for this request (the CLI checks it before torch loads)."""
    worker = in_group()  # a process of a torchrun group a user started: its group is checked already
    read = read or read_request(request, db, check_status=not worker)
    overrides, explicit = read.overrides, set(read.explicit)
    notes: tuple[str, ...] = ()
    resume = None
    if read.row is not None:
        cfg, resume, note = _resume(db, read.row, overrides)
        notes = (note,) if note else ()
    else:
        cfg = read.cfg
    spec = registry.stage(cfg.stage)
    parent, precision = check_inputs(cfg, db)
    if spec.takes_parent_shape or continues_import(cfg, parent):
        # the model shape comes from the parent; only an explicitly given model.n_ctx is honoured
        cfg = child_config(cfg, parent, explicit, resuming=resume is not None)
    # (a worker of a user's own torchrun counts its group's processes)
    cfg, more = run_length(cfg, explicit, int(os.environ.get("WORLD_SIZE", world_size(cfg))) if worker else None)
    notes += more
    if not worker:
        check_group(cfg, resuming=resume is not None)
        if spec.trains and not request.ignore_memory_check:
            check_memory(cfg, parent)
    runs_dir = Path(request.runs_dir) if request.runs_dir else default_runs_dir(db.path)
    if resume is not None:  # its checkpoints go to its own folder
        check_writable_folder(Path((db.get_run(resume.run_id) or {}).get("run_dir") or runs_dir))
    else:
        check_writable_folder(runs_dir)
    return RunPlan(cfg, str(db.path), str(runs_dir), world=world_size(cfg) if spec.trains else 1,
                   precision=precision, parent=parent, resume=resume, notes=notes)


def check_writable_folder(folder: Path) -> None:
    """The folder run folders (or a resumed run's checkpoints) go to can be written: it, or the
    nearest folder above it that exists, takes a new file (created and removed at once: a read-only or
    immutable folder, a read-only file system). A file in its place, or where a folder above it
    should be, is refused too. FileSystemError naming the folder and the errno; nothing is left."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link where the folder goes
            raise FileSystemError(errno.ENOENT, probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise FileSystemError(errno.ENOTDIR, folder)  # it, or a folder above it, is a file
    try:
        fd, name = tempfile.mkstemp(prefix=".mediswift-write-check-", dir=probe)
    except OSError as e:
        raise FileSystemError.of(e, folder) from None
    os.close(fd)
    os.unlink(name)


def _resume(db: RunDB, row: dict, overrides: dict) -> tuple[RunConfig, Resume, str | None]:
    """The stored config with ``overrides`` and the checkpoint to continue from (``row`` passed read_request)."""
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
        check_corpus_spec(cfg.data.corpus, cfg.data.text_field)  # every source opened, its first records read
    parent = check_parent(db, cfg)
    if not spec.trains:
        return parent, None
    check_reporters(cfg.train.report_to)
    return parent, choose_precision(cfg.train.precision, _device(cfg.train.device))  # fp16 on a CPU, say


def check_task_data(cfg: RunConfig) -> int | None:
    """A fine-tuning or prompting run's labelled files, read once before the run exists: neither the
    training nor the development examples may be empty, and every label of the development data
    (each hallmark of a multi-label task, each class of a single-label one) must occur in the
    training data, or the run could never learn what it is scored on. Returns the number of training
    examples the run uses (after task.max_examples); None for a run without labelled task data."""
    if cfg.stage not in registry.TASK_STAGES or not registry.task(cfg.task.name).labelled:
        return None
    tc = cfg.task
    task = get_task(tc.name)
    train, dev, _ = task.train_dev(tc, cfg.data.val_fraction, cfg.train.seed, lambda m: None)
    dev_from = f"the development file {tc.dev}" if tc.dev else "the development split"
    if not train:
        raise InputError(f"{tc.name}: the training data ({tc.train}) holds no examples", key="task.train",
                         path=tc.train)
    if not dev:
        raise InputError(f"{tc.name}: {dev_from} holds no examples", key="task.dev" if tc.dev else "task.train",
                         path=tc.dev or tc.train)
    seen = set().union(*(_labels(e.label) for e in train))
    missing = sorted(set().union(*(_labels(e.label) for e in dev)) - seen)
    if missing:
        names = ", ".join(repr(task.CLASSES[i]) for i in missing)
        word = (("label", "labels") if task.MULTI_LABEL else ("class", "classes"))[len(missing) > 1]
        raise InputError(f"{tc.name}: {dev_from} has the {word} {names}, which no training example has ({tc.train}); "
                         f"the run could not learn to predict {'them' if len(missing) > 1 else 'it'}",
                         key="task.dev" if tc.dev else "task.train", path=tc.dev or tc.train)
    return min(len(train), tc.max_examples) if tc.max_examples else len(train)


def _labels(label) -> set[int]:
    """A label as a set of class indices: a multi-label example's tuple, a single-label example's int."""
    return set(label) if isinstance(label, (tuple, list, set, frozenset)) else {int(label)}


def run_length(cfg: RunConfig, explicit: set[str], world: int | None = None) -> tuple[RunConfig, tuple[str, ...]]:
    """The run's length as ``mediswift train`` counts it (``mediswift estimate`` too): train.epochs x
    steps per epoch from the task's training examples where epochs count (``epoch_steps``), else
    train.max_steps (``steps_or_epochs``); the task's files are checked on the way (``check_task_data``).
    ``explicit``: the keys given with --set; ``world``: the processes (default: the config's)."""
    cfg, note = steps_or_epochs(cfg, explicit)
    notes = (note,) if note else ()
    n_train = check_task_data(cfg)
    if cfg.train.epochs:
        cfg, note = epoch_steps(cfg, n_train, world_size(cfg) if world is None else world, explicit)
        notes += (note,)
    return cfg, notes


def estimate_config(cfg: RunConfig, db: RunDB | None, explicit: set[str]) -> tuple[RunConfig, StepShape | None, tuple[str, ...]]:
    """``mediswift estimate``: the config as ``prepare_run`` would run it (a child run's model shape
    from its parent, the length from train.epochs) and what its micro-batches hold (``step_shape``).
    A parent the database does not hold (or no database) leaves the config's own model shape and one
    window per example, said in the notes, rather than no estimate at all."""
    notes: tuple[str, ...] = ()
    parent = None
    if cfg.parent:
        try:
            if db is None:
                raise InputError("no run database", key="parent")
            parent = check_parent(db, cfg)
        except InputError as e:
            notes += (f"parent {cfg.parent}: {e}; estimated with the config's model shape"
                      + (" and one window per example" if _windowed(cfg) else ""),)
    if parent is not None and (registry.stage(cfg.stage).takes_parent_shape or continues_import(cfg, parent)):
        cfg = child_config(cfg, parent, explicit)
    cfg, more = run_length(cfg, explicit)
    return cfg, step_shape(cfg, parent), notes + more


def _windowed(cfg: RunConfig) -> bool:
    """A run whose examples are read in windows: a classification head on a labelled task."""
    return (cfg.stage in registry.TASK_STAGES and registry.task(cfg.task.name).labelled
            and cfg.task.head == "classifier")


def step_shape(cfg: RunConfig, parent: RunRef | None) -> StepShape | None:
    """What the micro-batches of a run with a classification head hold: each example is every window of
    it (engine.tasks.base.Encoder.windows with the parent's tokenizer at the run's n_ctx), and the run's
    own batch order (ExampleLoader, the same seed) is replayed over every micro-batch of the run (train.max_steps x
    grad_accum x processes), so the largest micro-batch and the tokens are the ones the run will
    build. None where a micro-batch is batch_size sequences of at most n_ctx tokens."""
    if parent is None or not _windowed(cfg):
        return None
    tc = cfg.train
    train, _, _ = get_task(cfg.task.name).train_dev(cfg.task, cfg.data.val_fraction, tc.seed, lambda m: None)
    if cfg.task.max_examples:
        train = train[:cfg.task.max_examples]
    enc = Encoder(parent.tokenizer_object(), cfg.model.n_ctx)
    lengths = [[len(w) for w in enc.windows(ex)] for ex in train]
    order = ExampleLoader(len(train), tc.batch_size, tc.seed)  # unsharded: every process's batches in turn
    n_micro = tc.max_steps * tc.grad_accum * world_size(cfg)
    peak_rows = peak_tokens = tokens = 0
    for _ in range(n_micro):
        rows = [n for i in order.next_indices() for n in lengths[i]]
        positions = len(rows) * max(rows)  # right-padded to the batch's longest window
        tokens += positions
        if positions > peak_tokens or (positions == peak_tokens and len(rows) > peak_rows):
            peak_rows, peak_tokens = len(rows), positions
    return StepShape(peak_rows=peak_rows, peak_tokens=peak_tokens, tokens=tokens, micro_batches=n_micro,
                     windows_per_example=sum(map(len, lengths)) / len(lengths), lm_logits=False)


def steps_or_epochs(cfg: RunConfig, explicit: set[str]) -> tuple[RunConfig, str | None]:
    """train.epochs (> 0) decides a run's length, except that a train.max_steps given with --set (a
    quick trial of a by-epochs preset, the studio's form, a sweep's equal FLOPs, a resume trained
    further) turns epochs off for the run; both given is an error."""
    if not cfg.train.epochs or "train.max_steps" not in explicit:
        return cfg, None
    if "train.epochs" in explicit:
        raise InputError(f"give train.epochs ({cfg.train.epochs}) or train.max_steps ({cfg.train.max_steps}), not "
                         "both: epochs derive the steps (train.epochs = 0 counts train.max_steps)", key="train.epochs")
    return cfg.replace({"train.epochs": 0}), (f"train.max_steps = {cfg.train.max_steps} was given: the run counts steps "
                                              f"and train.epochs ({cfg.train.epochs}) is off")


def epoch_steps(cfg: RunConfig, n_train: int | None, world: int, explicit: set[str]) -> tuple[RunConfig, str]:
    """train.epochs > 0 wins over train.max_steps: epochs x ceil(N / (processes x batch_size x
    grad_accum)) steps, an evaluation every epoch; the config records what was derived."""
    tc = cfg.train
    if not n_train:
        raise InputError(f"train.epochs counts passes over a labelled task's training examples "
                         f"({', '.join(registry.LABELLED_TASKS)}); a run on {cfg.task.name} counts train.max_steps",
                         key="train.epochs")
    per_step = world * tc.batch_size * tc.grad_accum
    spe = math.ceil(n_train / per_step)
    steps = tc.epochs * spe
    note = (f"train.epochs = {tc.epochs}: {tc.epochs} x {spe} steps ({n_train} training examples, {per_step} per step) "
            f"= {steps} steps, a development evaluation every epoch"
            + (f" (train.eval_every = {tc.eval_every} as given is replaced)"
               if "train.eval_every" in explicit and tc.eval_every != spe else ""))
    return cfg.replace({"train.max_steps": steps, "train.eval_every": spe}), note


def _device(name: str) -> torch.device:
    """The device rank 0 (or this worker of a user's torchrun) computes on."""
    device = resolve_device(name)
    if device.type == "cuda" and in_group():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_memory(cfg: RunConfig, parent: RunRef | None = None) -> None:
    """A run that cannot fit in this machine's memory is refused before it starts (not an allocation
    traceback); the processes of a group on this machine count together. A classification head's
    micro-batches count every window of their examples, the largest the run will build (``step_shape``)."""
    if cfg.train.device != "cpu" and torch.cuda.is_available():
        return  # GPU memory is another budget; the device itself reports it
    est = estimate(cfg, probe_steps=0, shape=step_shape(cfg, parent))
    need, have = est.get("memory_per_process_bytes", est["memory_bytes"]) * cfg.train.nproc, available_memory()
    if need > 0.9 * have:
        raise InputError(f"the run needs about {need / 2**30:.1f} GiB of memory and this machine has {have / 2**30:.1f} GiB "
                         "available; use a smaller model or train.batch_size (or pass --ignore-memory-check)", key="model")
