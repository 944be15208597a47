"""What every labelled task shares: examples, truncation to the context window, windows, batching, F1.

An example is four text segments: ``head`` (kept), ``context`` (the only part ever cut, from its
end), ``tail`` (the answer cue, kept) and ``target`` (the answer, the only tokens with a loss).
Segments are tokenized separately and concatenated, so cutting the context never changes the
tokens of the question or the answer.

A classification head reads the whole context instead (``Encoder.windows``): a context longer than
the room the window leaves is read as overlapping windows, each ``head + a piece of the context +
tail``, consecutive pieces starting ``WINDOW_STRIDE`` of that room apart (the last one ends with the
context), so every context token is in at least one window and nothing is cut.

A task whose answers are compared by likelihood also gives ``content_free()``: its prompt template
with the example's content replaced by each of ``CONTENT_FREE_TEXTS``. What a model answers there is
the prior it brings to every example; calibrated scoring (engine/tasks/scoring.py) subtracts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from engine.core.errors import InputError
from engine.data.tokens import SeededOrder
from engine.data.vocab import special_ids


# Texts that stand in for an example's content in the content-free inputs of calibrated scoring
# (contextual calibration, Zhao et al. 2021): a placeholder and nothing at all.
CONTENT_FREE_TEXTS = ("N/A", "")

# How far consecutive windows of a long context start apart, as a fraction of the context tokens a
# window holds: 0.5 = each window overlaps the one before it by half.
WINDOW_STRIDE = 0.5


@dataclass
class Example:
    id: str
    head: str
    context: str
    tail: str
    target: str
    label: Any  # int class index (single-label), tuple of class indices (multi-label); None: content-free


@dataclass
class Encoded:
    ids: list[int]        # prompt + answer (+ end-of-text)
    answer_start: int     # first answer token; the loss covers ids[answer_start:]
    context_cut: bool = False
    question_cut: bool = False


@dataclass
class Truncation:
    """Counts of examples whose context (or, as a last resort, question) was cut, and of those read
    whole in several windows (``windowed``: nothing cut)."""
    context: set = field(default_factory=set)
    question: set = field(default_factory=set)
    windowed: set = field(default_factory=set)

    def message(self, what: str, n: int, n_ctx: int) -> str | None:
        if not self.context and not self.question:
            return None
        msg = (f"{what}: {len(self.context)} of {n} examples had their context truncated to fit the "
               f"{n_ctx}-token window (question or cue, and answer kept)")
        if self.question:
            msg += f"; {len(self.question)} left no room for any context, so the start of their question was cut too"
        return msg


class Encoder:
    """Tokenizes example segments once and fits them into ``budget`` tokens."""

    def __init__(self, tok, budget: int):
        self.tok = tok
        self.budget = budget
        self.eot, self.pad = special_ids(tok)
        # keyed by id(ex); the entry holds the example itself, so its id cannot be reused by another
        # object while the entry lives (content-free examples, for one, are made per call)
        self._cache: dict[int, tuple[Example, tuple[list[int], list[int], list[int]]]] = {}

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def parts(self, ex: Example) -> tuple[list[int], list[int], list[int]]:
        hit = self._cache.get(id(ex))
        if hit is None or hit[0] is not ex:
            hit = self._cache[id(ex)] = (ex, (self.ids(ex.head), self.ids(ex.context), self.ids(ex.tail)))
        return hit[1]

    def prompt(self, ex: Example, reserve: int, trunc: Truncation | None = None) -> list[int]:
        """Prompt ids leaving ``reserve`` tokens for the answer; cuts the context's end first."""
        h, c, t = self.parts(ex)
        room = self.budget - reserve - len(h) - len(t)
        if room >= len(c):
            return h + c + t
        if room >= 0:
            if trunc is not None:
                trunc.context.add(ex.id)
            return h + c[:room] + t
        keep_head = self.budget - reserve - len(t)
        if keep_head <= 0:
            raise InputError(f"the context window of {self.budget} tokens cannot hold even the answer cue and answer of example "
                f"{ex.id}; use a larger model.n_ctx (or fewer prompt.n_tokens)", key="model.n_ctx")
        if trunc is not None:
            trunc.context.add(ex.id)
            trunc.question.add(ex.id)
        return h[-keep_head:] + t  # keep the end of the question, next to the answer cue

    def windows(self, ex: Example, trunc: Truncation | None = None) -> list[list[int]]:
        """The example as one or more windows of at most ``budget`` tokens, together holding its whole
        context: ``head + context[s:s + room] + tail`` for starts ``s`` that are ``WINDOW_STRIDE`` x
        ``room`` apart, the last one ending with the context. Only a head and tail that leave no room
        for any context are cut (as ``prompt`` cuts them)."""
        h, c, t = self.parts(ex)
        room = self.budget - len(h) - len(t)
        if room >= len(c) or room <= 0:
            return [self.prompt(ex, 0, trunc)]
        step = max(1, int(room * WINDOW_STRIDE))
        starts = list(range(0, len(c) - room, step)) + [len(c) - room]
        if trunc is not None:
            trunc.windowed.add(ex.id)
        return [h + c[s:s + room] + t for s in starts]

    def answer_ids(self, text: str) -> list[int]:
        return self.ids(text) + [self.eot]

    def train(self, ex: Example, trunc: Truncation | None = None) -> Encoded:
        ans = self.answer_ids(ex.target)
        p = self.prompt(ex, len(ans), trunc)
        return Encoded(p + ans, len(p))


