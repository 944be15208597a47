"""Names and colours the views share: stages, config sections and tasks as the registry labels them,
status colours, the run palette, short names for the pipeline line. No widgets.

Stage and task names come from ``engine.core.registry`` (its constants and specs), never as literals,
so a stage or task added there shows here without an edit.
"""
from __future__ import annotations

from engine.core.registry import (
    FINETUNE, HOC, LM, PRETRAIN, PROMPT, PUBMEDQA, SECTION_LABELS, STAGES, TASKS, VOCAB, stage, stage_label,
)

# stage -> label ("Sparse pre-training"), in the registry's order (the form's combo, the browser's filter)
STAGE_LABELS: dict[str, str] = {name: spec.label for name, spec in STAGES.items()}
SECTION_TITLES: dict[str, str] = dict(SECTION_LABELS)
STATUSES = ("running", "paused", "completed", "stopped", "failed", "crashed", "created")
STATUS_COLORS = {"running": "#2e7d32", "paused": "#b8860b", "completed": "#1f77b4", "stopped": "#555",
                 "failed": "#c9302c", "crashed": "#c9302c", "created": "#555", "starting": "#555"}
STATUS_MARKS = {"running": "▶ ", "paused": "⏸ ", "crashed": "✖ ", "failed": "✖ "}  # a run's tab title
# colour-blind-friendly, distinguishable on white (Okabe–Ito, then Tableau): a run's colour in Compare and Study
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B", "#7F7F7F",
           "#BCBD22", "#17BECF", "#9467BD")

# the pipeline line of the runs browser (vocab → sparse → dense → prompt) and the study's score ticks;
# a stage missing here shows as its name
STAGE_SHORT = {PRETRAIN: "sparse", FINETUNE: "dense"}
STAGE_TICK = {FINETUNE: "ft"}
# a task's short name in a score text ("PubMedQA acc 0.620"); the registry's label otherwise
TASK_SHORT = {PUBMEDQA: "PubMedQA", HOC: "HoC", LM: "LM"}
# the metrics a task's score text shows, the first one decides "best" (the registry's answer metric)
SCORE_METRICS = {PUBMEDQA: ("accuracy", "macro_f1"), HOC: ("micro_f1",), LM: ("loss",)}
METRIC_LABELS = {"accuracy": "acc", "macro_f1": "macro-F1", "micro_f1": "micro-F1", "loss": "val loss"}
# the baselines an evaluation is stored with (its ``baselines`` JSON, the run meta's ``baselines``), as the views
# name them: the majority class, TF-IDF + logistic regression fitted on the training split (engine.tasks.text_baseline),
# the parent scored without training
MAJORITY, TFIDF, ZERO_SHOT = "majority", "tfidf_lr", "zero_shot"
BASELINE_LABELS = {MAJORITY: "majority", TFIDF: "TF-IDF", ZERO_SHOT: "zero-shot"}


def stage_text(name: str) -> str:
    """A stage's label; an unknown name (a newer database) as itself."""
    return stage_label(name)


def stage_short(name: str) -> str:
    return STAGE_SHORT.get(name, name)


def stage_tick(name: str) -> str:
    return STAGE_TICK.get(name, name)


def task_short(name: str) -> str:
    return TASK_SHORT.get(name) or (TASKS[name].label if name in TASKS else name)


def score_metrics(task: str) -> tuple[str, ...]:
    """The metrics a task's score shows, the deciding one first (the registry's answer metric)."""
    if task in SCORE_METRICS:
        return SCORE_METRICS[task]
    return (TASKS[task].answer_metric,) if task in TASKS else ()


def hidden_sections(stage_name: str) -> set[str]:
    """Config sections a stage does not read: the form hides them."""
    spec = STAGES.get(stage_name)
    return set(SECTION_LABELS) - set(spec.sections) if spec else set()


def parent_stages(stage_name: str) -> tuple[str, ...]:
    """Stages a run of this stage may start from, the usual one first."""
    spec = STAGES.get(stage_name)
    return spec.parents if spec else ()


def exports_model(stage_name: str) -> bool:
    """Whether a run of this stage has a model to export (a vocabulary run has none)."""
    return stage_name != VOCAB


def is_sparse_stage(stage_name: str) -> bool:
    """Sparse pre-training: its sparsity level is worth naming (legends, parent pickers)."""
    return stage_name == PRETRAIN


def is_task_stage(stage_name: str) -> bool:
    """A stage that trains on a task (fine-tuning, soft prompting): its task is worth naming."""
    return stage_name in STAGES and "task" in stage(stage_name).sections


def is_prompt_stage(stage_name: str) -> bool:
    return stage_name == PROMPT
