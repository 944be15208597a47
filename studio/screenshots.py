"""Regenerate the README screenshots: ``python -m studio.screenshots OUTDIR``.

Every view is taken four times: at 1600x1000 in the light palette (``OUTDIR/NAME.png``, the README's),
and at 1280x720 and 1600x1000 in light and dark (``OUTDIR/1280x720-light/NAME.png`` and so on), so a
laptop's screen and a dark desktop are looked at whenever the screenshots are.

Works offscreen. Uses a temporary database and launches real tiny runs itself: one that completes,
one (a child of the first) caught mid-run for the live monitor and then stopped, a third at another
sparsity (the three are compared at equal FLOPs), and, when the shared PubMedQA data is there, a dense
fine-tune and a soft prompt on top of the first, so the runs browser shows the pipeline with scores.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SIZE = (1600, 1000)
LOOKS = [((1280, 720), "light"), ((1280, 720), "dark"), (SIZE, "dark"), (SIZE, "light")]  # the last stays on
# the shared PubMedQA data (next to the checkout); without it the pipeline shots are skipped
PUBMEDQA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pubmedqa/pqal_trainval.json"
TASK_QUICK = {"task.train": str(PUBMEDQA), "task.fold": 0, "task.max_examples": 48, "train.max_steps": 24,
              "train.eval_every": 6, "train.checkpoint_every": 24, "train.warmup_steps": 2, "train.threads": 1,
              "train.batch_size": 8}
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


def pipeline_run(app, win, preset: str, values: dict):
    """Start a fine-tuning or prompting run from its preset; None (with the reason) if it did not complete."""
    win.form.load_preset(preset)
    win.tabs.setCurrentWidget(win.form)
    win.form.refresh_parents()
    for k, v in values.items():
        win.form.set_field(k, v)
    if not win.form.is_valid():
        print(f"{preset}: the form rejects the configuration: {win.form.errors}", flush=True)
        return None
    view = win.start_run()
    wait(app, lambda: view.status in ("completed", "failed", "crashed", "stopped") and view.process is None, 300,
         f"the {preset} run")
    if view.status != "completed":
        print(f"{preset}: run {view.status}: {view.banner.text()[:400]}", flush=True)
        return None
    return view


def dark_palette():
    """A dark Fusion palette, as a dark desktop theme gives the application."""
    from PySide6.QtGui import QColor, QPalette

    pal = QPalette()
    role, group = QPalette.ColorRole, QPalette.ColorGroup
    for r, c in ((role.Window, "#2b2b2b"), (role.WindowText, "#e6e6e6"), (role.Base, "#1e1e1e"),
                 (role.AlternateBase, "#2f2f2f"), (role.Text, "#e6e6e6"), (role.Button, "#353535"),
                 (role.ButtonText, "#e6e6e6"), (role.Highlight, "#3d7bd9"), (role.HighlightedText, "#ffffff"),
                 (role.ToolTipBase, "#353535"), (role.ToolTipText, "#e6e6e6"), (role.PlaceholderText, "#8a8a8a"),
                 (role.Link, "#6fa8ff")):
        pal.setColor(r, QColor(c))
    for r in (role.WindowText, role.Text, role.ButtonText):
        pal.setColor(group.Disabled, r, QColor("#7a7a7a"))
    return pal


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m studio.screenshots OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    from PySide6.QtWidgets import QApplication, QScrollArea

    from studio.views.main_window import KEEP, MainWindow

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")  # the same widgets under both palettes
    palettes = {"light": app.style().standardPalette(), "dark": dark_palette()}
    tmp = Path(tempfile.mkdtemp(prefix="mediswift-shots-"))
    win = MainWindow(tmp / "runs.db", tmp / "runs")
    win.close_policy = KEEP
    win.estimate.auto.setChecked(False)
    win.resize(*SIZE)
    win.show()
    shots = []

    def shoot(name: str) -> None:
        for size, look in LOOKS:
            app.setPalette(palettes[look])
            win.resize(*size)
            settle(app)
            folder = out if (size, look) == (SIZE, "light") else out / f"{size[0]}x{size[1]}-{look}"
            folder.mkdir(exist_ok=True)
            image = win.grab()
            image.save(str(folder / name))
            shots.append(folder / name)
            print(folder / name, f"{image.width()}x{image.height()}", flush=True)

    # 1. a run that completes
    for k, v in {**TINY, "name": "hpo-sparse75"}.items():
        win.form.set_field(k, v)
    first = win.start_run()
    wait(app, lambda: first.status in ("completed", "failed", "crashed"), 240, "the first run")
    win.commands.save_annotations(first.run_id, ["demo", "sparse-75"],
                                  "Baseline: 75 % sparse, tiny model on HPO definitions.")

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
    win.commands.save_annotations(second.run_id, ["sparse-90"], "Higher sparsity; stopped early to compare.")

    # 2b. a third sparsity, for the comparison at equal FLOPs
    win.form.load_preset("demo")
    win.tabs.setCurrentWidget(win.form)
    for k, v in {**TINY, "name": "hpo-sparse50", "sparsity.level": 0.5}.items():
        win.form.set_field(k, v)
    third = win.start_run()
    wait(app, lambda: third.status in ("completed", "failed", "crashed"), 240, "the third run")

    # 2c. the pipeline on PubMedQA: dense fine-tune of the first run, then a soft prompt on the fine-tune
    tuned = prompted = None
    if PUBMEDQA.is_file():
        tuned = pipeline_run(app, win, "finetune-pubmedqa", {**TASK_QUICK, "name": "pubmedqa-dense",
                                                            "parent": first.run_id})
        if tuned is not None:
            tuned.monitor.redraw(force=True)
            shoot("finetune_run.png")
            prompted = pipeline_run(app, win, "prompt-pubmedqa", {**TASK_QUICK, "name": "pubmedqa-prompt",
                                                                 "prompt.n_tokens": 8, "parent": tuned.run_id})
            if prompted is not None:
                prompted.bottom.setCurrentWidget(prompted.prompt_table)
                prompted.monitor.redraw(force=True)
                shoot("prompt_run.png")
    else:
        print(f"no PubMedQA data at {PUBMEDQA}: skipping the fine-tuning and prompting screenshots", flush=True)

    # 3. the new-run form with an estimate (demo preset, with its measured ETA)
    win.form.load_preset("demo")
    win.form.set_field("sparsity.kernel", "dense")
    win.tabs.setCurrentWidget(win.form)
    win.estimate.probe.setValue(2)
    win.estimate.estimate()
    wait(app, lambda: not win.estimate.runner.is_running(), 180, "the estimate")
    shoot("new_run_form.png")

    # 3b. the form for a fine-tune: compatible parents only, the task section with its file pickers
    if tuned is not None:
        win.form.load_preset("finetune-pubmedqa")
        win.form.refresh_parents()
        win.form.set_field("parent", first.run_id)
        win.form.set_field("task.train", str(PUBMEDQA))
        win.tabs.setCurrentWidget(win.form)
        win.form.findChild(QScrollArea).verticalScrollBar().setValue(0)  # run, task and prompt sections on top
        shoot("new_run_finetune.png")

    # 4. the runs browser (the deepest run selected: its pipeline chain shows each stage's best score)
    win.browser.refresh()
    win.tabs.setCurrentWidget(win.browser)
    win.browser.select((prompted or tuned or second).run_id)
    shoot("runs_browser.png")

    # 4b. the three sparsities compared at equal FLOPs spent, opened from a multi-selection
    win.browser.select_many([third.run_id, first.run_id, second.run_id])
    panel = win.open_compare(win.browser.selected_ids())
    panel.charts.set_x_axis("flops")
    shoot("compare.png")

    # 5. a finished run opened from the browser: charts from the database
    view = win.open_run(first.run_id)
    view.monitor.redraw(force=True)
    shoot("past_run.png")

    # 6. a sweep from the studio: the New sweep dialog planning a grid at equal FLOPs, then the queue
    # holding its entries (paused first, so nothing trains here)
    from studio.views.sweep_dialog import SweepDialog

    win.tabs.setCurrentWidget(win.queue)
    if not win.store.queue_state()["paused"]:
        win.queue.toggle_pause()
    dlg = SweepDialog(win.store, win.commands, tmp / "runs", win)
    dlg.config.setCurrentText("demo")
    dlg.sets.setPlainText("\n".join(f"{k}={v}" for k, v in TINY.items() if not k.startswith("sparsity.")))
    dlg.set_grid([("sparsity.level", "0.5, 0.75, 0.9"), ("train.lr", "0.001, 0.003")])
    dlg.equal.setChecked(True)
    dlg.budget.setText("5e10")
    dlg.replan()
    dlg.show()
    for size, look in LOOKS:
        app.setPalette(palettes[look])
        settle(app)
        folder = out if (size, look) == (SIZE, "light") else out / f"{size[0]}x{size[1]}-{look}"
        dlg.grab().save(str(folder / "sweep_dialog.png"))
        shots.append(folder / "sweep_dialog.png")
    print(out / "sweep_dialog.png", flush=True)
    if dlg.queue() is not None:
        win.queue.refresh()
        shoot("queue.png")
    else:
        print(f"the sweep was not queued: {dlg.error}", flush=True)

    win.close()
    print(f"{len(shots)} screenshots in {out} (database {tmp / 'runs.db'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