def collate_lm(encoded: Sequence[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets with -100 everywhere but the answer tokens."""
    L = max(len(e.ids) for e in encoded) - 1
    x = torch.full((len(encoded), L), pad, dtype=torch.long)
    y = torch.full((len(encoded), L), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        x[i, :n] = ids[:-1]
        # position j predicts ids[j + 1]; only answer tokens count
        y[i, e.answer_start - 1:n] = ids[e.answer_start:]
    return x, y


def collate_windows(windows: Sequence[Sequence[list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows of a few examples as one right-padded batch [N, T], each window's length [N] and the
    example it belongs to [N] (what a classification head pools over and averages by)."""
    rows = [(i, w) for i, ws in enumerate(windows) for w in ws]
    L = max(len(w) for _, w in rows)
    x = torch.full((len(rows), L), pad, dtype=torch.long)
    for j, (_, w) in enumerate(rows):
        x[j, :len(w)] = torch.tensor(w, dtype=torch.long)
    lengths = torch.tensor([len(w) for _, w in rows], dtype=torch.long)
    group = torch.tensor([i for i, _ in rows], dtype=torch.long)
    return x, lengths, group


class ExampleLoader(SeededOrder):
    """Examples in a seeded per-epoch order; ``state`` is the resume position (like BlockLoader)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n == 0:
            raise InputError("no training examples", key="task.train")
        super().__init__(n, batch_size, seed)


# -- metrics ---------------------------------------------------------------------------------------


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def single_label_metrics(gold: Sequence[int], pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Accuracy and macro-F1 over the fixed class list (a class never predicted nor present scores 0).

    ``pred`` may hold -1 for an answer that could not be parsed: wrong, and in no class's counts.
    """
    n = len(gold)
    correct = sum(int(g == p) for g, p in zip(gold, pred))
    per_class = {}
    for c, name in enumerate(classes):
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        per_class[name] = _f1(tp, fp, fn)
    return {"n": n, "accuracy": correct / n if n else 0.0,
            "macro_f1": sum(per_class.values()) / len(classes) if classes else 0.0,
            "f1_per_class": per_class, "unparsed": sum(1 for p in pred if p < 0)}


def multi_label_metrics(gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], classes: Sequence[str]) -> dict:
    """Document-level micro-F1 (pooled over every document × label) and macro-F1 (mean over labels)."""
    tp = np.zeros(len(classes), dtype=np.int64)
    fp = np.zeros(len(classes), dtype=np.int64)
    fn = np.zeros(len(classes), dtype=np.int64)
    exact = 0
    for g, p in zip(gold, pred):
        g, p = set(g), set(p)
        exact += int(g == p)
        for c in range(len(classes)):
            tp[c] += c in g and c in p
            fp[c] += c not in g and c in p
            fn[c] += c in g and c not in p
    per_class = {name: _f1(int(tp[c]), int(fp[c]), int(fn[c])) for c, name in enumerate(classes)}
    T, P, N = int(tp.sum()), int(fp.sum()), int(fn.sum())
    n = len(gold)
    return {"n": n, "micro_f1": _f1(T, P, N), "macro_f1": sum(per_class.values()) / len(classes),
            "precision": T / (T + P) if T + P else 0.0, "recall": T / (T + N) if T + N else 0.0,
            "exact_match": exact / n if n else 0.0, "f1_per_class": per_class}
