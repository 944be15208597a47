"""Charts that tell the truth: x fitted to a finished run, the learning rate never smoothed, flat series
padded, placeholders before data, legends beside the data, one run order, readable study ticks, the
heatmap hidden for static masks, and colours and text sizes that follow the palette and the font.

Runs are rows written through ``RunDB`` (no training), read back through the run store as the views read them.
"""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QFontMetrics, QPalette

from engine.core.config import from_dict
from engine.store.rundb import RunDB

pytestmark = pytest.mark.quick

DARK = {QPalette.ColorRole.Window: "#2b2b2b", QPalette.ColorRole.WindowText: "#e0e0e0",
        QPalette.ColorRole.Base: "#1e1e1e", QPalette.ColorRole.AlternateBase: "#262626",
        QPalette.ColorRole.Text: "#e0e0e0", QPalette.ColorRole.Button: "#353535",
        QPalette.ColorRole.ButtonText: "#e0e0e0", QPalette.ColorRole.PlaceholderText: "#9a9a9a"}
EXCEPTION_TEXT = ("Traceback", "Error calling Python override", "TypeError", "AttributeError", "Exception")


def lr_schedule(step: int, steps: int) -> float:
    """Warm-up then cosine, as the engine's schedule draws it."""
    return 1e-3 * min(1.0, step / 10) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))


def add_run(db: RunDB, name: str, steps: int = 40, *, status: str = "completed", method: str = "static",
            level: float = 0.75, layers: dict | None = None, lr=None, val_every: int = 10,
            max_steps: int | None = None) -> str:
    """A pre-training run's rows as the engine writes them: loss, lr, tokens/s each step; validation loss,
    sparsity and per-layer sparsity (``layers``: name -> step -> level) at each evaluation."""
    cfg = from_dict({"name": name, "stage": "pretrain", "sparsity": {"level": level, "method": method},
                     "train": {"max_steps": max_steps or steps}}).to_dict()
    rid = db.create_run(name=name, stage="pretrain", config=cfg)
    rows = []
    for s in range(1, steps + 1):
        head = (rid, s, s * 512, s * 0.1, s * 1e9 * (1 - level), s * 1e9)
        rows += [(*head, "loss", 3.0 + 2.0 * np.exp(-s / 15) + 0.05 * np.sin(s)),
                 (*head, "lr", lr(s) if lr else lr_schedule(s, steps)), (*head, "tokens_per_s", 1000.0 + s % 3)]
        if s % val_every == 0:
            rows += [(*head, "val_loss", 3.5 - s / (10 * steps)), (*head, "sparsity", level)]
            rows += [(*head, f"sparsity/{n}", f(s)) for n, f in (layers or {}).items()]
    db.insert_metric_rows(rows)
    db.set_status(rid, status)
    return rid


@pytest.fixture
def store(db):
    from studio.models.run_store import RunStore

    return RunStore(db, start=False)


@pytest.fixture
def theme_restored(qapp, qtbot):
    """The application's palette and font put back after a test changes them (and the views restyled
    while their database is still open)."""
    palette, font = QPalette(qapp.palette()), QFont(qapp.font())
    yield qapp
    qapp.setPalette(palette)
    qapp.setFont(font)
    settle(qtbot)


def dark_palette() -> QPalette:
    p = QPalette()
    for role, color in DARK.items():
        p.setColor(role, QColor(color))
    return p


def settle(qtbot) -> None:
    """Let the restyling that follows a palette or font change run (it waits for the next event-loop turn)."""
    qtbot.wait(30)


def monitor_of(qtbot, store, run_id: str, live: bool | None = None):
    """A run's live monitor fed from the database, as a run tab feeds it when it opens a past run."""
    from studio.views.live_monitor import LiveMonitor

    m = LiveMonitor()
    qtbot.addWidget(m)
    run = store.run(run_id)
    m.data.max_steps = run["config"]["train"]["max_steps"]
    m.data.config = run["config"]
    m.data.live = live
    m.data.add_db_rows(store.metrics(run_id))
    m.resize(1000, 600)
    m.show()
    m.redraw(force=True)
    return m


