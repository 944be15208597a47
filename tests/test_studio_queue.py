"""The studio's Queue and Study views on a real queue: runs added from the form and by a sweep, reordered,
worked by a detached runner that outlives two studio restarts, and the sweep's study exported."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import csv
import json
import signal
import subprocess
import sys

import pytest
from helpers import REPO, TINY as TINY_SETS, engine_env, sets
from PySide6.QtCore import Qt

from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB, pid_alive
from studio.views.main_window import KEEP, MainWindow

FORM = {
    "model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.n_ctx": 32, "tokenizer.vocab_size": 300,
    "data.max_documents": 300, "train.batch_size": 4, "train.max_steps": 5, "train.eval_every": 5,
    "train.checkpoint_every": 5, "train.threads": 1, "sparsity.kernel": "dense",
}
TIMEOUT_MS = 150_000


@pytest.fixture
def studio(qtbot, tmp_path):
    windows = []

    def make():
        w = MainWindow(tmp_path / "runs.db", tmp_path / "runs")
        w.estimate.auto.setChecked(False)
        w.close_policy = KEEP
        qtbot.addWidget(w)
        windows.append(w)
        return w

    yield make
    for w in windows:
        w.close()
    q = Queue(RunDB(tmp_path / "runs.db"))
    q.set_paused(True)
    pid = q.runner_pid()
    for e in q.entries():
        if e["status"] == "running" and pid_alive(e["pid"], e["pid_start"]):
            os.killpg(e["pid"], signal.SIGKILL)
    if pid:
        os.kill(pid, signal.SIGKILL)


def _statuses(win) -> dict[int, str]:
    win.queue.refresh()
    t = win.queue.tree
    return {int(t.topLevelItem(i).text(0)): t.topLevelItem(i).text(4) for i in range(t.topLevelItemCount())}


def test_the_queue_survives_studio_restarts_and_the_study_exports(qtbot, studio, tmp_path):
    win = studio()
    qtbot.mouseClick(win.queue.pause_button, Qt.MouseButton.LeftButton)
    assert win.store.queue_state()["paused"] and win.queue.pause_button.text() == "Resume queue"
    for key, value in FORM.items():
        win.form.set_field(key, value)
    qtbot.mouseClick(win.form.queue_button, Qt.MouseButton.LeftButton)
    assert win.tabs.currentWidget() is win.queue
    (form_entry,) = _statuses(win)
    # a sweep of two sparsity levels, from the command line, into the same queue
    cmd = [sys.executable, "-m", "engine", "sweep", "demo",
           *sets(*(t for t in TINY_SETS if not t.startswith("train.max_steps")), "train.max_steps=5",
                 "sparsity.kernel=dense"),
           "--grid", "sparsity.level=0,0.5", "--name", "levels", "--json", "--db", str(tmp_path / "runs.db")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=engine_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    sweep = json.loads(out.stdout.splitlines()[-1])
    first, second = sweep["entries"]
    assert _statuses(win) == {form_entry: "waiting", first: "waiting", second: "waiting"}
    # the sweep's last point goes first: select it and move it up twice
    win.queue.select([second])
    qtbot.mouseClick(win.queue.up_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(win.queue.up_button, Qt.MouseButton.LeftButton)
    assert list(_statuses(win)) == [second, form_entry, first]
    win.close()  # paused, three waiting

    win = studio()  # a new studio shows the queue as it was left, and resumes it
    assert list(_statuses(win)) == [second, form_entry, first]
    assert win.queue.pause_button.text() == "Resume queue"
    qtbot.mouseClick(win.queue.pause_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.store.runner_pid() is not None, timeout=TIMEOUT_MS)
    runner = win.store.runner_pid()
    qtbot.waitUntil(lambda: _statuses(win)[second] == "running", timeout=TIMEOUT_MS)
    win.close()  # mid-run: the runner and its run go on without a studio

    win = studio()
    qtbot.waitUntil(lambda: set(_statuses(win).values()) == {"completed"}, timeout=TIMEOUT_MS)
    db = RunDB(tmp_path / "runs.db")
    entries = {e["id"]: e for e in Queue(db).entries()}
    assert [db.get_run(entries[i]["run_id"])["status"] for i in (second, form_entry, first)] == ["completed"] * 3
    starts = [entries[i]["started_at"] for i in (second, form_entry, first)]
    assert starts == sorted(starts)
    assert Queue(db).runner_pid() in (None, runner)  # one runner worked it throughout

    study = win.open_study(sweep["sweep"]["id"])
    assert win.tabs.currentWidget() is study and study.levels() == [0.0, 0.5]
    for e in (first, second):
        run = db.get_run(entries[e]["run_id"])
        x, y = study.marker_series[run["config"]["sparsity"]["level"]]
        assert list(x) == [run["summary"]["flops"]] and list(y) == pytest.approx([run["summary"]["val_loss"]])
    assert study.table.rowCount() == 2
    from studio.widgets.chart_export import export_plot

    png = export_plot(study.plots()["Validation loss against training FLOPs"], tmp_path / "study.png", 800, 500)
    svg = export_plot(study.plots()["Downstream scores"], tmp_path / "scores.svg", 800, 500)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in svg.read_bytes()
    rows = list(csv.DictReader(open(study.export_csv(tmp_path / "study.csv"))))
    assert sorted(r["run_id"] for r in rows) == sorted(entries[e]["run_id"] for e in (first, second))
    assert {float(r["sparsity"]) for r in rows} == {0.0, 0.5}
