"""Scoring a trained run on any file of a task's format (``mediswift eval``): the unseen test sets
included. The result is stored in the run database with the majority, TF-IDF + logistic regression
(``tfidf_lr``, fitted on the run's training split) and zero-shot baselines beside it; a prompt run is
scored as its parent model with the learned prompt in front, a run with a classification head through
that head, with the decision thresholds the run tuned on its development data (a prompt run's head is
its own, from its checkpoint, read behind the prompt: engine.model.runs.load_run). Answer likelihoods
are compared raw or calibrated (``scoring``; default: the run's own ``task.scoring``), the zero-shot
baseline the same way, and the evaluation records which (``"scoring"`` in its metrics)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engine.core import registry
from engine.core.config import TaskConfig
from engine.core.errors import InputError
from engine.model.checkpoint import load_checkpoint
from engine.model.runs import build_model, load_run
from engine.tasks import get_task
from engine.tasks.base import Encoder, Truncation
from engine.tasks.lm import read_tokens
from engine.tasks.scoring import SCORINGS, Scorer, evaluate_examples, majority_baseline, scoring_used
from engine.tasks.text_baseline import NAME as TFIDF, tfidf_lr_baseline


def evaluate_run(db, run_id: str, data: str, task_name: str | None = None, split: str = "all", splits: str | None = None,
                 fold: int = 0, limit: int = 0, batch_size: int = 16, with_baselines: bool = True,
                 predictions: str | None = None, scoring: str | None = None, warn=lambda message: None) -> dict:
    """Score a run on a file and store the evaluation (with its baselines); returns what was stored.

    ``scoring`` (raw, calibrated) is how answer likelihoods are compared; None: the run's own
    ``task.scoring`` when it was trained on this task, else the config default.
    """
    if limit < 0 or batch_size < 1:
        raise InputError("--limit must be 0 (all) or more, --batch-size 1 or more", key="limit" if limit < 0 else "batch_size")
    if scoring is not None and scoring not in SCORINGS:
        raise InputError(f"--scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}", key="scoring")
    rm = load_run(db, run_id)
    cfg = rm.cfg
    name = task_name or (cfg.task.name if cfg.stage in registry.TASK_STAGES else None)
    if name is None:
        raise InputError(f"run {rm.run_id} is a {cfg.stage} run; say which task to score with --task", key="task")
    if rm.head is not None and name != cfg.task.name:
        raise InputError(f"run {rm.run_id} has a {cfg.task.name} classification head; it cannot score {name}", key="task")
    own_task = cfg.stage in registry.TASK_STAGES and cfg.task.name == name
    task, spec = get_task(name), registry.task(name)  # get_task: an unknown name is InputError
    tc = dataclasses.replace(cfg.task, scoring=scoring or (cfg.task.scoring if own_task else TaskConfig().scoring))
    if scoring == "calibrated":
        used = "loss" if not spec.labelled else scoring_used(Scorer(rm.model, head=rm.head), task, tc)
        if used != "calibrated":
            how = {"loss": f"{name} is scored by its loss",
                   "head": f"run {rm.run_id} predicts {name} with a classification head",
                   "generate": f"run {rm.run_id} predicts {name} by greedy generation"
                               + (" (task.predict = 'generate')" if "task.predict" in spec.fields else "")}[used]
            raise InputError(f"--scoring calibrated applies only to answer-likelihood prediction (PubMedQA with "
                             f"task.predict = 'likelihood'), but {how}", key="scoring")
    given, data = data, str(Path(data).expanduser().resolve())
    if not Path(data).exists():
        raise InputError(f"data file not found: {given}", key="data", path=given)
    n_prefix = rm.prompt.weight.shape[0] if rm.prompt is not None else 0
    budget = cfg.model.n_ctx - n_prefix
    scorer = Scorer(rm.model, rm.prompt, rm.head, batch_size=batch_size)
    baselines: dict = {}
    zero_model = None
    if with_baselines and rm.stage == registry.PROMPT and rm.head is None:
        zero_model = rm.model  # a prompt run's model is its frozen parent: zero-shot is the same model, no prompt
    elif with_baselines and rm.stage == registry.FINETUNE and rm.head is None:
        if rm.parent_checkpoint and Path(rm.parent_checkpoint).is_file():
            pck = load_checkpoint(rm.parent_checkpoint)
            zero_model = build_model(cfg.model, pck["vocab_size"], pck["model"])
        else:
            baselines["zero_shot"] = {"skipped": f"the parent checkpoint is gone: {rm.parent_checkpoint}"}
    elif with_baselines and rm.head is not None:
        baselines["zero_shot"] = {"skipped": "a classification head has no zero-shot form"}

    if not spec.labelled:  # the language model on a corpus: scored by its loss on blocks of text
        tokens = read_tokens(data, rm.tok, cfg.data.text_field)
        max_blocks = limit or 0
        metrics = scorer.block_loss(tokens, budget, max_blocks)
        metrics["n"] = (len(tokens) - 1) // budget if not max_blocks else min(max_blocks, (len(tokens) - 1) // budget)
        if zero_model is not None:
            baselines["zero_shot"] = Scorer(zero_model, batch_size=batch_size).block_loss(tokens, budget, max_blocks)
    else:
        examples = task.select(data, split, splits, fold)
        if limit:
            examples = examples[:limit]
        trunc = Truncation()
        preds: list = []
        metrics = evaluate_examples(scorer, Encoder(rm.tok, budget), task, examples, tc, trunc, preds)
        if predictions:
            _write_predictions(predictions, task, examples, preds)
        msg = trunc.message(f"{name} {Path(data).name}", len(examples), budget)
        if msg:
            warn(msg)
        metrics["context_truncated"] = len(trunc.context)
        if with_baselines:
            train = _training_examples(task, cfg, name)
            if isinstance(train, str):
                baselines["majority"] = {"skipped": train}
                baselines[TFIDF] = {"skipped": train}
            else:
                baselines["majority"] = majority_baseline(task, train, examples)
                baselines[TFIDF] = tfidf_lr_baseline(task, train, examples)
            if zero_model is not None:
                m = evaluate_examples(Scorer(zero_model, batch_size=batch_size), Encoder(rm.tok, cfg.model.n_ctx),
                                      task, examples, tc)
                m.pop("f1_per_class", None)
                baselines["zero_shot"] = m
    split = split if "task.splits" in spec.fields else "all"  # a task with a split file has named splits
    eval_id = db.add_evaluation(rm.run_id, rm.step, name, split, metrics, baselines, data)
    return {"task": name, "run_id": rm.run_id, "step": rm.step, "data": data, "split": split, **metrics,
            "baselines": baselines, "evaluation_id": eval_id}


def _training_examples(task, cfg, name: str):
    """The run's training examples (for the majority class and the TF-IDF baseline), or why they are
    not available."""

    if cfg.stage not in registry.TASK_STAGES or cfg.task.name != name:
        return f"run was not trained on {name}, so it has no training labels"
    try:
        train, _, _ = task.train_dev(cfg.task, cfg.data.val_fraction, cfg.train.seed, lambda m: None)
    except InputError as e:
        return f"training data unavailable: {e}"
    return train[:cfg.task.max_examples] if cfg.task.max_examples else train


def _write_predictions(path: str, task, examples, preds) -> None:
    def name(label):
        if isinstance(label, tuple):
            return [task.CLASSES[c] for c in label]
        return task.CLASSES[label] if label >= 0 else None

    with open(Path(path).expanduser(), "w", encoding="utf-8") as fh:
        for ex, p in zip(examples, preds):
            fh.write(json.dumps({"id": ex.id, "gold": name(ex.label), "pred": name(p)}) + "\n")