def test_a_finished_runs_x_range_ends_at_its_last_point_and_a_live_one_at_max_steps(qtbot, db, store):
    from studio.views.compare_view import CompareView

    done = add_run(db, "done", steps=40)
    m = monitor_of(qtbot, store, done)
    lo, hi = m.loss_plot.viewRange()[0]
    assert lo <= 1 and 40 <= hi <= 40 * 1.05  # not 0–50 (the old 25 % jumps)
    m.set_x_axis("tokens")
    assert 40 * 512 <= m.loss_plot.viewRange()[0][1] <= 40 * 512 * 1.05

    long = add_run(db, "long", steps=240)
    assert 240 <= monitor_of(qtbot, store, long).loss_plot.viewRange()[0][1] <= 240 * 1.05  # not 0–480

    # still training: the step axis shows where the run is heading (max_steps), not a range that jumps
    running = add_run(db, "running", steps=40, status="running", max_steps=100)
    live = monitor_of(qtbot, store, running, live=True)
    assert 100 <= live.loss_plot.viewRange()[0][1] <= 105
    live.data.live = False  # it stopped at step 40 of 100: fitted to what it did
    live.redraw(force=True)
    assert 40 <= live.loss_plot.viewRange()[0][1] <= 42

    view = CompareView(store, [done, long])
    qtbot.addWidget(view)
    view.set_x_axis("step")
    assert 240 <= view.panels[0].plot.viewRange()[0][1] <= 240 * 1.05


def test_compare_draws_the_learning_rate_as_logged(qtbot, db, store):
    from studio.views.compare_view import CompareView

    ids = [add_run(db, f"run{i}", steps=300, level=0.5 * i) for i in range(2)]
    view = CompareView(store, ids)
    qtbot.addWidget(view)
    view.set_x_axis("step")
    view.set_smoothing(0.9)
    panel = next(p for p in view.panels if p.picker is not None)
    panel.picker.setCurrentIndex(panel.picker.findData("lr"))
    index = view.panels.index(panel)
    for rid in ids:
        raw, main = view.curves[(rid, index)]
        logged = np.array([r["value"] for r in store.metrics(rid, names=["lr"])])
        np.testing.assert_array_equal(main.yData, logged)  # the schedule itself, not a lagged copy
        assert not raw.isVisible()
        loss_raw, loss_main = view.curves[(rid, 0)]
        assert loss_raw.isVisible() and not np.allclose(loss_main.yData, loss_raw.yData)  # the loss keeps its EMA


def test_a_flat_series_gets_a_padded_range(qtbot, db, store):
    from studio.views.compare_view import CompareView
    from studio.widgets.chart_style import padded_range

    assert padded_range(40.0, 40.0) == pytest.approx((36.0, 44.0))
    assert padded_range(0.0, 0.0) == (-0.5, 0.5)
    rid = add_run(db, "constant-lr", steps=40, lr=lambda _s: 1e-3)
    m = monitor_of(qtbot, store, rid)
    lo, hi = m.lr_plot.viewRange()[1]
    assert lo < 1e-3 < hi and hi - lo == pytest.approx(2e-4)  # ±10 %, not 1e-3 ± 0.5
    view = CompareView(store, [rid])
    qtbot.addWidget(view)
    lo, hi = view.panels[2].plot.viewRange()[1]  # sparsity: 0.75 at every evaluation
    assert lo < 0.75 < hi and hi - lo == pytest.approx(0.15)


def test_placeholders_stand_in_for_charts_without_data(qtbot, db, store):
    from studio.views.compare_view import NO_RUNS, CompareView
    from studio.views.live_monitor import WAITING, LiveMonitor

    m = LiveMonitor()
    qtbot.addWidget(m)
    m.show()
    m.redraw(force=True)
    assert m.charts.text_shown() == WAITING  # not six empty 0–1 charts
    m.data.add_metrics(1, 512, 0.1, 1e9, 4e9, {"loss": 5.0})
    m.redraw()
    assert m.charts.text_shown() is None
    m.set_placeholder("the engine did not start")
    assert m.charts.text_shown() is None  # data is there: the charts stay

    view = CompareView(store)
    qtbot.addWidget(view)
    assert {p.holder.text_shown() for p in view.panels} == {NO_RUNS}
    rid = db.create_run(name="loss-only", stage="pretrain", config={})
    db.insert_metric_rows([(rid, s, s, s, s, s, "loss", 1.0 / s) for s in range(1, 30)])
    db.set_status(rid, "completed")
    view.reload_runs()
    view.set_runs([rid])
    assert view.panels[0].holder.text_shown() is None
    assert view.panels[1].holder.text_shown() == "no val_loss logged by this run"


def test_static_masks_hide_the_heatmap(qtbot, db, store):
    layers = {"blocks.0.attn.q": lambda s: 0.75, "blocks.0.mlp.fc": lambda s: 0.75}
    static = monitor_of(qtbot, store, add_run(db, "static", layers=layers))
    assert not static.heat_shown and static.heat_plot.scene() is None
    assert not any(t.startswith("Sparsity per layer") for t in static.plots())
    # without its config, a run whose layers never changed and no mask churn is taken as static too
    static.data.config = {}
    assert static.data.static_masks()

    gmp = {"blocks.0.attn.q": lambda s: s / 60, "blocks.0.mlp.fc": lambda s: s / 45}
    pruned = monitor_of(qtbot, store, add_run(db, "gmp", method="gmp", layers=gmp))
    assert pruned.heat_shown and pruned.heat_plot.scene() is pruned.glw.scene()
    assert "Sparsity per layer (layer × step)" in pruned.plots()


