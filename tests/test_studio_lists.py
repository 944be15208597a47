"""The studio's lists stay current and read right: a run the engine completes shows in the Runs tab within
half a second (no waiting for a periodic list read), columns sort by value, FLOPs carry their unit,
Delete is off (and looks off) with nothing selected, delete goes to a trash that Undo empties back
without losing a row or a file, and the Queue shows each running entry's step, progress and time left,
or how to fill it when it is empty.

Rows are written through the engine's own store API (``RunDB``, ``Queue``) from a second connection, as
an engine process and a queue runner write them.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QMessageBox

from engine.orchestrate.queue import Queue
from engine.store.rundb import RunDB


@pytest.fixture
def window(qtbot, tmp_path):
    from studio.views.main_window import KEEP, MainWindow

    Queue(RunDB(tmp_path / "runs.db")).set_paused(True)  # queued entries stay queued: no runner, no training
    win = MainWindow(tmp_path / "runs.db", tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    win.resize(1280, 720)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    yield win
    win.close()


@pytest.fixture
def engine(tmp_path):
    """The engine's side: a second connection to the same database."""
    db = RunDB(tmp_path / "runs.db")
    yield db
    db.close()


def finished_run(db: RunDB, name: str, steps: int, flops_per_step: float, created_at: float, loss: float = 3.0,
                 status: str = "completed") -> str:
    """A run as the engine leaves it: metric rows each step, then its summary and its final status."""
    rid = db.create_run(name=name, stage="pretrain", config={"train": {"max_steps": steps}})
    db.update_run(rid, created_at=created_at)
    db.mark_running(rid)
    db.insert_metric_rows([(rid, s, s * 64, s * 0.1, s * flops_per_step, 2 * s * flops_per_step, "loss", loss + 1 / s)
                           for s in range(1, steps + 1)])
    db.update_run(rid, summary={"step": steps, "flops": steps * flops_per_step, "val_loss": loss})
    db.set_status(rid, status)
    return rid


def column(browser, name: str) -> list[str]:
    from studio.views.runs_browser import COLUMNS

    col = COLUMNS.index(name)
    tree = browser.tree
    return [tree.topLevelItem(i).text(col) for i in range(tree.topLevelItemCount())]


@pytest.mark.quick
def test_a_run_the_engine_completes_shows_in_the_runs_tab_within_half_a_second(qtbot, window, engine, monkeypatch):
    from studio.models import run_store

    # no periodic whole-list read in this test: only the store's tick can bring the run in
    monkeypatch.setattr(run_store, "LIST_MS", 10**9)
    monkeypatch.setattr(run_store, "IDLE_LIST_MS", 10**9)
    window.store._next_list_at = float("inf")
    b = window.browser
    window.tabs.setCurrentWidget(b)
    assert b.tree.topLevelItemCount() == 0

    # an engine started elsewhere (a queue runner) runs and completes a run the studio has never seen
    rid = finished_run(engine, "from the queue", 12, 1e9, time.time())
    t0 = time.monotonic()  # from the engine's last commit (its completed status)
    qtbot.waitUntil(lambda: b.item_for(rid) is not None and b.item_for(rid).text(3) == "completed", timeout=500)
    assert time.monotonic() - t0 < 0.5
    assert column(b, "Steps") == ["12"] and column(b, "FLOPs") == ["12 GFLOP"]  # not a stale, empty list

    # a run the studio already lists as running: its completion shows as fast
    live = engine.create_run(name="live", stage="pretrain", config={})
    engine.mark_running(live)  # this process plays the engine: alive
    qtbot.waitUntil(lambda: b.item_for(live) is not None and b.item_for(live).text(3) == "running", timeout=500)
    engine.log_metrics(live, 1, 64, 0.1, 5e8, 1e9, {"loss": 4.0})
    engine.update_run(live, summary={"step": 1, "flops": 5e8})
    t0 = time.monotonic()
    engine.set_status(live, "completed")
    qtbot.waitUntil(lambda: b.item_for(live).text(3) == "completed", timeout=500)
    assert time.monotonic() - t0 < 0.5
    assert dict(zip(column(b, "Name"), column(b, "FLOPs")))["live"] == "500 MFLOP"


