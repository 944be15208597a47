"""New sweep…: the dialog queues exactly the entries ``mediswift sweep`` queues for the same arguments
(the command run into a second database), shows that command, and refuses what the command refuses with
the command's own message, queueing nothing."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from helpers import TINY, cli_inproc
from PySide6.QtCore import Qt

from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB

# what a queue entry holds, but its timestamps (the sweep id differs between the two databases)
ENTRY_KEYS = ("id", "position", "label", "point", "stage", "config_name", "config_text", "sets", "runs_dir", "cwd",
              "after_id", "status", "run_id")
SETS = [t for t in TINY if not t.startswith(("model.d_model", "train.max_steps"))]


@pytest.fixture
def window(qtbot, tmp_path):
    from studio.views.main_window import KEEP, MainWindow

    Queue(RunDB(tmp_path / "studio.db")).set_paused(True)  # queued, never run: no runner starts
    win = MainWindow(tmp_path / "studio.db", tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    yield win
    win.close()


def open_dialog(qtbot, win):
    from studio.views.sweep_dialog import SweepDialog

    dlg = SweepDialog(win.store, win.commands, win.runs_dir, win)
    qtbot.addWidget(dlg)
    dlg.show()
    return dlg


def entries(db_path) -> tuple[list[dict], list[dict], dict]:
    q = Queue(RunDB(db_path))
    rows = [{k: e[k] for k in ENTRY_KEYS} for e in q.entries()]
    sweeps = [{k: s[k] for k in ("name", "spec")} for s in q.sweeps()]
    return rows, sweeps, {k: q.state()[k] for k in ("paused", "parallel")}


@pytest.mark.quick
def test_the_dialog_queues_what_mediswift_sweep_queues(qtbot, window, tmp_path):
    runs = tmp_path / "elsewhere"  # not the default next to either database: --runs-dir is part of the command
    args = ["sweep", "demo", *[x for s in SETS for x in ("--set", s)], "--grid", "sparsity.level=0,0.5",
            "--grid", "model.d_model=32,48", "--equal-flops", "2e8", "--name", "size × sparsity",
            "--then", "finetune-pubmedqa", "--parallel", "2", "--runs-dir", str(runs)]

    dlg = open_dialog(qtbot, window)
    dlg.config.setCurrentText("demo")
    dlg.sets.setPlainText("\n".join(SETS) + "\n# a comment line is left out\n")
    dlg.set_grid([("sparsity.level", "0, 0.5"), ("model.d_model", "32,48")])
    dlg.equal.setChecked(True)
    dlg.budget.setText("2e8")
    dlg.name.setText("size × sparsity")
    dlg.then_pick.setCurrentText("finetune-pubmedqa")
    qtbot.mouseClick(dlg.findChild(type(dlg.queue_button), "then_add"), Qt.MouseButton.LeftButton)
    dlg.parallel.setValue(2)
    dlg.runs_dir.setText(str(runs))
    qtbot.waitUntil(lambda: dlg.preview is not None and len(dlg.preview["points"]) == 4, timeout=3000)
    # the plan, in units, and the very command
    assert dlg.preview["entries"] == 8 and "4 runs and 4 chained" in dlg.summary.text()
    assert all(dlg.points.topLevelItem(i).text(2).endswith("MFLOP") for i in range(4))
    assert dlg.command_args() == ["mediswift", *args, "--db", str(window.store.path)]
    assert dlg.command.toPlainText().startswith("mediswift sweep demo --set model.n_layer=1")

    qtbot.mouseClick(dlg.queue_button, Qt.MouseButton.LeftButton)
    assert dlg.result() == dlg.DialogCode.Accepted and dlg.queued is not None and len(dlg.queued[1]) == 8

    # the same command, for real, into a second database whose queue is paused as well
    other = tmp_path / "cli.db"
    Queue(RunDB(other)).set_paused(True)
    r = cli_inproc(tmp_path, other, *args, "--json")
    assert r.rc == 0, r.stderr
    assert entries(window.store.path) == entries(other)
    got, _, state = entries(window.store.path)
    assert len(got) == 8 and state["parallel"] == 2
    assert [e["label"] for e in got[:2]] == ["level=0 d_model=32", "level=0 d_model=32 → finetune-pubmedqa"]
    # the Queue tab shows what the dialog queued
    window.queue.refresh()
    assert window.queue.tree.topLevelItemCount() == 8 and not window.queue.empty_hint.isVisibleTo(window.queue)


@pytest.mark.quick
def test_the_dialog_refuses_what_the_command_refuses_and_queues_nothing(qtbot, window, tmp_path):
    dlg = open_dialog(qtbot, window)
    dlg.sets.setPlainText("\n".join(SETS))
    dlg.set_grid([("sparsity.levle", "0,0.5")])
    dlg.replan()
    assert dlg.preview is None and not dlg.queue_button.isEnabled()
    assert "unknown config key 'sparsity.levle'; did you mean 'sparsity.level'?" in dlg.summary.text()
    # the command says the same, word for word, and writes nothing either
    r = cli_inproc(tmp_path, tmp_path / "cli.db", *dlg.command_args()[1:-2])
    assert r.rc == 2 and "unknown config key 'sparsity.levle'" in r.stderr
    dlg.set_grid([("sparsity.level", "0,0.5")])
    dlg.equal.setChecked(True)
    dlg.budget.setText("1e3")
    dlg.replan()
    assert "--equal-flops 1000 is less than one training step" in dlg.summary.text()
    assert dlg.queue() is None and dlg.isVisible()  # it stays open, with the reason
    assert Queue(window.store.db).entries() == [] and Queue(window.store.db).sweeps() == []
    # fixed: it queues, and closes
    dlg.budget.setText("2e8")
    assert dlg.queue() is not None and not dlg.isVisible()