def test_legends_sit_outside_the_data_and_compare_keeps_one_run_order(qtbot, db, store):
    from studio.views.compare_view import ComparePanel

    m = monitor_of(qtbot, store, add_run(db, "one"))
    for plot in (m.loss_plot, m.flops_plot, m.sparsity_plot):
        legend, vb = plot.legend, plot.getViewBox()
        assert legend.items and not legend.sceneBoundingRect().intersects(vb.sceneBoundingRect())

    long_name = "a-very-long-run-name-" + "x" * 59  # 80 characters
    ids = [add_run(db, name, steps=20) for name in ("r0", "r1", long_name, "r3", "r4")]
    picked = [ids[3], ids[0], ids[4], ids[2], ids[1]]  # the order the user picked them in
    panel = ComparePanel(store, picked)
    qtbot.addWidget(panel)
    panel.resize(1280, 720)
    panel.show()
    qtbot.waitExposed(panel)
    view = panel.charts
    texts = view.legend.texts()
    assert len(texts) == 5 and all(f"[{rid[:6]}]" in t for t, rid in zip(texts, picked))
    assert long_name not in texts[3] and "…" in texts[3]  # elided, its id kept
    for button in view.legend.entries.values():  # every entry on screen, inside the legend
        assert button.isVisible() and view.legend.rect().contains(button.geometry())
    listed = [view.run_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(5)]
    diff = [panel.diff.table.horizontalHeaderItem(j + 1).text() for j in range(5)]
    summary = [panel.summary.proxy.index(i, 1).data() for i in range(5)]
    assert listed == picked and summary == picked
    assert [d[-7:-1] for d in diff] == [rid[:6] for rid in picked]
    # a click on a legend entry hides that run in every chart
    view.legend.entries[picked[0]].click()
    assert picked[0] in view.hidden and not view.curves[(picked[0], 0)][1].isVisible()


def test_study_tick_labels_fit_their_bars(qtbot, db, store):
    from engine.orchestrate.queue import Queue
    from studio.views.study_view import StudyView

    q = Queue(db)
    sweep = q.create_sweep("levels", {"grid": {"sparsity.level": [0.75, 0.5, 0.0]}})
    item = {"config_name": "demo", "config_text": "", "sets": [], "runs_dir": "runs", "cwd": ".", "sweep_id": sweep}
    specs = []
    for level in (0.75, 0.5, 0.0):
        specs += [{**item, "label": f"level={level}", "stage": "pretrain"},
                  {**item, "label": f"level={level} → ft", "stage": "finetune", "after": len(specs)},
                  {**item, "label": f"level={level} → prompt", "stage": "prompt", "after": len(specs)}]
    entries = q.add(specs)
    for i, level in enumerate((0.75, 0.5, 0.0)):
        runs = [add_run(db, f"pre{level}", steps=10, level=level)]
        for stage in ("finetune", "prompt"):
            cfg = from_dict({"name": stage, "stage": stage, "parent": runs[0], "task": {"name": "pubmedqa"}}).to_dict()
            runs.append(db.create_run(name=f"{stage}{level}", stage=stage, config=cfg, parent_id=runs[0]))
            db.add_evaluation(runs[-1], 5, "pubmedqa", "dev", {"accuracy": 0.6 - level / 10, "macro_f1": 0.4})
            db.set_status(runs[-1], "completed")
        for entry, run in zip(entries[3 * i:3 * i + 3], runs):
            q.set_run(entry, run)
            q.finish(entry, "completed")
    view = StudyView(store, sweep)
    qtbot.addWidget(view)
    view.resize(1280, 720)  # six bars in a chart about 500 pixels wide
    view.show()
    qtbot.waitExposed(view)
    view._score_ticks()
    plot = view.score_plot.getPlotItem()
    assert "pubmedqa" not in plot.titleLabel.text  # the metrics moved to the axis label: the title fits
    (x0, x1), _ = plot.viewRange()
    per_bar = plot.getViewBox().width() / (x1 - x0)
    fm = QFontMetrics(view.follower.theme.font(0.9))
    ticks = view.score_ticks
    assert len(ticks) == 6 and {t.split("\n")[1] for _x, t in ticks} == {"ft", "prompt"}  # whole at this width
    assert plot.getAxis("bottom").labelText == "level → stage"
    for _x, text in ticks:
        assert max(fm.horizontalAdvance(line) for line in text.split("\n")) < per_bar  # neighbours never touch
    legend = view.score_legend
    assert not legend.sceneBoundingRect().intersects(plot.getViewBox().sceneBoundingRect())


