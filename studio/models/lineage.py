"""The pipeline of a run (vocabulary → sparse pre-training → dense fine-tuning → soft prompting) and
each stage's best score, read from the ``evaluations`` table, next to its majority baseline and the
TF-IDF + logistic regression baseline (``tfidf_lr``, stored since that baseline exists; older runs have none).

Scores are task-specific: PubMedQA accuracy and macro-F1, HoC micro-F1, language modelling the
validation loss (lower is better; its reference is the zero-shot parent, there is no majority class).
"""
from __future__ import annotations

import html

from engine.core.registry import LM
from studio.models.labels import (
    BASELINE_LABELS, MAJORITY, METRIC_LABELS, TFIDF, ZERO_SHOT, score_metrics, stage_short, task_short,
)
from studio.models.run_store import numeric_metrics


def best_from_rows(rows: list[dict]) -> dict | None:
    """Best evaluation of one run from its rows (``metrics``/``baselines`` decoded).

    Task evaluations win over LM ones (a fine-tune on PubMedQA is judged by PubMedQA); the baseline
    is the majority class of the task when stored, else the zero-shot parent; ``tfidf`` is the TF-IDF +
    logistic regression baseline of the same evaluation row (empty when none was stored).
    """
    tasks = [r for r in rows if score_metrics(r.get("task") or "") and r["task"] != LM] or [
        r for r in rows if r.get("task") == LM]
    if not tasks:
        return None
    task = tasks[-1]["task"]
    shown = score_metrics(task)
    key, higher = shown[0], shown[0] != "loss"  # a loss is best low, a score high
    scored = [r for r in tasks if r["task"] == task and key in numeric_metrics(r["metrics"])]
    if not scored:
        return None
    best = (max if higher else min)(scored, key=lambda r: numeric_metrics(r["metrics"])[key])
    metrics = numeric_metrics(best["metrics"])
    baseline, baseline_kind, tfidf = {}, "", {}
    for r in reversed(tasks):  # the final evaluation carries the baselines
        b = r.get("baselines") or {}
        for kind in (MAJORITY, ZERO_SHOT):
            vals = numeric_metrics(b.get(kind) or {})
            if any(m in vals for m in shown):
                baseline, baseline_kind = vals, kind
                break
        tfidf = numeric_metrics(b.get(TFIDF) or {})  # scored on the same examples as the row's majority
        if baseline or any(m in tfidf for m in shown):
            break
    return {"task": task, "step": best["step"], "metrics": {m: metrics[m] for m in shown if m in metrics},
            "baseline": {m: baseline[m] for m in shown if m in baseline}, "baseline_kind": baseline_kind,
            "tfidf": {m: tfidf[m] for m in shown if m in tfidf}}


def best_scores(evaluations_by_run: dict[str, list[dict]]) -> dict[str, dict]:
    """Run id -> best score, for every run with evaluations (``RunStore.evaluations_by_run``: one query)."""
    out = {}
    for rid, rows in evaluations_by_run.items():
        b = best_from_rows(rows)
        if b is not None:
            out[rid] = b
    return out


# what the brackets after a score mean (the runs browser's tooltips)
BASELINES_TIP = ("In brackets, the baselines scored on the same examples: the majority class of the training split "
                 "(the zero-shot parent where there is no majority class, as for LM loss) and TF-IDF over word "
                 "1-2-grams + logistic regression fitted on the training split (runs evaluated before it existed "
                 "have none)")


def score_text(best: dict | None, baseline: bool = True) -> str:
    """'PubMedQA acc 0.620 · macro-F1 0.450 (majority 0.552 · 0.237, TF-IDF 0.601 · 0.410)': the baselines in
    the order of the score's metrics, the TF-IDF one only where it was stored."""
    if not best:
        return ""
    parts = " · ".join(f"{METRIC_LABELS.get(m, m)} {v:.3f}" for m, v in best["metrics"].items())
    text = f"{task_short(best['task'])} {parts}"
    if baseline:
        refs = [(BASELINE_LABELS.get(best["baseline_kind"], best["baseline_kind"]), best["baseline"]),
                (BASELINE_LABELS[TFIDF], best.get("tfidf") or {})]
        shown = [f"{label} " + " · ".join(f"{v:.3f}" for v in vals.values()) for label, vals in refs if vals]
        if shown:
            text += " (" + ", ".join(shown) + ")"
    return text


def chain(runs: dict[str, dict], run_id: str) -> list[dict]:
    """The run and its ancestors, root first; ``runs`` maps id -> run row (a missing parent ends it)."""
    out, seen = [], set()
    row = runs.get(run_id)
    while row is not None and row["id"] not in seen:
        out.append(row)
        seen.add(row["id"])
        row = runs.get(row.get("parent_id") or "")
    return out[::-1]


def chain_html(runs: dict[str, dict], run_id: str, scores: dict[str, dict]) -> str:
    """sparse → dense → prompt, one stage a line with its best score and baseline (rich text for a QLabel;
    one line per stage keeps the side panel narrow)."""
    lines = []
    for i, r in enumerate(chain(runs, run_id)):
        name = html.escape(r.get("name") or r["id"])
        if r["id"] == run_id:
            name = f"<b>{name}</b>"
        score = html.escape(score_text(scores.get(r["id"])))
        lines.append(("&nbsp;&nbsp;" * i + "→ " if i else "")
                     + f"<span style='color:#777'>{stage_short(r['stage'])}</span> {name}"
                     + (f" <span style='color:#2e5c8a'>— {score}</span>" if score else ""))
    return "<br>".join(lines)
