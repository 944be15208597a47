"""From a run id to what it trained: the one place that resolves run → checkpoint → tokenizer → model.

Every command and stage that starts from an existing run goes through here: a fine-tuning or
prompting stage resolving its parent, a pre-training reusing a parent's vocabulary, ``eval``,
``inspect`` and ``export-hf``. A run's model is its newest intact checkpoint, or, for a fine-tuning or
prompting run that kept its best evaluation's checkpoint (train.epochs, train.early_stopping_patience),
that one (``model_checkpoint``); resuming continues from the newest. A soft-prompt run owns no model weights: its model is the parent checkpoint
it recorded when it started (the parent may have trained on since), its prompt and (with
``task.head = "classifier"``) its classification head come from its own checkpoint. A child run without a
tokenizer of its own uses its nearest ancestor's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from engine.core.config import ModelConfig, RunConfig, from_dict
from engine.core.registry import IMPORT, PRETRAIN, PROMPT, TASK_STAGES, VOCAB, stage
from engine.core.errors import InputError
from engine.store.queries import find_run
from engine.store.rundb import RunDB
from engine.data.vocab import TOKENIZER_FILE, load_tokenizer
from engine.model.checkpoint import current_path, file_sha256, is_legacy, load_checkpoint
from engine.model.classifier import head_from_state
from engine.model.gpt import GPT
from engine.model.soft_prompt import TENSOR, SoftPrompt



@dataclass(frozen=True)
class RunRef:
    """A run found in the database, with the files it stands on (nothing loaded yet)."""
    run: dict                 # the run's database row
    checkpoint: Path | None   # the checkpoint its model is taken from (model_checkpoint; None: a vocabulary run)
    tokenizer: Path           # its tokenizer.json, or the nearest ancestor's

    @property
    def id(self) -> str:
        return self.run["id"]

    @property
    def stage(self) -> str:
        return self.run["stage"]

    @property
    def model_config(self) -> ModelConfig:
        """The model shape the run was configured with (its database config; no file read)."""
        return ModelConfig(**self.run["config"]["model"])

    def tokenizer_object(self):
        return load_tokenizer(self.tokenizer)


def tokenizer_path(db: RunDB, run: dict, key: str = "run_id") -> Path:
    """The run's own tokenizer, else the nearest ancestor's (children reuse their parent's vocabulary)."""
    seen: set[str] = set()
    row: dict | None = run
    while row is not None and row["id"] not in seen:
        seen.add(row["id"])
        p = Path(row.get("run_dir") or "") / TOKENIZER_FILE
        if row.get("run_dir") and p.is_file():
            return p
        row = db.get_run(row["parent_id"]) if row.get("parent_id") else None
    where = Path(run.get("run_dir") or "?") / TOKENIZER_FILE
    raise InputError(f"run {run['id']} has no tokenizer ({where}), nor has any of its ancestors", key=key, path=str(where))


def _stderr_warning(message: str) -> None:
    sys.stderr.write(f"mediswift: warning: {message}\n")
    sys.stderr.flush()


# files this process has hashed and found intact, by (path, size, mtime): starting a fine-tune resolves
# its parent three times (pre-checks, child config, the stage), and a checkpoint may be gigabytes
_VERIFIED: set[tuple] = set()


def checkpoint_problem(row: dict) -> str | None:
    """Why a checkpoint row's file cannot be used (missing, wrong size, wrong hash), or None."""
    path = Path(row["path"])
    if not path.is_file():
        return f"checkpoint {path} is missing"
    st = path.stat()
    if row.get("bytes") is not None and st.st_size != row["bytes"]:
        return f"checkpoint {path} is damaged ({st.st_size:,} bytes, {row['bytes']:,} were written)"
    seen = (str(path), st.st_size, st.st_mtime_ns, row.get("sha256"))
    if row.get("sha256") and seen not in _VERIFIED:
        if file_sha256(path) != row["sha256"]:
            return f"checkpoint {path} is damaged (its SHA-256 differs from the one recorded when it was written)"
        _VERIFIED.add(seen)
    return None


def good_checkpoint(db: RunDB, run_id: str, warn=_stderr_warning) -> Path | None:
    """The newest checkpoint of the run whose file is intact; each damaged newer one is named in a warning."""
    for row in reversed(db.checkpoints(run_id)):
        problem = checkpoint_problem(row)
        if problem is None:
            return Path(row["path"])
        warn(problem + "; trying the one before it")
    return None


def model_checkpoint(db: RunDB, row: dict, warn=_stderr_warning) -> Path | None:
    """The checkpoint a run's model is taken from (eval, export, inspect, a child run): the best
    evaluation's, recorded in the run's meta as ``best_checkpoint`` by a fine-tuning or prompting run
    that kept it, when intact; otherwise the newest intact one (good_checkpoint)."""
    best = (row.get("meta") or {}).get("best_checkpoint") or {}
    if row["stage"] in TASK_STAGES and best.get("step") is not None:
        for r in reversed(db.checkpoints(row["id"])):
            if r["step"] == best["step"]:
                problem = checkpoint_problem(r)
                if problem is None:
                    return Path(r["path"])
                warn(problem + "; using the newest intact checkpoint instead of the best evaluation's")
                break
    return good_checkpoint(db, row["id"], warn)


def resolve_run(db: RunDB, run_id: str, key: str = "run_id", what: str = "run", need_checkpoint: bool = True,
                warn=_stderr_warning) -> RunRef:
    """Find a run and its files; raises InputError naming ``key`` when something is missing."""
    row = find_run(db, run_id, key, what)
    ck = None
    if row["stage"] != VOCAB:
        ck = model_checkpoint(db, row, warn)
        if ck is None and need_checkpoint:
            raise InputError(f"{what} {row['id']} has no intact checkpoint file to start from", key=key)
    elif need_checkpoint:
        raise InputError(f"{what} {row['id']} is a vocabulary run: it has no model weights", key=key)
    return RunRef(row, ck, tokenizer_path(db, row, key))


def check_parent(db: RunDB, cfg: RunConfig) -> RunRef | None:
    """The parent of a run about to start, checked against the stage: fine-tuning and prompting need a
    model (a pre-training or fine-tuning run with a checkpoint); a pre-training reuses a vocabulary or
    pre-training run's tokenizer. None when the config names no parent."""
    if not cfg.parent:
        return None
    row = find_run(db, cfg.parent, "parent", "parent run")
    spec = stage(cfg.stage)
    if spec.needs_parent:
        if row["stage"] not in spec.parents:  # a run whose checkpoint holds a model to start from
            raise InputError(f"parent run {row['id']} is a {row['stage']} run; {cfg.stage} needs a pre-training "
                             f"or fine-tuning run (a model checkpoint) as parent", key="parent")
        ref = resolve_run(db, row["id"], "parent", "parent run")
        if is_legacy(ref.checkpoint):  # refused before the child's run row exists
            raise InputError(f"the parent checkpoint {ref.checkpoint} is of an earlier version (a pickle); convert it "
                             f"with `mediswift migrate-checkpoints {row['id']}` if you trust it", key="parent",
                             path=str(ref.checkpoint))
        return ref
    if row["stage"] == IMPORT:  # sparse continued pre-training of an imported model: its weights and tokenizer
        return resolve_run(db, row["id"], "parent", "parent run")
    if row["stage"] not in (VOCAB, PRETRAIN):
        raise InputError(f"parent run {row['id']} is a {row['stage']} run; a {cfg.stage} run can only reuse a "
                         "vocabulary or pre-training run's tokenizer, or continue an imported model", key="parent")
    return resolve_run(db, row["id"], "parent", "parent run", need_checkpoint=False)


def model_source(db: RunDB, ref: RunRef, key: str = "run_id", state: dict | None = None) -> tuple[dict, Path]:
    """The run whose weights ``ref`` uses and the checkpoint file holding them: the run itself, or for
    a prompt run its parent and the parent checkpoint the prompt was trained on. ``state``: the run's
    own checkpoint, when the caller has loaded it already."""
    if ref.stage != PROMPT:
        if ref.checkpoint is None:
            what = "is a vocabulary run: it has" if ref.stage == VOCAB else "has no checkpoint file:"
            raise InputError(f"run {ref.id} {what} no model weights", key=key)
        return ref.run, ref.checkpoint
    parent = find_run(db, ref.run.get("parent_id") or "", key, f"parent of prompt run {ref.id}")
    if state is None and ref.checkpoint:
        state = load_checkpoint(ref.checkpoint)
    recorded = state.get("parent_checkpoint") if state else None
    if recorded and current_path(recorded).is_file():
        return parent, current_path(recorded)
    if recorded:
        raise InputError(f"prompt run {ref.id} refers to a parent checkpoint that is gone: {recorded}", key=key, path=recorded)
    return parent, resolve_run(db, parent["id"], key, "parent run").checkpoint


# -- loading what a run trained -------------------------------------------------------------------


@dataclass
class RunModel:
    """A run rebuilt for scoring or export: model (+ soft prompt, + classification head) and tokenizer."""
    ref: RunRef
    cfg: RunConfig            # the run's config, as its checkpoint recorded it
    step: int
    vocab_size: int
    model: GPT
    tok: object
    prompt: nn.Module | None
    head: nn.Module | None
    state: dict               # the checkpoint holding the weights (the parent's, for a prompt run)
    # (prompt and head come from the run's own checkpoint: for a prompt run, not from ``state``)
    parent_checkpoint: str | None  # the model the run started from (the zero-shot baseline)

    @property
    def run_id(self) -> str:
        return self.ref.id

    @property
    def stage(self) -> str:
        return self.ref.stage


def build_model(model_cfg: ModelConfig, vocab_size: int, state: dict, masks: dict | None = None) -> GPT:
    """A GPT in eval mode with ``state`` loaded; masks (if given) installed first, so the layers stay sparse."""
    from engine.model.sparsity import load_masks

    model = GPT(model_cfg, vocab_size)
    if masks:
        load_masks(model, masks)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
        raise InputError(f"checkpoint does not match the model shape (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model


def load_run(db: RunDB, run_id: str, key: str = "run_id") -> RunModel:
    ref = resolve_run(db, run_id, key)
    ck = load_checkpoint(ref.checkpoint)
    cfg = from_dict(ck["config"])
    tok = ref.tokenizer_object()
    if tok.get_vocab_size() != ck["vocab_size"]:
        raise InputError(f"tokenizer mismatch: {ref.tokenizer} has {tok.get_vocab_size()} tokens, the checkpoint "
                         f"{ck['vocab_size']}", key=key, path=str(ref.tokenizer))
    prompt = None
    parent_ck = str(current_path(ck["parent_checkpoint"])) if ck.get("parent_checkpoint") else None
    state = ck
    if ck.get("stage", cfg.stage) == PROMPT:
        _, source = model_source(db, ref, key, ck)
        state = load_checkpoint(source)
        prompt = SoftPrompt(*ck[TENSOR].shape)
        prompt.weight.data.copy_(ck[TENSOR])
    # the head is the run's own: a prompt run's (trained with its prompt, in the prompt run's checkpoint),
    # never its parent's, which the prompt run did not use
    model = build_model(cfg.model, ck["vocab_size"], state["model"])
    return RunModel(ref, cfg, int(ck["step"]), int(ck["vocab_size"]), model, tok, prompt, load_head(ck.get("head")),
                    state, parent_ck)


def load_head(state: dict | None) -> nn.Module | None:
    """The classification head a checkpoint saved (engine.model.classifier: pooled, with its decision
    thresholds; or an earlier version's linear layer over the last token), in eval mode; None without one."""
    if not state:
        return None
    return head_from_state(state).eval()
