"""The studio driving real engine runs: launch from the form, stop, crash, close and re-attach."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import signal
import time

import pytest
from helpers import process_table

from engine.store.rundb import RunDB, pid_alive
from studio.views.main_window import KEEP, MainWindow

TINY = {
    "model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.n_ctx": 32, "tokenizer.vocab_size": 300,
    "data.max_documents": 300, "train.batch_size": 4, "train.max_steps": 30, "train.eval_every": 10,
    "train.checkpoint_every": 10, "train.threads": 1, "sparsity.kernel": "dense",
}
LONG = {**TINY, "train.max_steps": 100_000, "train.eval_every": 1000, "train.checkpoint_every": 1000}
RUN_TIMEOUT_MS = 90_000


def _kill_leftovers(win):
    for v in win.views:
        if v.pid and pid_alive(v.pid):
            try:
                os.killpg(v.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def studio(qtbot, tmp_path):
    windows = []

    def make():
        w = MainWindow(tmp_path / "runs.db", tmp_path / "runs")
        w.estimate.auto.setChecked(False)  # a probe would compete with the run for 2 cores
        w.close_policy = KEEP
        qtbot.addWidget(w)
        windows.append(w)
        return w

    yield make
    for w in windows:
        _kill_leftovers(w)
        w.close()


def start_from_form(qtbot, win, values):
    from PySide6.QtCore import Qt

    for key, value in values.items():
        win.form.set_field(key, value)
    assert win.form.start_button.isEnabled(), win.form.errors
    qtbot.mouseClick(win.form.start_button, Qt.MouseButton.LeftButton)
    view = win.tabs.currentWidget()
    qtbot.waitUntil(lambda: view.run_id is not None, timeout=RUN_TIMEOUT_MS)
    return view


@pytest.mark.quick
def test_tiny_run_streams_until_completed_and_charts_match_db(qtbot, studio):
    win = studio()
    view = start_from_form(qtbot, win, TINY)
    qtbot.waitUntil(lambda: view.status == "completed" and view.process is None, timeout=RUN_TIMEOUT_MS)
    view.monitor.redraw()
    db = RunDB(win.store.db.path)
    rows = db.metrics(view.run_id, names=["loss"])
    assert [r["step"] for r in rows] == list(range(1, 31))
    x, y = view.monitor.curve_points("loss")
    assert list(x) == [r["step"] for r in rows]
    assert list(y) == pytest.approx([r["value"] for r in rows])
    # validation loss, FLOPs and the saved counter come from the same run
    vx, vy = view.monitor.curve_points("val_loss")
    evals = [e for e in db.evaluations(view.run_id) if e["split"] == "val"]
    assert list(vx) == [e["step"] for e in evals] == [10, 20, 30]
    assert list(vy) == pytest.approx([e["metrics"]["loss"] for e in evals])
    fx, fy = view.monitor.curve_points("flops")
    _dx, dy = view.monitor.curve_points("flops_dense")
    assert fy[-1] == pytest.approx(rows[-1]["flops"]) and dy[-1] == pytest.approx(rows[-1]["flops_dense"])
    assert dy[-1] > fy[-1] > 0 and "FLOP" in view.monitor.flops_saved_label.text()
    assert view.progress.value() == 30 and view.data.layer_names()
    assert db.get_run(view.run_id)["status"] == "completed"
    assert any("completed" in t for _k, t in view.log.lines)
    # the x axis switches to tokens without losing points
    view.monitor.set_x_axis("tokens")
    x, _ = view.monitor.curve_points("loss")
    assert list(x) == [r["tokens"] for r in rows]
    # the runs browser lists it and opening it again shows the charts from the database
    win.browser.refresh()
    assert win.browser.item_for(view.run_id) is not None
    db.close()


def test_stop_mid_run_ends_stopped_with_checkpoint(qtbot, studio):
    from PySide6.QtCore import Qt

    win = studio()
    view = start_from_form(qtbot, win, LONG)
    qtbot.waitUntil(lambda: (view.data.last_step or 0) >= 5, timeout=RUN_TIMEOUT_MS)
    assert view.buttons["stop"].isEnabled()
    qtbot.mouseClick(view.buttons["stop"], Qt.MouseButton.LeftButton)
    try:
        qtbot.waitUntil(lambda: view.status == "stopped" and view.process is None, timeout=RUN_TIMEOUT_MS)
    except Exception:
        print(view.status, view.process, view.log.text()[-3000:])
        raise
    ck = win.store.db.latest_checkpoint(view.run_id)
    assert ck is not None and ck["step"] >= 5
    assert win.store.db.get_run(view.run_id)["status"] == "stopped"
    assert view.process_exit_code == 0
    assert view.buttons["restart"].isEnabled()  # resume from checkpoint is offered


def test_killed_engine_shows_crashed_with_log_tail(qtbot, studio):
    win = studio()
    view = start_from_form(qtbot, win, LONG)
    qtbot.waitUntil(lambda: (view.data.last_step or 0) >= 3, timeout=RUN_TIMEOUT_MS)
    os.kill(view.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: view.status == "crashed", timeout=30_000)
    assert win.store.db.get_run(view.run_id)["status"] == "crashed"
    assert view.banner.isVisibleTo(view)
    assert "crashed" in view.banner.text() and "started" in view.banner.text()  # engine.log tail is shown


def test_close_and_reopen_reattaches_to_running_run(qtbot, studio):
    win = studio()
    view = start_from_form(qtbot, win, LONG)
    qtbot.waitUntil(lambda: (view.data.last_step or 0) >= 3, timeout=RUN_TIMEOUT_MS)
    run_id, pid = view.run_id, view.pid
    win.close()  # close policy: keep running
    time.sleep(0.5)
    assert pid_alive(pid), "closing the studio must not kill the run"

    win2 = studio()
    again = win2.view_for(run_id)
    assert again is not None and again.status == "running" and again.process is None
    seen = again.data.last_step
    qtbot.waitUntil(lambda: (again.data.last_step or 0) >= seen + 5, timeout=30_000)
    # charts keep filling from the database, point for point
    rows = win2.store.db.metrics(run_id, names=["loss"])
    x, _ = again.monitor.curve_points("loss")
    assert list(x) == [r["step"] for r in rows][: len(x)]
    again.stop()  # through signals now: SIGTERM to the engine's pid
    qtbot.waitUntil(lambda: again.status == "stopped", timeout=RUN_TIMEOUT_MS)
    assert win2.store.db.latest_checkpoint(run_id) is not None


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (the engine, torchrun's agent and every rank)."""
    return [p["pid"] for p in process_table() if p["pgid"] == pgid]


