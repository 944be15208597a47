"""Regenerate the README screenshots: ``python -m studio.screenshots OUTDIR``.

Works offscreen. Uses a temporary database and launches real tiny runs itself: one that completes,
one (a child of the first) caught mid-run for the live monitor and then stopped, so the runs browser
shows lineage, statuses, tags and notes.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SIZE = (1600, 1000)
TINY = {
    "model.n_layer": 2, "model.d_model": 64, "model.n_head": 2, "model.n_ctx": 64, "tokenizer.vocab_size": 512,
    "data.max_documents": 2000, "train.batch_size": 8, "train.max_steps": 240, "train.warmup_steps": 20,
    "train.eval_every": 40, "train.checkpoint_every": 120, "train.threads": 1, "sparsity.kernel": "dense",
}


def wait(app, cond, timeout: float, what: str) -> None:
    print(f"waiting for {what}…", flush=True)
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        app.processEvents()
        time.sleep(0.02)


def settle(app, seconds: float = 0.4) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m studio.screenshots OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    from PySide6.QtWidgets import QApplication

    from .main_window import KEEP, MainWindow

    app = QApplication.instance() or QApplication([])
    tmp = Path(tempfile.mkdtemp(prefix="mediswift-shots-"))
    win = MainWindow(tmp / "runs.db", tmp / "runs")
    win.close_policy = KEEP
    win.estimate.auto.setChecked(False)
    win.resize(*SIZE)
    win.show()
    shots = []

    def shoot(name: str) -> None:
        settle(app)
        path = out / name
        win.grab().save(str(path))
        shots.append(path)
        print(path, flush=True)

    # 1. a run that completes
    for k, v in {**TINY, "name": "hpo-sparse75"}.items():
        win.form.set_field(k, v)
    first = win.start_run()
    wait(app, lambda: first.status in ("completed", "failed", "crashed"), 240, "the first run")
    win.db.update_run(first.run_id, tags=["demo", "sparse-75"], notes="Baseline: 75 % sparse, tiny model on HPO definitions.")

    # 2. a child run, caught mid-run for the live monitor, then stopped
    win.tabs.setCurrentWidget(win.form)
    for k, v in {**TINY, "name": "hpo-sparse90", "sparsity.level": 0.9, "train.max_steps": 2000,
                 "parent": first.run_id}.items():
        win.form.set_field(k, v)
    second = win.start_run()
    wait(app, lambda: (second.data.last_step or 0) >= 160 or second.status in ("failed", "crashed"), 240, "the live run")
    second.monitor.redraw(force=True)
    shoot("live_monitor.png")
    second.stop()
    wait(app, lambda: second.status in ("stopped", "crashed", "failed", "completed"), 120, "the stop")
    win.db.update_run(second.run_id, tags=["sparse-90"], notes="Higher sparsity; stopped early to compare.")

    # 3. the new-run form with an estimate (demo preset, with its measured ETA)
    win.form.load_preset("demo")
    win.form.set_field("sparsity.kernel", "dense")
    win.tabs.setCurrentWidget(win.form)
    win.estimate.probe.setValue(2)
    win.estimate.estimate()
    wait(app, lambda: not win.estimate.runner.is_running(), 180, "the estimate")
    shoot("new_run_form.png")

    # 4. the runs browser
    win.browser.refresh()
    win.tabs.setCurrentWidget(win.browser)
    win.browser.select(second.run_id)
    shoot("runs_browser.png")

    # 5. a finished run opened from the browser: charts from the database
    view = win.open_run(first.run_id)
    view.monitor.redraw(force=True)
    shoot("past_run.png")

    win.close()
    print(f"{len(shots)} screenshots in {out} (database {tmp / 'runs.db'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