def test_dark_palette_reaches_charts_log_and_config(qtbot, db, store, theme_restored):
    from studio.views.compare_view import ComparePanel
    from studio.widgets.chart_style import contrast
    from studio.widgets.log_pane import LogPane

    ids = [add_run(db, "a", level=0.5), add_run(db, "b")]
    m = monitor_of(qtbot, store, ids[0])
    panel = ComparePanel(store, ids)
    panel.diff.only_diff.setChecked(True)
    log = LogPane()
    log.append("log", "step 1 loss 5.0")
    for w in (panel, log):
        qtbot.addWidget(w)
        w.show()
    theme_restored.setPalette(dark_palette())
    settle(qtbot)
    base, text = QColor(DARK[QPalette.ColorRole.Base]), QColor(DARK[QPalette.ColorRole.Text])
    assert m.glw.backgroundBrush().color() == base
    assert m.loss_plot.getAxis("left").textPen().color() == text
    assert m.loss_plot.titleLabel.opts["color"] == text.name()
    chart = panel.charts.panels[0]
    assert chart.widget.backgroundBrush().color() == base
    assert chart.plot.getAxis("bottom").textPen().color() == text
    for rid in ids:  # every curve stands out on the dark background
        assert contrast(base, panel.charts.curves[(rid, 0)][1].opts["pen"].color()) >= 3
    value = m.summary["loss"]  # the headline numbers in the palette's text colour
    assert contrast(value.palette().color(value.foregroundRole()), QColor(DARK[QPalette.ColorRole.Window])) >= 7
    assert text.name() in log.view.toHtml() and log.view.palette().color(QPalette.ColorRole.Base) == base
    assert panel.charts.run_ids() == ids and panel.diff.run_ids_ == ids  # restyled, not reordered
    tint = panel.diff.table.item(0, 1).background().color()
    assert contrast(tint, text) >= 4.5  # a differing row's tint keeps its text readable

    theme_restored.setPalette(QPalette(QColor("#efefef")))  # back to a light palette: the charts follow
    settle(qtbot)
    assert m.glw.backgroundBrush().color().lightness() > 200


def test_a_font_change_scales_chart_text(qtbot, db, store, theme_restored):
    from studio.views.compare_view import CompareView

    rid = add_run(db, "a")
    m = monitor_of(qtbot, store, rid)
    view = CompareView(store, [rid])
    qtbot.addWidget(view)
    view.show()
    before = m.loss_plot.getAxis("left").style["tickFont"].pointSizeF()
    title = float(m.loss_plot.titleLabel.opts["size"].rstrip("pt"))
    width = view.panels[0].plot.getAxis("left").maximumWidth()
    font = QFont(theme_restored.font())
    font.setPointSizeF(font.pointSizeF() * 1.5)
    theme_restored.setFont(font)
    settle(qtbot)
    assert m.loss_plot.getAxis("left").style["tickFont"].pointSizeF() == pytest.approx(1.5 * before, rel=0.05)
    assert float(m.loss_plot.titleLabel.opts["size"].rstrip("pt")) == pytest.approx(1.5 * title, rel=0.05)
    assert m.loss_plot.legend.items[0][1].opts["size"] == m.loss_plot.legend.opts["labelTextSize"]
    assert view.panels[0].plot.getAxis("left").maximumWidth() == pytest.approx(1.5 * width, abs=1)  # room for bigger ticks


def test_palette_and_font_changes_print_no_exception_text(qtbot, db, store, theme_restored, capfd):
    """Every change used to print "TypeError: 'str' object is not callable" six times: a compare chart's
    ``metric`` attribute hid ``QWidget.metric``, which Qt calls on font and palette changes."""
    from studio.views.compare_view import ComparePanel
    from studio.widgets.log_pane import LogPane

    ids = [add_run(db, "a"), add_run(db, "b", level=0.5)]
    widgets = [ComparePanel(store, ids), LogPane(), monitor_of(qtbot, store, ids[0])]
    for w in widgets[:2]:
        qtbot.addWidget(w)
        w.show()
    capfd.readouterr()
    theme_restored.setPalette(dark_palette())
    font = QFont(theme_restored.font())
    font.setPointSizeF(font.pointSizeF() * 1.5)
    theme_restored.setFont(font)
    settle(qtbot)
    err = capfd.readouterr().err
    assert not [t for t in EXCEPTION_TEXT if t in err], err