@pytest.mark.quick
def test_columns_sort_by_value_and_flops_carry_their_unit(qtbot, window, engine):
    from studio.views.runs_browser import COLUMNS

    now = time.time()
    # steps and FLOPs whose text sorts the other way round ("300" < "40" < "5"; "1.2 TFLOP" < "900 MFLOP")
    ids = {"small": finished_run(engine, "small", 5, 1.8e8, now - 300, loss=4.0),
           "mid": finished_run(engine, "mid", 40, 654311424, now - 200, loss=2.5),
           "big": finished_run(engine, "big", 300, 4e9, now - 100, loss=3.1)}
    b = window.browser
    window.tabs.setCurrentWidget(b)
    b.refresh()
    assert column(b, "Name") == ["small", "mid", "big"]  # oldest first, as before
    assert column(b, "FLOPs") == ["900 MFLOP", "26.2 GFLOP", "1.2 TFLOP"]
    header = b.tree.header()

    def sort_by(name: str) -> None:
        col = COLUMNS.index(name)
        x = header.sectionViewportPosition(col) + header.sectionSize(col) // 2
        qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, header.height() // 2))

    sort_by("Steps")
    assert column(b, "Steps") == ["5", "40", "300"]
    sort_by("Steps")  # a second click: descending
    assert column(b, "Steps") == ["300", "40", "5"]
    sort_by("FLOPs")
    assert column(b, "Name") == ["small", "mid", "big"] and column(b, "FLOPs")[0] == "900 MFLOP"
    sort_by("Loss")
    assert column(b, "Name") == ["mid", "big", "small"]
    sort_by("Created")
    assert column(b, "Name") == ["small", "mid", "big"]
    sort_by("Created")
    assert column(b, "Name") == ["big", "mid", "small"]
    # a rebuild (the store's signal) keeps the order the user chose
    b.refresh()
    assert column(b, "Name") == ["big", "mid", "small"]
    # units in the details too, never a 14-digit count
    b.select(ids["mid"])
    assert "flops 26.2 GFLOP" in b.detail.text() and "26,172,456,960" not in b.detail.text()
    assert b.item_for(ids["mid"]).toolTip(COLUMNS.index("FLOPs")) == "26,172,456,960 training FLOPs"
    # the score column is as wide as its text
    assert b.tree.columnWidth(COLUMNS.index("Best score (baselines)")) >= header.fontMetrics().horizontalAdvance(
        "Best score (baselines)")


def _has_red(widget) -> bool:
    """Whether any pixel of the widget is the delete button's red text (#c9302c)."""
    img = widget.grab().toImage()
    for y in range(0, img.height(), 1):
        for x in range(0, img.width(), 1):
            c = img.pixelColor(x, y)
            if c.red() > 150 and c.green() < 110 and c.blue() < 110:
                return True
    return False


@pytest.mark.quick
def test_delete_is_off_without_a_run_and_undo_brings_everything_back(qtbot, window, engine, tmp_path, monkeypatch):
    rid = finished_run(engine, "doomed", 8, 1e9, time.time())
    engine.add_evaluation(rid, 8, "lm", "val", {"loss": 3.0})
    folder = tmp_path / "runs" / rid
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step-8.safetensors").write_bytes(b"weights")
    engine.add_checkpoint(rid, 8, 512, str(folder / "checkpoints" / "step-8.safetensors"), 7, True)
    engine.update_run(rid, run_dir=str(folder))
    keep = finished_run(engine, "kept", 4, 1e9, time.time())

    def rows() -> tuple:
        return (engine.get_run(rid), len(engine.metrics(rid)), engine.evaluations(rid), engine.checkpoints(rid),
                sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")))

    before = rows()
    b = window.browser
    window.tabs.setCurrentWidget(b)
    b.refresh()
    delete = b.notes.delete_button
    assert not delete.isEnabled() and not _has_red(delete)  # off, and drawn as off (not in red)
    b.select(rid)
    assert delete.isEnabled() and _has_red(delete)

    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.Yes)
    with qtbot.waitSignal(b.run_deleted):
        qtbot.mouseClick(delete, Qt.MouseButton.LeftButton)
    assert not asked  # no question: Undo is the way back
    assert b.item_for(rid) is None and b.item_for(keep) is not None
    assert rid not in [r["id"] for r in window.store.runs()]  # gone from every list (compare, parent pickers)
    assert b.trash_bar.isVisible() and rid in b.trash_bar.label.text()
    assert not delete.isEnabled()
    assert rows() == before  # nothing touched while it is in the trash

    qtbot.mouseClick(b.trash_bar.undo_button, Qt.MouseButton.LeftButton)
    assert b.item_for(rid) is not None and not b.trash_bar.isVisible()
    assert rows() == before
    window.store.refresh()  # a poll does not bring a restored run back twice, nor lose it
    assert [r["id"] for r in window.store.runs()].count(rid) == 1

    # deleted again, then the trash emptied: now the rows and the folder go, after a yes
    b.select(rid)
    b.notes.delete()
    b.confirm = lambda *_a: True
    qtbot.mouseClick(b.trash_bar.empty_button, Qt.MouseButton.LeftButton)
    assert engine.get_run(rid) is None and not engine.metrics(rid) and not folder.exists()
    assert engine.get_run(keep) is not None and b.item_for(keep) is not None and not b.trash_bar.isVisible()


