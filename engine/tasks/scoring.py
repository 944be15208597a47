"""Scoring a model on a task: answer likelihoods, greedy generation, a classifier head, LM loss.

``Scorer`` wraps a GPT with an optional soft prompt and classification head; ``evaluate_examples``
turns a task's examples into metrics (PubMedQA: accuracy and macro-F1; HoC: micro- and macro-F1;
both with the answer-token loss), ``block_loss`` scores plain text. ``majority_baseline`` and the
zero-shot model (the parent, scored the same way) tell whether fine-tuning learned anything.

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
from engine.model.gpt import GPT, KVCache
from engine.tasks.base import (
    Encoded, Encoder, Example, Truncation, collate_lm, collate_prompts, multi_label_metrics, single_label_metrics,
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

    def head_logits(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            h = self.hidden(x)
        h = h[torch.arange(h.shape[0], device=h.device), last.to(h.device)]  # [B, C] at each prompt's last token
        return self.head(h.float())                                          # [B, K]

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
                for step in range(min(max_new, limit - length)):
                    with self.autocast():
                        h = self._cached_hidden(x if step == 0 else nxt.unsqueeze(1), cache)
                        nxt = self.model.lm_head(h[:, -1]).float().argmax(-1)  # [B]
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
                      trunc: Truncation | None = None, predictions: list | None = None) -> dict:
    """Predict every example the way the run is set up (head, task.predict, task.scoring) and score it.

    The metrics name how the predictions were made (``"scoring"``: raw, calibrated, generate or head);
    single-label ones count the predicted classes (``"predicted"``), and calibrated ones carry the
    content-free log-probability subtracted from each answer (``"content_free"``). ``predictions``
    (a list) receives each example's predicted label, for inspection and tests.
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
            prompts = [enc.prompt(ex, 0, trunc) for ex in examples]
            logits, loss_sum = [], 0.0
            for i in range(0, len(prompts), scorer.batch_size):
                x, last = collate_prompts(prompts[i:i + scorer.batch_size], enc.pad)
                lg = scorer.head_logits(x, last).float().cpu()
                t = head_targets(task, gold[i:i + scorer.batch_size])
                loss_sum += float(head_loss(task, lg, t, reduction="sum"))
                logits.append(lg)
            lg = torch.cat(logits)
            if task.MULTI_LABEL:
                pred = [tuple(int(c) for c in torch.nonzero(row > 0).flatten()) for row in lg]
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


def head_targets(task, labels: Sequence) -> torch.Tensor:
    if task.MULTI_LABEL:
        t = torch.zeros(len(labels), len(task.CLASSES))
        for i, lab in enumerate(labels):
            t[i, list(lab)] = 1.0
        return t
    return torch.tensor(list(labels), dtype=torch.long)


def head_loss(task, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if task.MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.device), reduction=reduction)
    return F.cross_entropy(logits, targets.to(logits.device), reduction=reduction)


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
