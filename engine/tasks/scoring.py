"""Scoring a model on a task: answer likelihoods, greedy generation, a classifier head, LM loss.

``Scorer`` wraps a GPT with an optional soft prompt and classification head; ``evaluate_examples``
turns a task's examples into metrics (PubMedQA: accuracy and macro-F1; HoC: micro- and macro-F1;
both with the answer-token loss), ``block_loss`` scores plain text. ``majority_baseline``, the
TF-IDF + logistic-regression baseline (engine/tasks/text_baseline.py) and the zero-shot model (the
parent, scored the same way) tell whether fine-tuning learned anything.

A classification head (engine/model/classifier.py) reads each example whole, in overlapping windows
when it is longer than the model's window (``Encoder.windows``). Multi-label heads predict a label
where its logit exceeds the label's threshold; ``tune_thresholds`` picks, for each label on its own,
the cut point that maximizes that label's F1 on the development data, and development scoring during
training stores them in the head (``evaluate_examples(..., tune=True)``). ``head_weights`` gives the
training loss its per-label positive weights (multi-label) or class weights (single-label).

Answer likelihoods are biased by each answer's own prior: a small model may find " yes." likelier
than " no." whatever it reads. ``task.scoring = "calibrated"`` (contextual calibration, Zhao et al.
2021) scores every answer once more after the task's content-free inputs (``task.content_free()``,
through the same encoder, soft prompt and model) and predicts the argmax of the example's answer
log-probability minus that content-free log-probability; ``"raw"`` predicts the plain argmax.
"""
from __future__ import annotations

import math
from collections import Counter
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.core import registry
from engine.core.errors import InputError
from engine.model.classifier import LAST
from engine.model.gpt import GPT, KVCache
from engine.tasks.base import (
    Encoded, Encoder, Example, Truncation, collate_lm, collate_windows, multi_label_metrics, single_label_metrics,
)