def running_entry(engine: RunDB, max_steps: int) -> tuple[int, str]:
    """A queue entry started as a runner starts one (claimed, its engine recorded and let go), and its run
    created and claimed by that engine: this process plays both, so both are alive."""
    q = Queue(engine)
    (entry,) = q.add([{"config_text": "", "config_name": "demo", "sets": [], "runs_dir": str(engine.path.parent),
                       "cwd": str(engine.path.parent), "label": "level=0.5"}])
    assert q.claim(q.entry(entry), str(engine.path.parent / "entry.events.jsonl"))
    assert q.record_engine(entry, os.getpid()) and q.mark_running(entry)
    rid = engine.create_run(name="queued run", stage="pretrain", config={"train": {"max_steps": max_steps}})
    engine.mark_running(rid)
    q.set_run(entry, rid)
    return entry, rid


@pytest.mark.quick
def test_the_queue_shows_step_progress_and_eta_and_a_hint_when_empty(qtbot, window, engine):
    from studio.views.queue_view import COLUMNS

    qv = window.queue
    window.tabs.setCurrentWidget(qv)
    assert qv.empty_hint.isVisible() and not qv.tree.isVisible()
    assert "queue is empty" in qv.empty_hint.text() and "New sweep" in qv.empty_hint.text()

    entry, rid = running_entry(engine, 200)
    for s in range(1, 51):  # 50 of 200 steps in 20 s of training: 150 steps left at 0.4 s a step
        engine.log_metrics(rid, s, s * 64, s * 0.4, s * 1e9, s * 2e9, {"loss": 3.0})
    engine.flush_metrics()

    def row() -> dict:
        item = qv.tree.topLevelItem(0)
        return {c: item.text(i) for i, c in enumerate(COLUMNS)} if item is not None else {}

    qtbot.waitUntil(lambda: row().get("Step") == "50 / 200", timeout=3000)
    assert qv.tree.isVisible() and not qv.empty_hint.isVisible()
    assert row()["Status"] == "running" and row()["Run"] == rid
    assert row()["Progress"] == "25 %" and row()["ETA"] == "1 min 00 s"
    # the run moves on: its row follows (the store's progress signal), no queue change needed
    for s in range(51, 151):
        engine.log_metrics(rid, s, s * 64, s * 0.4, s * 1e9, s * 2e9, {"loss": 3.0})
    engine.flush_metrics()
    qtbot.waitUntil(lambda: row().get("Step") == "150 / 200", timeout=3000)
    assert row()["Progress"] == "75 %" and row()["ETA"] == "20 s"
    # it completes: the whole bar, no time left
    engine.update_run(rid, summary={"step": 200})
    engine.set_status(rid, "completed")
    Queue(engine).finish(entry, "completed")
    qtbot.waitUntil(lambda: row().get("Status") == "completed", timeout=3000)
    qtbot.waitUntil(lambda: row().get("Progress") == "100 %", timeout=3000)
    assert row()["ETA"] == ""
