"""The main window on a laptop screen: minimum sizes with a long run name at the default and a 1.5x font,
the controls that must stay on screen, and the keyboard shortcuts.

The finished run is rows written through ``RunDB`` as the engine writes them (no training), so each test
takes a second or two.
"""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtCore import QRect, Qt, QTimer
from PySide6.QtWidgets import QApplication, QLineEdit, QWidget

from engine.core.config import load_config
from engine.core.paths import resolve_preset
from engine.store.rundb import RunDB

# 80 characters, capitals: as wide as a run name gets
LONG_NAME = "PUBMED-SMALL-SPARSE75-RIGL-ERK-LR3E-3-WARMUP300-SEED1337-BATCH32-CTX256-FINAL-RUN"[:80]
STEPS = 40


def finished_run(db: RunDB, name: str = LONG_NAME, steps: int = STEPS) -> str:
    """A completed pre-training run of ``steps`` steps, as the engine leaves it in the database."""
    cfg = load_config(resolve_preset("demo"), {"train.max_steps": steps}).to_dict()
    rid = db.create_run(name=name, stage="pretrain", config=cfg)
    db.mark_running(rid)
    db.merge_meta(rid, precision="bf16", precision_reason="the CPU computes bf16 natively")
    for s in range(1, steps + 1):
        db.log_metrics(rid, s, s * 512, s * 0.1, s * 1e9, s * 4e9,
                       {"loss": 6.0 - 0.05 * s, "lr": 1e-3, "tokens_per_s": 5120.0, "sparsity": 0.75,
                        "grad_norm": 1.0})
    db.add_evaluation(rid, steps, "lm", "val", {"loss": 4.2, "perplexity": 66.7})
    db.set_status(rid, "completed")
    return rid


def make_window(qtbot, db: RunDB, tmp_path):
    from studio.views.main_window import KEEP, MainWindow

    win = MainWindow(db.path, tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)  # no estimate process: these tests never train
    win.close_policy = KEEP
    qtbot.addWidget(win)
    return win


@pytest.fixture
def window(qtbot, db, tmp_path):
    win = make_window(qtbot, db, tmp_path)
    yield win
    win.close()


@pytest.fixture
def font_scale():
    """Sets the application font to ``scale`` times its size for the test; restored afterwards."""
    app = QApplication.instance()
    before = app.font()

    def scale(factor: float) -> None:
        f = app.font()
        f.setPointSizeF(before.pointSizeF() * factor)
        app.setFont(f)

    yield scale
    app.setFont(before)


def worst_minimum(win) -> tuple[int, int]:
    """The window's minimum size hint with each tab made current in turn: the largest width and height."""
    app = QApplication.instance()
    w = h = 0
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
        app.processEvents()
        hint = win.minimumSizeHint()
        w, h = max(w, hint.width()), max(h, hint.height())
    return w, h


def open_long_run(win, db: RunDB):
    rid = finished_run(db)
    view = win.open_run(rid)
    assert view is not None and view.status == "completed"
    view._update_progress()  # the finished run's detail text (steps, speed, loss) is in the header now
    assert LONG_NAME in view.header.name_label.full_text()
    return view


@pytest.mark.quick
def test_long_run_name_fits_a_1280x720_screen(qtbot, window, db):
    win = window
    view = open_long_run(win, db)
    win.open_compare([view.run_id])
    w, h = worst_minimum(win)
    assert (w, h) <= (1280, 720) and w <= 1280 and h <= 720, (w, h)
    # at that size the run's name is cut, whole in its tooltip, and the tab title too
    win.resize(1280, 720)
    win.show()
    qtbot.waitExposed(win)
    win.tabs.setCurrentWidget(view)
    QApplication.instance().processEvents()
    assert view.header.name_label.is_elided() and LONG_NAME in view.header.name_label.toolTip()
    i = win.tabs.indexOf(view)
    assert len(win.tabs.tabText(i)) < len(LONG_NAME) and LONG_NAME in win.tabs.tabToolTip(i)
    # what must stay reachable is inside the window: Stop in the run's header, Start under the form
    frame = QRect(0, 0, win.width(), win.height())
    assert frame.contains(visible_rect(view.buttons["stop"], win)), visible_rect(view.buttons["stop"], win)
    win.tabs.setCurrentWidget(win.form)
    QApplication.instance().processEvents()
    assert frame.contains(visible_rect(win.form.start_button, win))


def visible_rect(widget: QWidget, win) -> QRect:
    assert widget.isVisibleTo(win)
    return QRect(widget.mapTo(win, widget.rect().topLeft()), widget.size())


@pytest.mark.quick
def test_one_and_a_half_font_fits_1600x900(qtbot, db, tmp_path, font_scale):
    font_scale(1.5)
    win = make_window(qtbot, db, tmp_path)
    try:
        view = open_long_run(win, db)
        win.open_compare([view.run_id])
        w, h = worst_minimum(win)
        assert w <= 1600 and h <= 900, (w, h)
    finally:
        win.close()


