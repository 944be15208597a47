"""``mediswift eval RUN_ID --task pubmedqa|hoc|lm --data PATH [--json]``: score a run on a labelled file.

Works on any file of the task's format, anywhere on disk (the unseen test sets included), stores
the result with its majority and zero-shot baselines in the run database (``evaluations``), and
prints it. A prompt run is scored as its parent model with the learned prompt in front.
"""
from __future__ import annotations

from engine.core.errors import InputError

import json
import sys
from pathlib import Path


def register(subparsers, common) -> None:
    e = common(subparsers.add_parser("eval", help="score a run on a labelled file (PubMedQA, HoC) or a text file (lm)"))
    e.add_argument("run_id")
    e.add_argument("--task", choices=("pubmedqa", "hoc", "lm"), help="default: the run's task")
    e.add_argument("--data", required=True, help="PubMedQA: PQA-L JSON; HoC: JSONL; lm: text/jsonl/... file or folder")
    e.add_argument("--split", default="all", help="PubMedQA: all (default), test, cv_pool, or the fold's train/dev (needs a split file)")
    e.add_argument("--splits", help="PubMedQA split file (default: pqal_splits.json next to --data)")
    e.add_argument("--fold", type=int, default=0, help="fold for --split train/dev")
    e.add_argument("--limit", type=int, default=0, help="score only the first N examples (0 = all)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--no-baselines", action="store_true", help="skip the majority and zero-shot baselines")
    e.add_argument("--predictions", metavar="FILE.jsonl", help="also write each example's id, gold and predicted label")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval)


def cmd_eval(args) -> int:
    from engine.cli.commands import _db

    db = _db(args)
    out = evaluate_run(db, args)
    if args.json:
        sys.stdout.write(json.dumps(out, default=str) + "\n")
    else:
        from engine.tasks.scoring import headline

        head = ", ".join(f"{k} {v:.4f}" for k, v in headline(out["task"], out).items())
        print(f"run {out['run_id']} (step {out['step']}) on {out['data']} [{out['split']}]: n {out['n']}, {head}")
        for name, b in out["baselines"].items():
            if "skipped" in b:
                print(f"  {name}: skipped ({b['skipped']})")
            else:
                print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(out["task"], b).items()))
    return 0


def evaluate_run(db, args) -> dict:
    from engine.model.checkpoint import load_checkpoint
    from engine.tasks.scoring import Scorer, build_model, evaluate_examples, load_run, majority_baseline
    from engine.tasks import get_task
    from engine.tasks.base import Encoder, Truncation
    from engine.tasks.lm import read_tokens

    rm = load_run(db, args.run_id)
    cfg = rm.cfg
    name = args.task or (cfg.task.name if cfg.stage in ("finetune", "prompt") else None)
    if name is None:
        raise InputError(f"run {rm.run_id} is a {cfg.stage} run; say which task to score with --task", key="task")
    if rm.head is not None and name != cfg.task.name:
        raise InputError(f"run {rm.run_id} has a {cfg.task.name} classification head; it cannot score {name}", key="task")
    data = str(Path(args.data).expanduser().resolve())
    if not Path(data).exists():
        raise InputError(f"data file not found: {args.data}", key="data", path=args.data)
    n_prefix = rm.prompt.weight.shape[0] if rm.prompt is not None else 0
    budget = cfg.model.n_ctx - n_prefix
    scorer = Scorer(rm.model, rm.prompt, rm.head, batch_size=args.batch_size)
    baselines: dict = {}
    zero_model = None
    if not args.no_baselines and rm.stage in ("finetune", "prompt") and rm.head is None:
        if rm.parent_checkpoint and Path(rm.parent_checkpoint).is_file():
            pck = load_checkpoint(rm.parent_checkpoint)
            zero_model = build_model(cfg.model, pck["vocab_size"], pck["model"])
        else:
            baselines["zero_shot"] = {"skipped": f"the parent checkpoint is gone: {rm.parent_checkpoint}"}
    elif not args.no_baselines and rm.head is not None:
        baselines["zero_shot"] = {"skipped": "a classification head has no zero-shot form"}

    if name == "lm":
        tokens = read_tokens(data, rm.tok, cfg.data.text_field)
        max_blocks = args.limit or 0
        metrics = scorer.block_loss(tokens, budget, max_blocks)
        metrics["n"] = (len(tokens) - 1) // budget if not max_blocks else min(max_blocks, (len(tokens) - 1) // budget)
        if zero_model is not None:
            baselines["zero_shot"] = Scorer(zero_model, batch_size=args.batch_size).block_loss(tokens, budget, max_blocks)
    else:
        task = get_task(name)
        examples = task.select(data, args.split, args.splits, args.fold)
        if args.limit:
            examples = examples[:args.limit]
        trunc = Truncation()
        preds: list = []
        metrics = evaluate_examples(scorer, Encoder(rm.tok, budget), task, examples, cfg.task, trunc, preds)
        if args.predictions:
            _write_predictions(args.predictions, task, examples, preds)
        msg = trunc.message(f"{name} {Path(data).name}", len(examples), budget)
        if msg:
            sys.stderr.write(f"mediswift: warning: {msg}\n")
        metrics["context_truncated"] = len(trunc.context)
        if not args.no_baselines:
            train = _training_examples(task, cfg, name)
            if isinstance(train, str):
                baselines["majority"] = {"skipped": train}
            else:
                baselines["majority"] = majority_baseline(task, train, examples)
            if zero_model is not None:
                m = evaluate_examples(Scorer(zero_model, batch_size=args.batch_size), Encoder(rm.tok, cfg.model.n_ctx),
                                      task, examples, cfg.task)
                m.pop("f1_per_class", None)
                baselines["zero_shot"] = m
    split = args.split if name == "pubmedqa" else "all"
    eval_id = db.add_evaluation(rm.run_id, rm.step, name, split, metrics, baselines, data)
    return {"task": name, "run_id": rm.run_id, "step": rm.step, "data": data, "split": split, **metrics,
            "baselines": baselines, "evaluation_id": eval_id}


def _training_examples(task, cfg, name: str):
    """The run's training examples (for the majority class), or why they are not available."""

    if cfg.stage not in ("finetune", "prompt") or cfg.task.name != name:
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
