"""The baseline a practitioner tries first: TF-IDF over word 1-2-grams + logistic regression.

Fitted on the task's training examples, scored on the examples at hand with the task's own metrics,
so it sits beside the model's figures in every evaluation. Multi-label tasks (HoC) get one binary
regression per label (one-vs-rest), single-label tasks (PubMedQA) one multinomial regression. Class
weights are balanced (rare hallmarks would otherwise never be predicted) and the regularisation is
light (C = 10) with sublinear term frequencies: a sensible first try, not a tuned one. On HoC's
train/dev split this scores a dev micro-F1 of 0.739.

scikit-learn is imported here only, when a baseline is asked for.
"""
from __future__ import annotations

from typing import Sequence

from engine.tasks.base import Example, multi_label_metrics, single_label_metrics

NAME = "tfidf_lr"
SETTINGS = {"ngram_range": (1, 2), "sublinear_tf": True, "C": 10.0, "class_weight": "balanced", "max_iter": 2000}


def example_text(ex: Example) -> str:
    """What a bag of words reads of an example: its question (head) and document (context)."""
    return " ".join(part for part in (ex.head, ex.context) if part)


def tfidf_lr_baseline(task, train: Sequence[Example], examples: Sequence[Example]) -> dict:
    """Fit on ``train``, predict ``examples``; the task's metrics, plus what was fitted."""
    if not train or not examples:
        return {"skipped": "no training examples" if not train else "no examples to score"}
    try:
        pred = tfidf_lr_predict(task, train, examples)
    except ValueError as e:  # e.g. texts without a single word: nothing for a bag of words to read
        return {"skipped": f"TF-IDF could not be fitted: {e}"}
    gold = [ex.label for ex in examples]
    m = (multi_label_metrics(gold, pred, task.CLASSES) if task.MULTI_LABEL
         else single_label_metrics(gold, pred, task.CLASSES))
    m.pop("f1_per_class", None)
    m["fitted_on"] = len(train)
    m["model"] = "TF-IDF 1-2-grams (sublinear) + logistic regression (C=10, balanced)"
    return m


def tfidf_lr_predict(task, train: Sequence[Example], examples: Sequence[Example]) -> list:
    """Predicted labels: a tuple of class indices per example (multi-label) or one class index."""
    from threadpoolctl import threadpool_limits

    # one BLAS thread: these small solves are several times faster that way than with threads contending for
    # the cores (HoC, 1,295 abstracts: 7 s instead of 30 s on two busy cores)
    with threadpool_limits(limits=1):
        return _fit_predict(task, train, examples)


def _fit_predict(task, train: Sequence[Example], examples: Sequence[Example]) -> list:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=SETTINGS["ngram_range"], sublinear_tf=SETTINGS["sublinear_tf"])
    x_train = vec.fit_transform([example_text(ex) for ex in train])
    x = vec.transform([example_text(ex) for ex in examples])

    def regression():
        return LogisticRegression(C=SETTINGS["C"], class_weight=SETTINGS["class_weight"], max_iter=SETTINGS["max_iter"])

    if not task.MULTI_LABEL:
        y = np.array([ex.label for ex in train])
        if len(set(y.tolist())) < 2:  # one class seen: that class is the only possible answer
            return [int(y[0])] * len(examples)
        return [int(c) for c in regression().fit(x_train, y).predict(x)]
    n = len(task.CLASSES)
    y = np.zeros((len(train), n), dtype=np.int8)
    for i, ex in enumerate(train):
        y[i, list(ex.label)] = 1
    on = np.zeros((len(examples), n), dtype=bool)
    for c in range(n):
        if y[:, c].min() == y[:, c].max():  # a label always (or never) present in train: predict that
            on[:, c] = bool(y[0, c])
            continue
        on[:, c] = regression().fit(x_train, y[:, c]).predict(x).astype(bool)
    return [tuple(int(c) for c in np.flatnonzero(row)) for row in on]