GROUP = {**LONG, "train.nproc": 2, "train.threads": 0}


def test_two_process_run_is_live_in_the_header_and_stop_ends_every_rank(qtbot, studio):
    from PySide6.QtCore import Qt

    win = studio()
    view = start_from_form(qtbot, win, GROUP)
    qtbot.waitUntil(lambda: (view.data.last_step or 0) >= 5, timeout=RUN_TIMEOUT_MS)
    qtbot.waitUntil(lambda: "per rank" in view.world_label.text(), timeout=10_000)
    assert view.world_label.text().startswith("2 processes · ddp · ")
    pgid = win.store.db.get_run(view.run_id)["meta"]["pgid"]
    assert len(_group_members(pgid)) >= 3  # the engine and its two ranks
    qtbot.mouseClick(view.buttons["stop"], Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: view.status == "stopped" and view.process is None, timeout=RUN_TIMEOUT_MS)
    assert view.process_exit_code == 0
    run = win.store.db.get_run(view.run_id)
    assert run["status"] == "stopped" and win.store.db.latest_checkpoint(view.run_id)["step"] == run["summary"]["step"]
    qtbot.waitUntil(lambda: not _group_members(pgid), timeout=10_000)


def test_a_second_stop_kills_the_whole_process_group(qtbot, studio):
    win = studio()
    view = start_from_form(qtbot, win, GROUP)
    qtbot.waitUntil(lambda: (view.data.last_step or 0) >= 3, timeout=RUN_TIMEOUT_MS)
    pgid = win.store.db.get_run(view.run_id)["meta"]["pgid"]
    view.stop()
    assert view.buttons["stop"].text() == "Kill now"
    view.stop()
    qtbot.waitUntil(lambda: view.process is None, timeout=30_000)
    qtbot.waitUntil(lambda: not _group_members(pgid), timeout=10_000)
    assert any("killing the run's processes now" in t for _k, t in view.log.lines)
    # never left running: the studio marks it once the last rank has gone
    qtbot.waitUntil(lambda: win.store.db.get_run(view.run_id)["status"] in ("crashed", "stopped"), timeout=10_000)
