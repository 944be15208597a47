"""Benchmark: load and draw 20 runs × 100,000 metric rows in the compare view; metric insert rate.

    QT_QPA_PLATFORM=offscreen python bench/compare_load.py [--runs 20] [--rows 100000]

Targets: load + draw under 1 s; inserts over 50,000 rows/s. The view reads about two rows per horizontal
pixel of a chart for the overview (every k-th step, sought on the index) and re-reads a zoomed range finer.
"Draw" is the event-loop pass that paints the shown window, checked to have painted all six charts. Rows look like the engine's: six
training metrics per step (loss, lr, grad_norm, tokens_per_s, step_time, sparsity) plus val_loss and an
evaluation every 50 steps. Timings are wall-clock on whatever machine runs this; the database is a
fresh file in a temporary folder (page cache warm from the writes, as right after training).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from engine.store.rundb import FLUSH_S, RunDB

TRAIN_NAMES = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time", "sparsity")
DRAWN = ("loss", "val_loss", "sparsity", "tokens_per_s", "grad_norm", "lr")  # the view's six charts
EVAL_EVERY = 50


def steps_for(rows: int) -> int:
    per_step = len(TRAIN_NAMES) + 1 / EVAL_EVERY
    return int(rows / per_step)


def run_rows(run_id: str, steps: int, level: float, rng: np.random.Generator) -> list[tuple]:
    tok_per_step = 4096
    fpt_dense = 6.0e8
    fpt_sparse = fpt_dense * (1 - 0.6 * level)
    s = np.arange(1, steps + 1)
    loss = 8.0 * np.exp(-s / (steps / 4)) + 2.0 + rng.normal(0, 0.05, steps)
    cols = {
        "loss": loss, "lr": np.minimum(1.0, s / 100) * 3e-3, "grad_norm": np.abs(rng.normal(1.0, 0.3, steps)),
        "tokens_per_s": rng.normal(50_000, 2_000, steps), "step_time": rng.normal(0.08, 0.005, steps),
        "sparsity": np.full(steps, level),
    }
    out = []
    for i in range(steps):
        step = i + 1
        tokens = step * tok_per_step
        x = (run_id, step, tokens, step * 0.08, tokens * fpt_sparse, tokens * fpt_dense)
        for n in TRAIN_NAMES:
            out.append((*x, n, float(cols[n][i])))
        if step % EVAL_EVERY == 0:
            out.append((*x, "val_loss", float(loss[i] + 0.1)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rows", type=int, default=100_000, help="metric rows per run")
    ap.add_argument("--per-step-steps", type=int, default=3000, help="steps timed through the engine's per-step path")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mediswift-bench-"))
    db = RunDB(tmp / "runs.db")
    rng = np.random.default_rng(0)
    steps = steps_for(args.rows)

    # -- inserts -------------------------------------------------------------------------------------
    ids, total_rows, insert_s = [], 0, 0.0
    for i in range(args.runs):
        level = (0.0, 0.5, 0.75, 0.9)[i % 4]
        rid = db.create_run(name=f"bench-{i:02d}", stage="pretrain", config={"sparsity": {"level": level}})
        rows = run_rows(rid, steps, level, rng)
        t = time.perf_counter()
        db.insert_metric_rows(rows)  # bulk: one transaction per run
        insert_s += time.perf_counter() - t
        for step in range(EVAL_EVERY, steps + 1, EVAL_EVERY):
            db.db.conn.execute("INSERT INTO evaluations (run_id, step, task, split, metrics, baselines, created_at) "
                               "VALUES (?, ?, 'lm', 'val', '{\"loss\": 2.5}', '{}', 0)", [rid, step])
        db.db.conn.commit()
        db.update_run(rid, status="completed", summary={"step": steps})
        ids.append(rid)
        total_rows += len(rows)
    bulk_rate = total_rows / insert_s

    # the engine's real path: log_metrics once per step, deferred: rows are committed every FLUSH_S
    live = db.create_run(name="per-step", stage="pretrain", config={})
    vals = {n: 1.0 for n in TRAIN_NAMES}
    t = time.perf_counter()
    for step in range(1, args.per_step_steps + 1):
        db.log_metrics(live, step, step * 4096, step * 0.08, step * 1e12, step * 2e12, vals, defer=True)
    db.flush_metrics()
    per_step_s = time.perf_counter() - t
    per_step_rate = args.per_step_steps * len(TRAIN_NAMES) / per_step_s
    t = time.perf_counter()  # for reference: a commit per step, as metrics logged from outside the engine
    for step in range(args.per_step_steps + 1, 2 * args.per_step_steps + 1):
        db.log_metrics(live, step, step * 4096, step * 0.08, step * 1e12, step * 2e12, vals)
    commit_rate = args.per_step_steps * len(TRAIN_NAMES) / (time.perf_counter() - t)
    db.delete_run(live)
    db.close()

    # -- load and draw -------------------------------------------------------------------------------
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from PySide6.QtCore import QEvent, QObject

    from engine.store.queries import load_series
    from studio.models.run_store import RunStore
    from studio.views.compare_view import CompareView

    class PaintCounter(QObject):
        def __init__(self):
            super().__init__()
            self.painted = set()

        def eventFilter(self, obj, ev):
            if ev.type() == QEvent.Type.Paint:
                self.painted.add(obj)
            return False

    db = RunDB(tmp / "runs.db")  # a fresh connection: nothing cached in this process
    view = CompareView(RunStore(db, start=False))
    view.resize(1600, 1000)
    view.show()
    app.processEvents()
    counter = PaintCounter()
    for p in view.panels:
        p.widget.viewport().installEventFilter(counter)

    def clock():
        return time.perf_counter(), time.process_time()

    def since(t):
        return time.perf_counter() - t[0], time.process_time() - t[1]

    t = clock()
    view.set_runs(ids)            # reads every drawn metric of every run, smooths, creates the curves
    load = since(t)
    t = clock()
    app.processEvents()           # layout and paint of the shown window: what the user waits for
    draw = since(t)
    if len(counter.painted) != len(view.panels):
        print(f"warning: only {len(counter.painted)} of {len(view.panels)} charts painted in the timed pass")
    points = view.points_per_curve()
    read_rows = sum(a.size for a in view.data.overview.values())
    drawn_rows = sum(view.data.totals.values())
    t = clock()
    view.set_x_axis("tokens")
    app.processEvents()
    switch = since(t)
    (x0, x1), _ = view.panels[0].plot.viewRange()
    t = clock()
    view.panels[0].plot.setXRange(x0 + 0.45 * (x1 - x0), x0 + 0.55 * (x1 - x0), padding=0)
    view.refine()                 # what the zoom timer runs: the visible range re-read as finely
    app.processEvents()
    zoom = since(t)
    t = clock()
    full = sum(load_series(db, rid, name).size for rid in ids for name in DRAWN)
    full_t = since(t)

    total_ms = (load[0] + draw[0], load[1] + draw[1])
    la = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {la:.1f} while measuring (wall time is shared; CPU time is this process's)")
    print(f"database: {args.runs} runs × {total_rows // args.runs:,} metric rows = {total_rows:,} rows ({tmp / 'runs.db'})")
    print(f"insert, bulk (insert_metric_rows, one transaction per run): {bulk_rate:,.0f} rows/s "
          f"({'meets' if bulk_rate > 50_000 else 'MISSES'} the 50,000 rows/s target)")
    print(f"insert, per step (log_metrics as the engine calls it, {len(TRAIN_NAMES)} rows a step, a commit every "
          f"{FLUSH_S} s at most): {per_step_rate:,.0f} rows/s "
          f"= {args.per_step_steps / per_step_s:,.0f} steps/s; with a commit per step: {commit_rate:,.0f} rows/s")
    print(f"compare view, {args.runs} runs, 6 charts, {drawn_rows:,} rows behind the curves, {read_rows:,} read "
          f"(≤ {points} per curve for charts {view.panels[0].plot.vb.width():.0f} px wide): load {load[0]:.3f} s + draw {draw[0]:.3f} s = {total_ms[0]:.3f} s wall, "
          f"{total_ms[1]:.3f} s CPU ({'meets' if total_ms[0] < 1.0 else 'MISSES'} the 1 s target on wall time)")
    print(f"switch x axis to tokens and redraw: {switch[0]:.3f} s wall, {switch[1]:.3f} s CPU")
    print(f"zoom to 10 % of the x range (visible part re-read as finely as the overview): {zoom[0]:.3f} s wall, {zoom[1]:.3f} s CPU")
    print(f"for reference, reading all {full:,} rows of those curves unthinned: {full_t[0]:.3f} s wall, {full_t[1]:.3f} s CPU")
    db.close()
    view.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