class Scorer:
    """A model (+ soft prompt, + head) that scores token sequences; the prompt positions are dropped from outputs."""

    def __init__(self, model: GPT, prompt: nn.Module | None = None, head: nn.Module | None = None,
                 device: torch.device | None = None, batch_size: int = 16, autocast=nullcontext):
        self.model = model
        self.prompt = prompt
        self.head = head
        self.device = device or torch.device("cpu")
        self.batch_size = batch_size
        self.autocast = autocast
        self.n_prefix = prompt.weight.shape[0] if prompt is not None else 0

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        prefix = self.prompt(x.shape[0]) if self.prompt is not None else None
        return self.model.hidden(x, prefix)[:, self.n_prefix:]  # [B, T, C]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.hidden(x))  # [B, T, V]

    def lm_loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self.autocast():
            logits = self.logits(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.to(self.device).reshape(-1),
                               ignore_index=-100, reduction=reduction)

    def head_logits(self, x: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
        """The head's logits [n, K] for ``n`` examples whose windows are the rows of x [N, T]
        (``collate_windows``: each row's length and example)."""
        with self.autocast():
            h = self.hidden(x)                                               # [N, T, C]
        return self.head(h.float(), lengths, group, n)                       # [n, K]

    @torch.no_grad()
    def answer_logprobs(self, seqs: Sequence[Encoded], pad: int) -> list[float]:
        """Sum of log-probabilities of each sequence's answer tokens given its prompt."""
        out: list[float] = []
        for i in range(0, len(seqs), self.batch_size):
            x, y = collate_lm(seqs[i:i + self.batch_size], pad)
            with self.autocast():
                logp = F.log_softmax(self.logits(x).float(), dim=-1)  # [B, T, V]
            y = y.to(logp.device)
            keep = y != -100
            tok_lp = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep  # [B, T]
            out.extend(tok_lp.sum(1).tolist())
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], max_new: int, eot: int, limit: int) -> list[list[int]]:
        """Greedy continuations (up to end-of-text); prompts of equal length run as one batch."""
        out: list[list[int]] = [[] for _ in prompts]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        for length, members in by_len.items():
            for s in range(0, len(members), self.batch_size):
                rows = members[s:s + self.batch_size]
                x = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
                done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
                cache = KVCache(len(self.model.blocks))
                feed = x  # the prompts first, then each step's new token: the cache holds the rest
                for _ in range(min(max_new, limit - length)):
                    with self.autocast():
                        h = self._cached_hidden(feed, cache)
                        nxt = self.model.lm_head(h[:, -1]).float().argmax(-1)  # [B]
                    feed = nxt.unsqueeze(1)
                    for j, r in enumerate(rows):
                        if not done[j]:
                            out[r].append(int(nxt[j]))
                    done |= nxt == eot
                    if bool(done.all()):
                        break
        return [o[:o.index(eot)] if eot in o else o for o in out]

    def _cached_hidden(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The model's hidden states through its key/value cache, so each generated token costs one
        position, not the whole sequence: the prompt (soft prompt in front) on the first call, then one
        new token [B, 1] per call."""
        first = cache.positions == 0
        prefix = self.prompt(x.shape[0]) if first and self.prompt is not None else None
        h = self.model.hidden(x, prefix, cache=cache)                          # [B, P+T, C]
        return h[:, self.n_prefix:] if first else h                           # [B, T, C]

    @torch.no_grad()
    def block_loss(self, tokens: np.ndarray, n_ctx: int, max_blocks: int = 0) -> dict:
        """Mean next-token loss over consecutive n_ctx blocks of a token stream."""
        t = torch.from_numpy(tokens.astype(np.int64))
        n_blocks = (len(t) - 1) // n_ctx
        if n_blocks == 0:
            raise InputError(f"the text has {len(t)} tokens, fewer than one {n_ctx}-token block", key="data")
        if max_blocks:
            n_blocks = min(n_blocks, max_blocks)
        total, count = 0.0, 0
        for s in range(0, n_blocks, self.batch_size):
            starts = torch.arange(s, min(s + self.batch_size, n_blocks)) * n_ctx
            rows = t[starts[:, None] + torch.arange(n_ctx + 1)[None, :]]  # [B, n_ctx+1]
            total += float(self.lm_loss(rows[:, :-1], rows[:, 1:], reduction="sum"))
            count += rows[:, 1:].numel()
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


# -- labelled tasks --------------------------------------------------------------------------------


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids) if ids else ""


SCORINGS = ("raw", "calibrated")  # the two ways to compare answer likelihoods (task.scoring)


def scoring_used(scorer: Scorer, task, tc) -> str:
    """How ``evaluate_examples`` predicts with this scorer, task and config: ``"head"`` (a classifier
    head), ``"generate"`` (greedy generation, parsed: HoC, PubMedQA with predict = 'generate') or, for
    an answer-likelihood comparison, ``tc.scoring`` (``"raw"`` or ``"calibrated"``)."""
    if scorer.head is not None:
        return "head"
    if task.MULTI_LABEL or tc.predict != "likelihood":
        return "generate"
    if tc.scoring not in SCORINGS:
        raise InputError(f"task.scoring must be one of {', '.join(map(repr, SCORINGS))}, got {tc.scoring!r}", key="task.scoring")
    return tc.scoring


def content_free_logprobs(scorer: Scorer, enc: Encoder, task, cands: Sequence[list[int]], reserve: int) -> np.ndarray:
    """Each candidate answer's log-probability after the task's content-free inputs, averaged over
    those inputs [K]: what the model says with nothing to read (soft prompt included, if any)."""
    free = task.content_free()
    seqs = []
    for ex in free:
        p = enc.prompt(ex, reserve)
        seqs.extend(Encoded(p + c, len(p)) for c in cands)
    lps = np.asarray(scorer.answer_logprobs(seqs, enc.pad)).reshape(len(free), len(cands))  # [F, K]
    return lps.mean(0)


@torch.no_grad()
def evaluate_examples(scorer: Scorer, enc: Encoder, task, examples: Sequence[Example], tc,
                      trunc: Truncation | None = None, predictions: list | None = None, tune: bool = False) -> dict:
    """Predict every example the way the run is set up (head, task.predict, task.scoring) and score it.

    The metrics name how the predictions were made (``"scoring"``: raw, calibrated, generate or head);
    single-label ones count the predicted classes (``"predicted"``), and calibrated ones carry the
    content-free log-probability subtracted from each answer (``"content_free"``). ``predictions``
    (a list) receives each example's predicted label, for inspection and tests.

    With a classification head the metrics also count the examples read in several windows
    (``"windowed"``); multi-label ones carry the decision thresholds used, as probabilities
    (``"thresholds"``). ``tune`` (development scoring during training): first set the head's
    thresholds to those that maximize each label's F1 on these examples (``tune_thresholds``), and
    record the figures the thresholds before had (``"before_tuning"``).
    """
    if not examples:
        raise InputError("no examples to evaluate", key="data")
    scoring = scoring_used(scorer, task, tc)
    extra: dict = {}
    was_training = scorer.model.training
    scorer.model.eval()
    try:
        gold = [ex.label for ex in examples]
        if scorer.head is not None:
            windows = [head_windows(enc, scorer.head, ex, trunc) for ex in examples]
            logits, loss_sum = [], 0.0
            for i in range(0, len(windows), scorer.batch_size):
                part = windows[i:i + scorer.batch_size]
                x, lengths, group = collate_windows(part, enc.pad)
                lg = scorer.head_logits(x, lengths, group, len(part)).float().cpu()
                t = head_targets(task, gold[i:i + scorer.batch_size])
                loss_sum += float(head_loss(task, lg, t, reduction="sum"))
                logits.append(lg)
            lg = torch.cat(logits)                                               # [N, K]
            extra["windowed"] = sum(1 for w in windows if len(w) > 1)
            if task.MULTI_LABEL:
                if tune:
                    gold_ind = head_targets(task, gold).numpy().astype(bool)
                    untuned = multi_label_metrics(gold, _above(lg, scorer.head.thresholds), task.CLASSES)
                    scorer.head.set_thresholds(tune_thresholds(lg.numpy(), gold_ind, scorer.head.thresholds.cpu().numpy()))
                    extra["before_tuning"] = {k: untuned[k] for k in ("micro_f1", "macro_f1")}
                pred = _above(lg, scorer.head.thresholds)
                extra["thresholds"] = dict(zip(task.CLASSES, torch.sigmoid(scorer.head.thresholds.float().cpu()).tolist()))
                loss = loss_sum / (len(examples) * len(task.CLASSES))
            else:
                pred = lg.argmax(-1).tolist()
                loss = loss_sum / len(examples)
        else:
            encoded = []
            for ex in examples:
                try:
                    encoded.append(enc.train(ex, trunc))
                except InputError:
                    pass  # a gold answer longer than the window has no loss; it is still predicted below
            lps = scorer.answer_logprobs(encoded, enc.pad)
            n_tok = sum(len(e.ids) - e.answer_start for e in encoded)
            loss = -sum(lps) / n_tok if n_tok else float("nan")
            if not task.MULTI_LABEL and tc.predict == "likelihood":
                cands = [enc.answer_ids(c) for c in task.candidates()]
                reserve = max(len(c) for c in cands)
                seqs = []
                for ex in examples:
                    p = enc.prompt(ex, reserve, trunc)
                    seqs.extend(Encoded(p + c, len(p)) for c in cands)
                scores = np.asarray(scorer.answer_logprobs(seqs, enc.pad)).reshape(len(examples), len(cands))  # [N, K]
                if scoring == "calibrated":
                    prior = content_free_logprobs(scorer, enc, task, cands, reserve)  # [K], once per call
                    scores = scores - prior[None, :]
                    extra["content_free"] = dict(zip(task.CLASSES, prior.tolist()))
                pred = scores.argmax(1).tolist()
            else:
                max_new = tc.max_new_tokens if task.MULTI_LABEL else min(tc.max_new_tokens, 8)  # 'yes.' needs few
                max_new = max(1, min(max_new, enc.budget // 2))  # small windows: keep room for the input
                prompts = [enc.prompt(ex, max_new, trunc) for ex in examples]
                gen = scorer.generate(prompts, max_new, enc.eot, enc.budget)
                pred = [task.parse(_decode(enc.tok, g)) for g in gen]
        if predictions is not None:
            predictions.extend(pred)
        metrics = (multi_label_metrics(gold, pred, task.CLASSES) if task.MULTI_LABEL
                   else single_label_metrics(gold, pred, task.CLASSES))
        metrics["loss"] = float(loss)
        metrics["scoring"] = scoring
        if not task.MULTI_LABEL:
            metrics["predicted"] = {name: sum(1 for p in pred if p == c) for c, name in enumerate(task.CLASSES)}
        metrics.update(extra)
        return metrics
    finally:
        scorer.model.train(was_training)


def head_windows(enc: Encoder, head: nn.Module, ex: Example, trunc: Truncation | None = None) -> list[list[int]]:
    """What a head reads of an example: the whole of it in windows (``Encoder.windows``), or for a head
    of an earlier version (last-token pooling) the one prompt it was trained on, cut to the window."""
    if getattr(head, "pooling", None) == LAST:
        return [enc.prompt(ex, 0, trunc)]
    return enc.windows(ex, trunc)


def _above(logits: torch.Tensor, thresholds: torch.Tensor) -> list[tuple[int, ...]]:
    on = logits > thresholds.to(logits.device, logits.dtype)[None, :]       # [N, K]
    return [tuple(int(c) for c in torch.nonzero(row).flatten()) for row in on]


def tune_thresholds(scores: np.ndarray, gold: np.ndarray, current: np.ndarray | None = None) -> np.ndarray:
    """Per-label decision thresholds [K] for scores [N, K] (logits) and gold indicators [N, K].

    Each label on its own: among the cut points between consecutive distinct scores (and one below
    the lowest), the one where predicting ``score > cut`` gives that label the highest F1 on these
    examples; of equal F1s, the highest cut (the fewest positive predictions). A label with no positive
    example keeps its ``current`` threshold (default 0: probability 0.5). Maximizing each label's F1
    rather than the pooled micro-F1 lets a rare label keep a low cut and a common one a high one.
    """
    scores = np.asarray(scores, dtype=np.float32)
    gold = np.asarray(gold, dtype=bool)
    out = (np.zeros(scores.shape[1], np.float32) if current is None else np.array(current, dtype=np.float32))
    for k in range(scores.shape[1]):
        s, y = scores[:, k], gold[:, k]
        positives = int(y.sum())
        if positives == 0:
            continue
        order = np.argsort(-s, kind="stable")
        s_desc, y_desc = s[order], y[order]
        ends = np.flatnonzero(np.r_[s_desc[:-1] > s_desc[1:], True])      # cut after each distinct score
        tp = np.cumsum(y_desc)[ends]
        fp = np.cumsum(~y_desc)[ends]
        f1 = 2 * tp / (positives + tp + fp)
        j = int(ends[int(np.argmax(f1))])                                 # first maximum: the highest cut
        if j + 1 < len(s_desc):
            lo, hi = s_desc[j + 1], s_desc[j]
            cut = np.float32((np.float64(lo) + np.float64(hi)) / 2)
            out[k] = lo if cut >= hi else cut                            # strictly below hi, at least lo
        else:
            out[k] = np.float32(s_desc[-1] - 1.0)                          # every example positive
    return out


# per-label positive weights and class weights are clipped to [1 / WEIGHT_MAX, WEIGHT_MAX]
WEIGHT_MAX = 10.0


def head_weights(task, labels: Sequence) -> torch.Tensor:
    """Loss weights [K] from the training labels. Multi-label: each label's positive weight, its
    negatives over its positives (BCE's ``pos_weight``), so a rare label's few positives count as
    much as its many negatives. Single-label: inverse class frequency, ``N / (K x n_c)`` (1 for a class
    absent from training). Both clipped to [1 / WEIGHT_MAX, WEIGHT_MAX]."""
    k, n = len(task.CLASSES), len(labels)
    if task.MULTI_LABEL:
        pos = head_targets(task, labels).sum(0)                               # [K]
        w = torch.where(pos > 0, (n - pos) / pos.clamp(min=1), torch.ones(k))
    else:
        counts = torch.bincount(torch.tensor(list(labels), dtype=torch.long), minlength=k).float()
        w = torch.where(counts > 0, n / (k * counts.clamp(min=1)), torch.ones(k))
    return w.clamp(1.0 / WEIGHT_MAX, WEIGHT_MAX)


def head_targets(task, labels: Sequence) -> torch.Tensor:
    if task.MULTI_LABEL:
        t = torch.zeros(len(labels), len(task.CLASSES))
        for i, lab in enumerate(labels):
            t[i, list(lab)] = 1.0
        return t
    return torch.tensor(list(labels), dtype=torch.long)


def head_loss(task, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE over every label (multi-label; ``weight``: the positive weights) or cross-entropy
    (single-label; ``weight``: the class weights)."""
    weight = weight.to(logits.device) if weight is not None else None
    if task.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.device), reduction=reduction, pos_weight=weight)
    return F.cross_entropy(logits, targets.to(logits.device), reduction=reduction, weight=weight)


def majority_baseline(task, train: Sequence[Example], examples: Sequence[Example]) -> dict:
    """Predict the training set's most frequent class for every example.

    Multi-label: the most frequent single label (the per-label majority would predict no label at all
    and score 0 F1, which says nothing).
    """
    if task.MULTI_LABEL:
        counts = Counter(c for ex in train for c in ex.label)
        top = counts.most_common(1)[0][0] if counts else 0
        m = multi_label_metrics([ex.label for ex in examples], [(top,)] * len(examples), task.CLASSES)
    else:
        top = Counter(ex.label for ex in train).most_common(1)[0][0]
        m = single_label_metrics([ex.label for ex in examples], [top] * len(examples), task.CLASSES)
    m["predicts"] = task.CLASSES[top]
    m.pop("f1_per_class", None)
    return m


def headline(task_name: str, metrics: dict) -> dict:
    """The numbers worth a metric row / a summary entry (the task's registry ``headline``)."""
    return {k: metrics[k] for k in registry.task(task_name).headline if k in metrics}
