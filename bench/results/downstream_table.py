"""Print what the downstream sweeps of docs/results.md found, from the run database, as Markdown tables.

    python bench/results/downstream_table.py --db results/runs.db

Reads the sweeps bench/results/downstream.sh queues (by name, see SWEEPS) through engine.orchestrate (the
queue's entries, engine.orchestrate.study for the parents) and the store's run and evaluation rows; no SQL
of its own. A run's score is the development evaluation of the model it keeps: the best epoch's with
train.epochs or early stopping (what `mediswift eval` and export-hf use; the epoch is chosen on the same dev
data, as the decision thresholds are), else its last; its baselines (majority, tfidf_lr, zero_shot) are the
ones stored with that evaluation. Runs are grouped by what they
start from: the parent's sparsity (dense / 50 % / 75 %), or "random init" for train.init = random.

Means count the runs that completed with a score; the others (waiting, running, failed, crashed, stopped,
skipped, cancelled) are named beside them and listed in the last table, never dropped. A sweep missing
from the database is said to be missing; a partial database gives partial tables. Spreads are sample
standard deviations (n - 1), "–" for fewer than two runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.core.hardware import cpu_header  # noqa: E402
from engine.core.registry import TASKS  # noqa: E402
from engine.orchestrate.queue import Queue  # noqa: E402
from engine.orchestrate.study import sweep_study  # noqa: E402
from engine.store.rundb import RunDB  # noqa: E402

PARENTS = "downstream-parents"
SWEEPS = {  # table -> the sweeps downstream.sh queues for it
    "hoc": ("downstream-hoc", "downstream-hoc-random"),
    "pubmedqa": ("downstream-pubmedqa", "downstream-pubmedqa-random"),
    "prompt": ("downstream-prompt", "downstream-prompt-hoc"),
}
RANDOM = "random init"


def fmt(v, spec=".4f") -> str:
    return "–" if v is None else format(v, spec)


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def sd(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) >= 2 else None


def mean_sd(xs: list[float]) -> str:
    return f"{fmt(mean(xs))} ± {fmt(sd(xs))} (n={len(xs)})"


def wall(run: dict | None) -> str:
    """Wall-clock time of a run from its row: started to finished (to now, for a live one)."""
    if not run or not run.get("started_at"):
        return "–"
    end = run.get("finished_at") or (time.time() if run["status"] in ("running", "paused") else None)
    if end is None:
        return "–"
    s = int(round(end - run["started_at"]))
    text = f"{s} s" if s < 120 else (f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min")
    return text + (" so far" if not run.get("finished_at") else "")


def _level_name(level) -> str:
    return "dense" if not level else f"{float(level) * 100:g} %"


def _sets(entry: dict) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (s.partition("=") for s in entry.get("sets") or [])}


class Study:
    """The downstream sweeps of one database: their entries with run rows, scores and parent groups."""

    def __init__(self, db: RunDB):
        self.db = db
        self.queue = Queue(db)
        self.sweeps = self.queue.sweeps()
        self._runs: dict[str, dict | None] = {}

    def run(self, run_id: str | None) -> dict | None:
        if not run_id:
            return None
        if run_id not in self._runs:
            self._runs[run_id] = self.db.get_run(run_id)
        return self._runs[run_id]

    def sweep_ids(self, name: str) -> list[str]:
        return [s["id"] for s in self.sweeps if s["name"] == name]

    def group(self, entry: dict, run: dict | None) -> tuple[tuple, str]:
        """(sort key, label) of what a downstream run starts from."""
        sets = _sets(entry)
        init = (run["config"]["train"].get("init") if run else sets.get("train.init")) or "parent"
        parent_id = (run or {}).get("parent_id") or str((entry.get("point") or {}).get("parent") or sets.get("parent", ""))
        if init == "random":
            return (2, 0.0, ""), RANDOM
        parent = self.run(parent_id)
        if parent is None:
            return (1, 0.0, parent_id), f"parent {parent_id or '?'}"
        level = float(((parent.get("config") or {}).get("sparsity") or {}).get("level") or 0.0)
        return (0, level, ""), _level_name(level)

    def rows(self, names: tuple[str, ...]) -> tuple[list[dict], list[str]]:
        """One row per queue entry of these sweeps; and the names the database does not hold."""
        out, missing = [], []
        for name in names:
            ids = self.sweep_ids(name)
            if not ids:
                missing.append(name)
            for sid in ids:
                for e in self.queue.entries(sweep_id=sid):
                    out.append(self.row(name, e))
        return out, missing

    def row(self, sweep: str, e: dict) -> dict:
        run = self.run(e["run_id"])
        key, label = self.group(e, run)
        r = {"sweep": sweep, "entry": e["id"], "label": e["label"], "run": run, "run_id": e["run_id"],
             "status": run["status"] if run else e["status"], "error": (run or {}).get("error") or e.get("error"),
             "group_key": key, "group": label, "task": None, "metric": None, "score": None, "baselines": {},
             "seed": None, "fold": None, "head": None}
        if run:
            cfg = run["config"]
            r.update(seed=cfg["train"].get("seed"), fold=cfg.get("task", {}).get("fold"), task=cfg.get("task", {}).get("name"),
                     head=cfg.get("task", {}).get("head"))
            evals = self.db.evaluations(run["id"])
            dev = [ev for ev in evals if ev["split"] == "dev"]
            if dev:
                # the model the run keeps (its best evaluation's checkpoint with train.epochs or early
                # stopping, else its last): what `mediswift eval` and export-hf use
                best = ((run.get("meta") or {}).get("best_checkpoint") or {}).get("step")
                last = next((ev for ev in reversed(dev) if ev["step"] == best), dev[-1])
                spec = TASKS.get(last["task"])
                metric = spec.headline[0] if spec else None
                r.update(task=last["task"], metric=metric, score=last["metrics"].get(metric) if metric else None,
                         baselines={k: (v or {}).get(metric) for k, v in (last["baselines"] or {}).items()
                                    if isinstance(v, dict) and "skipped" not in v})
        else:
            point = e.get("point") or {}
            r.update(seed=point.get("train.seed"), fold=point.get("task.fold"))
        r["done"] = r["status"] == "completed" and r["score"] is not None
        return r


def groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    by: dict[tuple, tuple[str, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["group_key"], (r["group"], []))[1].append(r)
    return [by[k] for k in sorted(by)]


def pending(rows: list[dict], what: str) -> str:
    """The runs of a group not in its mean, with their status."""
    left = [r for r in rows if not r["done"]]
    return ", ".join(f"{what} {r[what]}: {r['status'] if r['status'] != 'completed' else 'no score'}"
                     for r in left) or "–"


def baseline_mean(rows: list[dict], name: str) -> float | None:
    return mean([r["baselines"][name] for r in rows if r["baselines"].get(name) is not None])


def print_missing(missing: list[str]) -> None:
    for name in missing:
        print(f"\n(sweep {name}: not in this database yet)")


def parents_table(st: Study, rows: list[dict]) -> None:
    print("\n### Parents (pre-training)")
    pts = []
    for sid in st.sweep_ids(PARENTS):
        pts += sweep_study(st.db, sid)["points"]
    seen = {p["run_id"] for p in pts if p["run_id"]}
    for r in rows:  # parents given by PARENTS=… rather than by the parents sweep
        parent_id = (r["run"] or {}).get("parent_id")
        if parent_id and parent_id not in seen and st.run(parent_id):
            seen.add(parent_id)
            run = st.run(parent_id)
            pts.append({"label": run["name"], "run_id": parent_id, "status": run["status"],
                        "sparsity": run["config"].get("sparsity", {}).get("level"), "steps": run["summary"].get("step"),
                        "flops": run["summary"].get("flops"), "final_val_loss": run["summary"].get("val_loss")})
    if not pts:
        print(f"\n(sweep {PARENTS}: not in this database, and no downstream run names a parent yet)")
        return
    print("\n| parent | run | status | sparsity | steps | training FLOPs | final val loss | wall-clock |")
    print("|---|---|---|---|---|---|---|---|")
    for p in sorted(pts, key=lambda p: (p["sparsity"] is None, p["sparsity"] or 0.0)):
        name = _level_name(p["sparsity"]) if p["sparsity"] is not None else p["label"]
        print(f"| {name} | {p['run_id'] or '–'} | {p['status']} | {fmt(p['sparsity'], '.2f')} | {p['steps'] or '–'} | "
              f"{fmt(p['flops'], '.4g')} | {fmt(p['final_val_loss'])} | {wall(st.run(p['run_id']))} |")


def hoc_table(rows: list[dict], missing: list[str]) -> None:
    print("\n### HoC: dev micro-F1 over the seeds (finetune-hoc)")
    print_missing(missing)
    if not rows:
        return
    print("\n| start from | micro-F1 mean ± sd (n) | per seed | majority | tfidf_lr | not in the mean |")
    print("|---|---|---|---|---|---|")
    for label, rs in groups(rows):
        done = sorted((r for r in rs if r["done"]), key=lambda r: (r["seed"] is None, r["seed"] or 0))
        per = ", ".join(f"seed {r['seed']}: {fmt(r['score'])}" for r in done) or "–"
        print(f"| {label} | {mean_sd([r['score'] for r in done])} | {per} | {fmt(baseline_mean(done, 'majority'))} | "
              f"{fmt(baseline_mean(done, 'tfidf_lr'))} | {pending(rs, 'seed')} |")


def pubmedqa_table(rows: list[dict], missing: list[str]) -> None:
    print("\n### PubMedQA: dev accuracy over the cross-validation folds (finetune-pubmedqa)")
    print_missing(missing)
    if not rows:
        return
    print("\n| start from | folds finished | accuracy mean ± sd (n) | majority mean (same folds) | "
          "tfidf_lr mean (same folds) | per fold | not in the mean |")
    print("|---|---|---|---|---|---|---|")
    for label, rs in groups(rows):
        done = sorted((r for r in rs if r["done"]), key=lambda r: (r["fold"] is None, r["fold"] or 0))
        per = ", ".join(f"{r['fold']}: {fmt(r['score'], '.2f')}" for r in done) or "–"
        print(f"| {label} | {len(done)} of {len(rs)} | {mean_sd([r['score'] for r in done])} | "
              f"{fmt(baseline_mean(done, 'majority'))} | {fmt(baseline_mean(done, 'tfidf_lr'))} | {per} | "
              f"{pending(rs, 'fold')} |")


def prompt_table(rows: list[dict], missing: list[str]) -> None:
    print("\n### Soft prompts on the frozen parents (prompt-pubmedqa)")
    print_missing(missing)
    if not rows:
        return
    print("\n| start from | task | head | dev metric | score | majority | tfidf_lr | zero-shot parent | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rs in groups(rows):
        for r in sorted(rs, key=lambda r: r["sweep"]):
            b = r["baselines"]
            print(f"| {label} | {r['task'] or '–'} | {r['head'] or '–'} | {r['metric'] or '–'} | {fmt(r['score'])} | "
                  f"{fmt(b.get('majority'))} | {fmt(b.get('tfidf_lr'))} | {fmt(b.get('zero_shot'))} | {r['status']} |")


def runs_table(rows: list[dict]) -> None:
    print("\n### Every downstream run")
    if not rows:
        print("\n(no downstream sweep in this database yet)")
        return
    print("\n| sweep | entry | point | start from | status | run | score | wall-clock |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        status = r["status"] + (f" ({r['error']})" if r["error"] and r["status"] != "completed" else "")
        print(f"| {r['sweep']} | {r['entry']} | {r['label']} | {r['group']} | {status.replace('|', '/')} | "
              f"{r['run_id'] or '–'} | {fmt(r['score'])} | {wall(r['run'])} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True)
    a = p.parse_args()
    if not Path(a.db).is_file():
        print(f"no run database at {a.db}", file=sys.stderr)
        return 2
    st = Study(RunDB(a.db))
    print(cpu_header())
    found = {k: st.rows(names) for k, names in SWEEPS.items()}
    parents_table(st, [r for rows, _ in found.values() for r in rows])
    hoc_table(*found["hoc"])
    pubmedqa_table(*found["pubmedqa"])
    prompt_table(*found["prompt"])
    runs_table([r for rows, _ in found.values() for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