# -- shortcuts -------------------------------------------------------------------------------------------

def press(qtbot, win, key, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    """A key as the user types it, to whatever has the focus in the window."""
    qtbot.waitUntil(lambda: QApplication.activeWindow() is win, timeout=2000)  # shortcuts need an active window
    target = QApplication.focusWidget() or win
    qtbot.keyClick(target, key, modifier)


@pytest.fixture
def shown(qtbot, window):
    window.resize(1280, 720)
    window.show()
    qtbot.waitExposed(window)
    window.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is window, timeout=2000)
    return window


@pytest.mark.quick
def test_ctrl_enter_starts_the_form_s_run(qtbot, shown, monkeypatch):
    win = shown
    started = []
    monkeypatch.setattr(win, "start_run", lambda: started.append(win.form.config.name))
    win.tabs.setCurrentWidget(win.browser)
    press(qtbot, win, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert started == [] and win.tabs.currentWidget() is win.form  # elsewhere it shows the form first
    win.form.editors["train.max_steps"].widget.setFocus()  # from inside a field, as a user would
    press(qtbot, win, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    press(qtbot, win, Qt.Key.Key_Enter, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.KeypadModifier)
    assert started == ["demo", "demo"]


@pytest.mark.quick
def test_ctrl_w_closes_the_current_run_tab_only(qtbot, shown, db):
    win = shown
    view = win.open_run(finished_run(db, "short"))
    assert win.tabs.currentWidget() is view
    press(qtbot, win, Qt.Key.Key_W, Qt.KeyboardModifier.ControlModifier)
    assert win.tabs.indexOf(view) < 0 and view not in win.views
    fixed = win.tabs.count()
    win.tabs.setCurrentWidget(win.form)
    press(qtbot, win, Qt.Key.Key_W, Qt.KeyboardModifier.ControlModifier)
    assert win.tabs.count() == fixed and win.tabs.currentWidget() is win.form  # New run, Runs, Queue stay


@pytest.mark.quick
def test_ctrl_f_focuses_the_runs_search_and_f5_refreshes_the_list(qtbot, shown, db):
    win = shown
    win.tabs.setCurrentWidget(win.form)
    win.browser.findChild(QLineEdit, "search").setText("old words")
    press(qtbot, win, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    search = win.browser.findChild(QLineEdit, "search")
    assert win.tabs.currentWidget() is win.browser
    qtbot.waitUntil(search.hasFocus, timeout=2000)
    assert search.selectedText() == "old words"  # typing replaces the last search
    search.clear()
    rid = finished_run(db, "written-elsewhere")  # another process's run: the list has not polled yet
    assert win.browser.item_for(rid) is None
    press(qtbot, win, Qt.Key.Key_F5)
    assert win.browser.item_for(rid) is not None


@pytest.mark.quick
def test_escape_cancels_dialogs(qtbot, window, db):
    from studio.views.main_window import CANCEL
    from studio.views.runs_browser import pick_run

    finished_run(db, "some run")
    answers = []

    def escape() -> None:
        dialog = QApplication.activeModalWidget()
        answers.append(type(dialog).__name__)
        qtbot.keyClick(dialog, Qt.Key.Key_Escape)

    QTimer.singleShot(200, escape)
    assert window.ask_close([]) == CANCEL  # "Runs still training": Esc keeps the window open
    QTimer.singleShot(200, escape)
    assert pick_run(window, window.store, "Clone the configuration of…") is None
    assert len(answers) == 2


@pytest.mark.quick
def test_a_run_that_failed_before_its_first_step_shows_its_error_not_empty_charts(qtbot, window, db, tmp_path):
    win = window
    run_dir = tmp_path / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "engine.log").write_text("run started\nreading /data/x.jsonl\n")
    cfg = load_config(resolve_preset("demo")).to_dict()
    rid = db.create_run(name="bad corpus", stage="pretrain", config=cfg, run_dir=str(run_dir))
    db.mark_running(rid)
    db.set_status(rid, "failed", error="record 12 of /data/x.jsonl has no 'text' field")
    view = win.open_run(rid)
    assert not view.monitor.isVisibleTo(view) and not view.progress.isVisibleTo(view)  # no empty charts
    assert view.banner.isVisibleTo(view) and "has no 'text' field" in view.banner.text()
    assert "reading /data/x.jsonl" in view.banner.text()  # the log's tail, where the cause usually is
    assert win.tabs.tabText(win.tabs.indexOf(view)).startswith("✖")
    done = win.open_run(finished_run(db, "fine"))  # a run with steps keeps its charts
    assert done.monitor.isVisibleTo(done)
