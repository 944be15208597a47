"""What a sweep found (the studio's Study view, its CSV export, docs/results.md): per grid point its run's
training FLOPs, final and best validation loss and validation curve against FLOPs, and the downstream
scores of the runs chained after it (``--then``) with their majority, TF-IDF + logistic regression and zero-shot baselines.
Above the store: no torch, no Qt."""
from __future__ import annotations

import csv
import io
import math

from engine.core import registry
from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB

CSV_COLUMNS = ("entry", "run_id", "label", "status", "sparsity", "d_model", "n_layer", "steps", "flops",
               "flops_dense", "final_val_loss", "best_val_loss", "child_run", "child_stage", "child_task",
               "child_metric", "child_score", "majority", "tfidf_lr", "zero_shot")


def sweep_study(db: RunDB, sweep_id: str) -> dict:
    queue = Queue(db)
    sweep = queue.sweep(sweep_id)
    entries = queue.entries(sweep_id=sweep["id"])
    heads = [e for e in entries if not e["after_id"]]
    points = []
    for e in heads:
        run = db.get_run(e["run_id"]) if e["run_id"] else None
        p = {"entry": e["id"], "label": e["label"], "values": e["point"], "status": e["status"], "run_id": e["run_id"],
             "sparsity": None, "d_model": None, "n_layer": None, "steps": None, "flops": None, "flops_dense": None,
             "final_val_loss": None, "best_val_loss": None, "curve": {"flops": [], "val_loss": []}, "children": []}
        if run is not None:
            cfg, s = run["config"], run["summary"]
            p.update(sparsity=float(cfg["sparsity"]["level"]) if run["stage"] in registry.SPARSE_STAGES else 0.0,
                     d_model=cfg["model"]["d_model"], n_layer=cfg["model"]["n_layer"], steps=s.get("step"),
                     flops=s.get("flops"), flops_dense=s.get("flops_dense"), final_val_loss=_finite(s.get("val_loss")),
                     best_val_loss=_finite(s.get("best_val_loss")))
            for row in db.metrics(run["id"], names=["val_loss"]):
                if _finite(row["value"]) is not None:
                    p["curve"]["flops"].append(row["flops"])
                    p["curve"]["val_loss"].append(row["value"])
        for c in entries:
            if c["after_id"] == e["id"]:
                p["children"].append(_child(db, c))
        points.append(p)
    return {"sweep": {"id": sweep["id"], "name": sweep["name"]}, "spec": sweep["spec"], "points": points}


def _child(db: RunDB, e: dict) -> dict:
    out = {"entry": e["id"], "run_id": e["run_id"], "stage": e["stage"], "status": e["status"], "label": e["label"],
           "task": None, "metric": None, "metrics": {}, "baselines": {}}
    if not e["run_id"]:
        return out
    evals = db.evaluations(e["run_id"])
    dev = [ev for ev in evals if ev["split"] == "dev"] or evals
    if dev:
        last = dev[-1]
        out.update(task=last["task"], metrics=last["metrics"], baselines=last["baselines"],
                   metric=_headline(last["task"]))
    return out


def _headline(task: str) -> str | None:
    """The score a task is judged by: the first of its registry headline metrics."""
    spec = registry.TASKS.get(task)
    return spec.headline[0] if spec else None


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def study_csv(study: dict) -> str:
    """One row per grid point and chained run (a point without chained runs: one row)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for p in study["points"]:
        base = [p["entry"], p["run_id"], p["label"], p["status"], p["sparsity"], p["d_model"], p["n_layer"],
                p["steps"], p["flops"], p["flops_dense"], p["final_val_loss"], p["best_val_loss"]]
        for c in p["children"] or [None]:
            if c is None:
                w.writerow(base + [None] * 7)
                continue
            m = c["metric"]
            w.writerow(base + [c["run_id"], c["stage"], c["task"], m, c["metrics"].get(m) if m else None,
                               (c["baselines"].get("majority") or {}).get(m) if m else None,
                               (c["baselines"].get("tfidf_lr") or {}).get(m) if m else None,
                               (c["baselines"].get("zero_shot") or {}).get(m) if m else None])
    return buf.getvalue()
