"""What a fine-tuning or prompting run trains on, in the three forms a task can take:

- ``LMFeed``: causal LM on a corpus (the unlabelled task of engine.core.registry), scored by validation loss;
- ``AnswerFeed``: a labelled task as text, loss on the answer tokens only (PubMedQA, HoC with an LM head);
- ``HeadFeed``: a labelled task through a classification head (``task.head = "classifier"``) over the
  whole input, long documents in overlapping windows (engine/model/classifier.py), with per-label
  positive weights or class weights in its loss and, for multi-label tasks, per-label thresholds
  tuned on the development data at every evaluation (kept in the head, saved with it).

Each feed gives the next micro-batch's loss, scores the development data, names its headline metric
and computes its baselines (majority class; TF-IDF + logistic regression fitted on the training
examples; the parent model zero-shot). Development scoring and the
zero-shot baseline follow the run's ``task`` settings, ``task.scoring`` included (raw or calibrated
answer likelihoods); each evaluation's metrics say which was used. The stages
(engine/train/finetune.py, prompt.py) pick one with ``make_feed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.core import registry
from engine.core.config import RunConfig
from engine.core.errors import InputError
from engine.data.corpus import load_corpus
from engine.data.tokens import BlockLoader, check_enough_tokens, tokenize_corpus
from engine.tasks import get_task
from engine.tasks.base import WINDOW_STRIDE, Encoder, ExampleLoader, Truncation, collate_lm, collate_windows
from engine.tasks.scoring import (
    Scorer, evaluate_examples, head_loss, head_targets, head_weights, headline, majority_baseline,
)
from engine.tasks.text_baseline import NAME as TFIDF, tfidf_lr_baseline
from engine.train.identity import RunIdentity
from engine.train.reporter import Reporter


@dataclass
class Batch:
    loss: torch.Tensor
    tokens: int       # positions of the (padded) batch without the soft prompt
    seq_len: int      # sequence length of the batch, soft prompt included


class LMFeed:
    key, lower_is_better = "loss", True

    def __init__(self, run: RunIdentity, report: Reporter, tok, budget: int):
        cfg, tc = run.cfg, run.cfg.train
        self.name = registry.LM
        corpus = load_corpus(cfg.data.corpus, cfg.data.text_field, cfg.data.max_documents)
        splits = tokenize_corpus(corpus, tok, cfg.data.val_fraction, tc.seed, run.run_dir.parent / ".cache",
                                 progress=lambda d, n: report.progress("tokenize", d, n))
        check_enough_tokens(splits, budget)
        self.loader = BlockLoader(splits.train, budget, tc.batch_size, tc.seed)
        self.val_batches = BlockLoader(splits.val, budget, tc.batch_size, tc.seed, shuffle=False).fixed_batches(tc.eval_batches)
        self.info = {"name": self.name, "train_tokens": int(len(splits.train)), "val_tokens": int(len(splits.val)),
                     "corpus": corpus.sources}
        report.info(f"{self.name}: {len(splits.train):,} training tokens, {len(splits.val):,} validation tokens")

    def next(self, scorer: Scorer) -> Batch:
        x, y = self.loader.next_batch()
        return Batch(scorer.lm_loss(x, y), x.numel(), x.shape[1] + scorer.n_prefix)

    @torch.no_grad()
    def evaluate(self, scorer: Scorer) -> dict:
        model = scorer.model
        was = model.training
        model.eval()
        val = float(np.mean([float(scorer.lm_loss(x, y)) for x, y in self.val_batches]))
        model.train(was)
        return {"loss": val, "perplexity": math.exp(min(val, 50.0))}

    def rows(self, m: dict) -> dict:
        return {"val_loss": m["loss"], "val_perplexity": m["perplexity"]}

    def baselines(self, plain: Scorer, cfg: RunConfig) -> dict:
        return {"zero_shot": self.evaluate(plain)}


class LabelledData:
    """The train and development examples of a labelled task, fitted to the window; dev scoring."""

    def __init__(self, cfg: RunConfig, report: Reporter, tok, budget: int):
        tc = cfg.train
        self.report, self.cfg, self.budget = report, cfg, budget
        self.task = get_task(cfg.task.name)
        train, dev, info = self.task.train_dev(cfg.task, cfg.data.val_fraction, tc.seed, report.warn)
        if cfg.task.max_examples:
            train, dev = train[:cfg.task.max_examples], dev[:cfg.task.max_examples]
        overlap = {e.id for e in train} & {e.id for e in dev}
        if overlap:
            report.warn(f"{len(overlap)} development examples are also training examples")
        self.tok = tok
        self.enc = Encoder(tok, budget)
        self.train, self.dev, self.task_info = train, dev, info
        self.train_split = train  # what the TF-IDF baseline is fitted on (train may lose examples that overflow)
        self.dev_trunc = Truncation()
        self._warned_dev = False

    def ready(self, train: list, trunc: Truncation) -> None:
        """The training examples in use, once the feed has encoded them."""
        cfg = self.cfg
        self.train = train
        msg = trunc.message(f"{cfg.task.name} training", len(train), self.budget)
        if msg:
            self.report.warn(msg)
        self.loader = ExampleLoader(len(train), cfg.train.batch_size, cfg.train.seed)
        self.info = {"name": cfg.task.name, **self.task_info, "n_train": len(train), "n_dev": len(self.dev),
                     "train_context_truncated": len(trunc.context)}
        self.report.info(f"{cfg.task.name}: {len(train)} training and {len(self.dev)} development examples"
                         + (f" (fold {self.task_info['fold']} of {self.task_info['splits']})" if "fold" in self.task_info else ""))

    def evaluate(self, scorer: Scorer, tune: bool = False) -> dict:
        m = evaluate_examples(scorer, self.enc, self.task, self.dev, self.cfg.task, self.dev_trunc, tune=tune)
        if not self._warned_dev:
            self._warned_dev = True
            msg = self.dev_trunc.message(f"{self.cfg.task.name} development", len(self.dev), self.budget)
            if msg:
                self.report.warn(msg)
        return m

    def rows(self, m: dict) -> dict:
        return {f"dev_{k}": v for k, v in headline(self.cfg.task.name, m).items()}

    def majority(self) -> dict:
        return majority_baseline(self.task, self.train, self.dev)

    def text_baselines(self) -> dict:
        """The baselines that read no model: majority class and TF-IDF + logistic regression."""
        return {"majority": self.majority(), TFIDF: tfidf_lr_baseline(self.task, self.train_split, self.dev)}


def _serve(feed, data: LabelledData, train: list, trunc: Truncation) -> None:
    """What both labelled feeds take from their data: name, headline metric, order, scoring."""
    data.ready(train, trunc)
    feed.data, feed.name, feed.lower_is_better = data, data.cfg.task.name, False
    feed.key = registry.task(feed.name).headline[0]  # what "best" means
    feed.loader, feed.info, feed.evaluate, feed.rows = data.loader, data.info, data.evaluate, data.rows


class AnswerFeed:
    def __init__(self, data: LabelledData):
        trunc = Truncation()
        kept, self.encoded = [], []
        for ex in data.train:
            try:
                self.encoded.append(data.enc.train(ex, trunc))
                kept.append(ex)
            except InputError:
                pass  # its answer alone overflows the window
        if len(kept) < len(data.train):
            data.report.warn(f"{len(data.train) - len(kept)} of {len(data.train)} training examples were skipped: their "
                             f"answer does not fit the {data.budget}-token window")
        if not kept:
            raise InputError(f"no training example fits the {data.budget}-token window; use a larger model.n_ctx",
                             key="model.n_ctx")
        _serve(self, data, kept, trunc)
        tc = data.cfg.task
        if not data.task.MULTI_LABEL and tc.predict == "likelihood":
            data.report.info(f"{tc.name} development: answers compared by {tc.scoring} likelihood (task.scoring)")

    def next(self, scorer: Scorer) -> Batch:
        x, y = collate_lm([self.encoded[i] for i in self.loader.next_indices()], self.data.enc.pad)
        return Batch(scorer.lm_loss(x, y), x.numel(), x.shape[1] + scorer.n_prefix)

    def baselines(self, plain: Scorer, cfg: RunConfig) -> dict:
        d = self.data
        # the parent as it was, over the whole window (no soft prompt in front)
        zero = evaluate_examples(plain, Encoder(d.tok, cfg.model.n_ctx), d.task, d.dev, cfg.task)
        zero.pop("f1_per_class", None)
        return {**d.text_baselines(), "zero_shot": zero}


class HeadFeed:
    """Whole documents (overlapping windows when longer than the window) through a classification head;
    BCE with per-label positive weights (multi-label) or cross-entropy with class weights; development
    scoring tunes the multi-label thresholds (``evaluate_examples(..., tune=True)``)."""

    def __init__(self, data: LabelledData):
        trunc = Truncation()
        self.windows = [data.enc.windows(ex, trunc) for ex in data.train]
        _serve(self, data, data.train, trunc)
        dev_trunc = Truncation()
        for ex in data.dev:
            data.enc.windows(ex, dev_trunc)
        task = data.task
        self.weights = head_weights(task, [ex.label for ex in data.train])
        n_windows = sum(len(w) for w in self.windows)
        data.info.update(train_windowed=len(trunc.windowed), dev_windowed=len(dev_trunc.windowed),
                         train_windows=n_windows, window_stride=WINDOW_STRIDE, pooling=data.cfg.task.pooling,
                         **{"pos_weight" if task.MULTI_LABEL else "class_weight": dict(zip(task.CLASSES, self.weights.tolist()))})
        if trunc.windowed or dev_trunc.windowed:
            data.report.info(f"{data.cfg.task.name}: {len(trunc.windowed)} of {len(data.train)} training and "
                             f"{len(dev_trunc.windowed)} of {len(data.dev)} development examples are longer than the "
                             f"{data.budget}-token window and are read whole in overlapping windows (stride "
                             f"{WINDOW_STRIDE:g} of a window's text; {n_windows} training windows in all)")
        self.evaluate = lambda scorer: data.evaluate(scorer, tune=True)

    def next(self, scorer: Scorer) -> Batch:
        idx = self.loader.next_indices()
        x, lengths, group = collate_windows([self.windows[i] for i in idx], self.data.enc.pad)
        logits = scorer.head_logits(x, lengths, group, len(idx))
        task = self.data.task
        loss = head_loss(task, logits.float(), head_targets(task, [self.data.train[i].label for i in idx]),
                         weight=self.weights)
        return Batch(loss, x.numel(), x.shape[1] + scorer.n_prefix)

    def baselines(self, plain: Scorer, cfg: RunConfig) -> dict:
        return {**self.data.text_baselines(),
                "zero_shot": {"skipped": "a new classification head has no zero-shot form"}}


def make_feed(run: RunIdentity, report: Reporter, tok, budget: int):
    cfg = run.cfg
    if not registry.task(cfg.task.name).labelled:
        return LMFeed(run, report, tok, budget)
    data = LabelledData(cfg, report, tok, budget)
    return HeadFeed(data) if cfg.task.head == "classifier" else AnswerFeed(data)
