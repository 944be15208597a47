"""Pre-flight: what in a valid configuration is probably not what the user meant. Warnings only; the run
may still start (a file may appear before launch, a long warm-up may be the point of the experiment).

Each warning is keyed by the field it is about, so the form shows it under that field.
"""
from __future__ import annotations

from pathlib import Path

from engine.core.config import RunConfig
from engine.core.registry import STAGES, TASK_STAGES, task, task_fields

WARMUP_SHARE = 0.5  # a warm-up this share of the run or more leaves little of the schedule at its peak
TASK_FILES = ("task.train", "task.dev", "task.splits")


def _missing(spec: str, base: Path) -> bool:
    p = Path(spec).expanduser()
    return not (p if p.is_absolute() else base / p).exists()


def missing_files(cfg: RunConfig, base: Path) -> dict[str, str]:
    """Corpus entries and task files the run reads that are not there (relative paths from ``base``)."""
    out: dict[str, str] = {}
    spec = STAGES[cfg.stage]
    task_stage = cfg.stage in TASK_STAGES
    reads_corpus = spec.reads_corpus or (task_stage and not task(cfg.task.name).labelled)
    if reads_corpus:
        gone = [c for c in cfg.data.corpus if not c.startswith("builtin:") and _missing(c, base)]
        if gone:
            out["data.corpus"] = "not found: " + ", ".join(gone)
    if task_stage:
        fields = task_fields()
        for key in TASK_FILES:
            if cfg.task.name not in fields.get(key, ()):
                continue
            value = getattr(cfg.task, key.split(".", 1)[1])
            if value and _missing(value, base):
                out[key] = f"file not found: {value}"
            elif not value and key == "task.train":
                out[key] = f"no training file chosen: {task(cfg.task.name).label} reads its examples from one"
    return out


def schedule_warnings(cfg: RunConfig) -> dict[str, str]:
    """Evaluation, checkpoints and warm-up against the run's length in steps (a run counted in epochs has
    its length only once its examples are read, and evaluates once per epoch)."""
    tc, out = cfg.train, {}
    if not STAGES[cfg.stage].trains or (tc.epochs and cfg.stage in TASK_STAGES):
        return out
    steps = tc.max_steps
    if tc.eval_every > steps:
        out["train.eval_every"] = (f"train.eval_every ({tc.eval_every:,}) is beyond train.max_steps ({steps:,}): "
                                   "the run is validated only at its end")
    if tc.checkpoint_every > steps:
        out["train.checkpoint_every"] = (f"train.checkpoint_every ({tc.checkpoint_every:,}) is beyond train.max_steps "
                                         f"({steps:,}): the only checkpoint is the final one")
    if tc.warmup_steps >= WARMUP_SHARE * steps:
        share = min(tc.warmup_steps / steps, 1.0)
        out["train.warmup_steps"] = (f"warm-up takes {100 * share:.0f} % of the run ({min(tc.warmup_steps, steps):,} "
                                     f"of {steps:,} steps): the learning rate peaks late")
    return out


def preflight(cfg: RunConfig, base: Path | None = None) -> dict[str, str]:
    """Every warning for ``cfg``, by field key."""
    return {**missing_files(cfg, Path(base) if base else Path.cwd()), **schedule_warnings(cfg)}
