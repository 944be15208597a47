"""What a stage and a task are: the one table the engine, the CLI, ``config-keys`` and the studio read.

Ground floor (no torch, no Qt). A stage or task name is written as a string here and in its own
module only; everything else asks this registry by capability (``holds_model``, ``reads_corpus``,
``takes_parent_shape``, ...) or uses the names exported below. Adding a stage or a task is one entry
in ``STAGES`` or ``TASKS`` plus the module it names.

``impl`` is ``"module:attribute"`` and is imported only by the layer that runs it (``engine.train``
for stages, ``engine.tasks`` for tasks), so this table stays importable by the studio.
"""
from __future__ import annotations

from dataclasses import dataclass

# The names, for code that must name one stage or task (a soft-prompt run owns no weights, ...).
VOCAB, PRETRAIN, FINETUNE, PROMPT, IMPORT = "vocab", "pretrain", "finetune", "prompt", "import"
LM, PUBMEDQA, HOC = "lm", "pubmedqa", "hoc"

# config sections, as the form groups them (label shown to users)
SECTION_LABELS: dict[str, str] = {
    "model": "Model", "tokenizer": "Tokenizer", "data": "Data", "sparsity": "Sparsity",
    "train": "Training", "task": "Task (fine-tuning and prompting)", "prompt": "Soft prompt",
}


@dataclass(frozen=True)
class StageSpec:
    name: str
    label: str
    sections: tuple[str, ...]        # config sections this stage reads (the form hides the others)
    parents: tuple[str, ...] = ()    # stages a run may start from, the usual one first
    needs_parent: bool = False       # a run of this stage cannot start without a parent
    startable: bool = True           # `mediswift train` can start it (an import is made by import-hf)
    trains: bool = True              # runs the training loop (a vocabulary is learned in one pass)
    holds_model: bool = False        # its checkpoints hold a whole model to start from
    takes_parent_shape: bool = False  # the model's shape comes from the parent, not the config
    reads_corpus: bool = False       # reads data.corpus (checked before a run row exists)
    shards: bool = True              # FSDP can shard what it trains
    impl: str = ""                   # "module:attribute" of the stage class (or function, for vocab)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    label: str
    impl: str                        # the task's module
    headline: tuple[str, ...]        # the metrics worth a summary entry, the first one decides "best"
    fields: tuple[str, ...] = ()     # task.* keys that mean something for this task (the form shows these)
    labelled: bool = True            # reads labelled train/dev files (lm reads the corpus)
    answer_metric: str = "loss"      # what the studio's score column shows


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec(VOCAB, "Vocabulary", ("tokenizer", "data"), trains=False, reads_corpus=True,
              impl="engine.train.pretrain:run_vocab"),
    StageSpec(PRETRAIN, "Sparse pre-training", ("model", "tokenizer", "data", "sparsity", "train"),
              parents=(VOCAB, PRETRAIN, IMPORT), holds_model=True, reads_corpus=True,
              impl="engine.train.pretrain:PretrainStage"),
    StageSpec(FINETUNE, "Dense fine-tuning", ("model", "data", "train", "task"),
              parents=(PRETRAIN, FINETUNE, IMPORT), needs_parent=True, holds_model=True, takes_parent_shape=True,
              impl="engine.train.finetune:FinetuneStage"),
    StageSpec(PROMPT, "Soft prompting", ("model", "data", "train", "task", "prompt"),
              parents=(FINETUNE, PRETRAIN, IMPORT), needs_parent=True, takes_parent_shape=True, shards=False,
              impl="engine.train.prompt:PromptStage"),
    StageSpec(IMPORT, "Imported model", (), startable=False, trains=False, holds_model=True),
)}

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec(LM, "Causal LM on the corpus", "engine.tasks.lm", ("loss", "perplexity"), labelled=False),
    TaskSpec(PUBMEDQA, "PubMedQA (yes/no/maybe)", "engine.tasks.pubmedqa", ("accuracy", "macro_f1", "loss"),
             fields=("task.train", "task.dev", "task.splits", "task.fold", "task.predict", "task.scoring", "task.head",
                     "task.pooling"),
             answer_metric="accuracy"),
    TaskSpec(HOC, "HoC (10 hallmarks, multi-label)", "engine.tasks.hoc", ("micro_f1", "macro_f1", "loss"),
             fields=("task.train", "task.dev", "task.head", "task.pooling"), answer_metric="micro_f1"),
)}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
STARTABLE_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.startable)
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
MODEL_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.holds_model)
LABELLED_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.labelled)
TASK_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if "task" in s.sections)  # train on task.*
CORPUS_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.reads_corpus)
SPARSE_STAGES: tuple[str, ...] = tuple(n for n, s in STAGES.items() if "sparsity" in s.sections)  # train sparse


def stage(name: str) -> StageSpec:
    """The stage called ``name``; a name no stage has is a KeyError (validated configs never have one)."""
    return STAGES[name]


def shape_from_parent(name: str, parent_stage: str | None) -> bool:
    """Whether a run of stage ``name`` takes its model shape from a parent of ``parent_stage``: a stage
    that always does (fine-tuning, prompting), and a pre-training that continues an imported model."""
    spec = STAGES.get(name)
    return bool(spec and (spec.takes_parent_shape or (name == PRETRAIN and parent_stage == IMPORT)))


def task(name: str) -> TaskSpec:
    return TASKS[name]


def stage_label(name: str) -> str:
    spec = STAGES.get(name)
    return spec.label if spec else name


def task_fields() -> dict[str, tuple[str, ...]]:
    """task.* key -> the tasks it means something for (keys no task lists apply to every task)."""
    out: dict[str, list[str]] = {}
    for t in TASKS.values():
        for key in t.fields:
            out.setdefault(key, []).append(t.name)
    return {k: tuple(v) for k, v in out.items()}


def load_impl(ref: str):
    """The object ``"module:attribute"`` names (or the module, without an attribute)."""
    import importlib

    module, _, attr = ref.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod
