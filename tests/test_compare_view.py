"""Compare view, config diff, summary table, chart/metric export and run notes, on three real tiny runs."""
from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
from helpers import REPO, engine_env, tiny
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage

from engine.store.rundb import RunDB
from engine.publish.run_export import METRIC_COLUMNS

LEVELS = {"dense": 0.0, "half": 0.5, "quarter": 0.75}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs that differ only in name and sparsity."""
    tmp = tmp_path_factory.mktemp("compare")
    db_path = tmp / "runs.db"
    RunDB(db_path).close()  # migrate once, before three processes open it
    def start(name: str, level: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "engine", "train", "demo", "--db", str(db_path),
                                 *tiny(f"name={name}", f"sparsity.level={level}", "sparsity.kernel=dense")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=engine_env(tmp))

    # the first run fills the shared token cache alone: concurrent first writers of one cache file race
    items = list(LEVELS.items())
    for batch in (items[:1], items[1:]):
        procs = [start(name, level) for name, level in batch]
        for p in procs:
            _out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
    db = RunDB(db_path)
    by_name = {r["name"]: r["id"] for r in db.list_runs()}
    db.ids = [by_name[n] for n in LEVELS]
    db.tmp = tmp
    yield db
    db.close()


def _column(db: RunDB, rid: str, name: str, col: str) -> np.ndarray:
    return np.array([r[0] for r in db.db.execute(
        f"SELECT {col} FROM metrics WHERE run_id = ? AND name = ? ORDER BY step", [rid, name]).fetchall()], dtype=float)


def test_equal_flops_axis_uses_the_database_counters(qtbot, runs):
    from studio.models.run_store import RunStore
    from studio.views.compare_view import FIXED_PANELS, CompareView

    view = CompareView(RunStore(runs, start=False), runs.ids)
    qtbot.addWidget(view)
    view.resize(1200, 700)
    assert view.run_ids() == runs.ids
    qtbot.mouseClick(view.findChild(type(view.x_buttons.buttons()[0]), "x_step"), Qt.MouseButton.LeftButton)
    assert view.x_axis == "step"
    with qtbot.waitSignal(view.x_axis_changed) as sig:  # one click: equal FLOPs spent
        qtbot.mouseClick(view.findChild(type(view.x_buttons.buttons()[0]), "x_flops"), Qt.MouseButton.LeftButton)
    assert sig.args == ["flops"]
    panel_of = {m: i for i, (m, *_r) in enumerate(FIXED_PANELS)}
    finals = {}
    for rid in runs.ids:
        for metric in ("loss", "val_loss", "sparsity"):
            raw, main = view.curves[(rid, panel_of[metric])]
            np.testing.assert_array_equal(main.xData, _column(runs, rid, metric, "flops"))
        raw, main = view.curves[(rid, panel_of["loss"])]
        np.testing.assert_array_equal(raw.yData, _column(runs, rid, "loss", "value"))
        finals[rid] = main.xData[-1]
    dense, half, quarter = (finals[r] for r in runs.ids)
    assert dense > half > quarter  # same steps, fewer FLOPs spent the sparser the run

    view.set_x_axis("flops_dense")  # the dense-equivalent counter is the same for all three
    xs = [view.curves[(rid, 0)][1].xData for rid in runs.ids]
    for rid, x in zip(runs.ids, xs):
        np.testing.assert_array_equal(x, _column(runs, rid, "loss", "flops_dense"))
    np.testing.assert_allclose(xs[0], xs[2])

    view.set_smoothing(0.0)
    np.testing.assert_array_equal(view.curves[(runs.ids[2], 0)][1].yData, _column(runs, runs.ids[2], "loss", "value"))
    assert not view.curves[(runs.ids[2], 0)][0].isVisible()  # no raw shadow without smoothing

    # unchecking a run in the list drops it; its colour comes back when it is checked again
    color = view.colors[runs.ids[1]]
    item = next(view.run_list.item(i) for i in range(view.run_list.count())
                if view.run_list.item(i).data(Qt.ItemDataRole.UserRole) == runs.ids[1])
    with qtbot.waitSignal(view.runs_changed):
        item.setCheckState(Qt.CheckState.Unchecked)
    assert view.run_ids() == [runs.ids[0], runs.ids[2]] and (runs.ids[1], 0) not in view.curves
    view.set_runs(runs.ids)
    assert view.colors[runs.ids[1]] == color
    view.set_run_visible(runs.ids[0], False)
    assert not view.curves[(runs.ids[0], 0)][1].isVisible()


@pytest.mark.quick
def test_ema_matches_the_recurrence():
    from studio.models.plot_buffers import ema

    rng = np.random.default_rng(0)
    y = rng.normal(size=10_000)
    y[5] = np.nan
    w = 0.95
    last, n, out = 0.0, 0, []
    for v in y:
        if not np.isnan(v):  # a NaN is skipped: NaN out, the average carries over it
            last, n = w * last + (1 - w) * v, n + 1
        out.append(last / (1 - w ** n) if not np.isnan(v) else v)
    np.testing.assert_allclose(ema(y, w), out, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(ema(y[:3], 0.0), y[:3])


def test_config_diff_shows_only_differing_keys(qtbot, runs):
    from studio.models.run_store import RunStore
    from studio.widgets.config_diff import ConfigDiffView

    view = ConfigDiffView(RunStore(runs, start=False), runs.ids)
    qtbot.addWidget(view)
    assert view.only_diff.isChecked()
    assert view.keys() == ["name", "sparsity.level"]
    levels = [view.table.item(1, j).data(Qt.ItemDataRole.UserRole) for j in (1, 2, 3)]
    assert levels == [0.0, 0.5, 0.75]
    view.only_diff.setChecked(False)
    assert len(view.keys()) > 30 and "train.lr" in view.keys()


def test_studio_exports_metrics_csv_and_charts_that_match(qtbot, runs, tmp_path):
    from studio.models.run_store import RunStore
    from studio.views.compare_view import CompareView
    from studio.widgets.chart_export import ChartExportDialog, export_plot

    view = CompareView(RunStore(runs, start=False), runs.ids)
    qtbot.addWidget(view)
    view.show()
    n = view.export_metrics(tmp_path / "m.csv", "csv")
    with open(tmp_path / "m.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == METRIC_COLUMNS
    expected = []
    for rid in runs.ids:
        expected += runs.db.execute(f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics WHERE run_id = ? ORDER BY step, rowid",
                                    [rid]).fetchall()
    assert n == len(rows) - 1 == len(expected)
    assert [(r[0], int(r[1]), float(r[4]), r[6], float(r[7])) for r in rows[1:]] == \
           [(e[0], e[1], e[4], e[6], e[7]) for e in expected]

    plot = view.plots()["Training loss"]
    png = export_plot(plot, tmp_path / "loss.png", 640, 360)
    img = QImage(str(png))
    assert (img.width(), img.height()) == (640, 360)
    # the curves made it into the picture: some pixels carry the first run's colour family
    assert len({img.pixelColor(x, y).name() for x in range(0, 640, 4) for y in range(0, 360, 4)}) > 5
    svg = export_plot(plot, tmp_path / "loss.svg", 800, 450).read_text()
    assert re.search(r'<svg[^>]*width="800(px)?"', svg) and re.search(r'<svg[^>]*height="450(px)?"', svg)
    assert "<path" in svg or "<polyline" in svg

    dlg = ChartExportDialog(view.plots(), "Sparsity")
    qtbot.addWidget(dlg)
    dlg.format.setCurrentText("PNG")
    dlg.width_box.setValue(300)
    dlg.height_box.setValue(200)
    dlg.path.setText(str(tmp_path / "sparsity.png"))
    dlg._save()
    assert dlg.written is not None and QImage(str(dlg.written)).size().toTuple() == (300, 200)


def test_summary_table_sorts_by_numbers_and_copies_csv(qtbot, runs):
    from studio.models.run_store import RunStore
    from studio.widgets.summary_table import SummaryTable

    table = SummaryTable(RunStore(runs, start=False), runs.ids)
    qtbot.addWidget(table)
    col = [c[1] for c in table.columns].index("flops")
    table.view.sortByColumn(col, Qt.SortOrder.AscendingOrder)
    rows = list(csv.DictReader(io.StringIO(table.copy_csv())))
    assert [r["name"] for r in rows] == ["quarter", "half", "dense"]  # fewest FLOPs spent first
    for r in rows:
        s = runs.get_run(r["id"])["summary"]
        assert float(r["flops"]) == s["flops"] and float(r["flops_dense"]) == s["flops_dense"]
        assert float(r["best_val_loss"]) == pytest.approx(min(_column(runs, r["id"], "val_loss", "value")))
        assert int(r["params_total"]) == runs.get_run(r["id"])["meta"]["params"]["total"]
    assert float(rows[0]["sparsity"]) == pytest.approx(0.75, abs=0.01)


def test_tags_notes_search_archive_and_delete(qtbot, runs, monkeypatch):
    from studio.commands import run_commands
    from studio.commands.run_commands import Commands
    from studio.models.run_filter import search_runs
    from studio.models.run_store import RunStore
    from studio.views.run_notes import RunNotesEditor

    rid = runs.ids[1]
    store = RunStore(runs, start=False)
    editor = RunNotesEditor(store, Commands(store), rid)
    qtbot.addWidget(editor)
    editor.tags.setText("sparse,  baseline, sparse")
    editor.notes.setPlainText("half the weights\nlooks fine")
    with qtbot.waitSignal(editor.saved):
        qtbot.mouseClick(editor.save_button, Qt.MouseButton.LeftButton)
    row = runs.get_run(rid)
    assert row["tags"] == ["sparse", "baseline"] and row["notes"].startswith("half the weights")
    assert [r["id"] for r in search_runs(store.runs(), "BASELINE")] == [rid]
    assert [r["id"] for r in search_runs(store.runs(), "weights fine")] == [rid]

    editor.confirm = lambda *_a: True
    editor.toggle_archive()
    assert runs.get_run(rid)["archived"] == 1 and rid not in [r["id"] for r in runs.list_runs(include_archived=False)]
    editor.toggle_archive()
    assert runs.get_run(rid)["archived"] == 0

    # a throwaway run with a folder and rows: delete removes both, after a yes
    doomed = runs.create_run(name="doomed", stage="pretrain", config=runs.get_run(rid)["config"])
    folder = runs.tmp / "runs" / doomed
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "x.pt").write_bytes(b"x")
    runs.update_run(doomed, run_dir=str(folder), status="completed")
    runs.insert_metric_rows([(doomed, 1, 1, 0.0, 1.0, 1.0, "loss", 1.0)])
    editor.set_run(doomed)
    editor.confirm = lambda *_a: False
    assert not editor.delete() and folder.is_dir()
    editor.confirm = lambda *_a: True
    with qtbot.waitSignal(editor.deleted):
        assert editor.delete()
    assert runs.get_run(doomed) is None and not folder.exists()
    assert runs.db.execute("SELECT COUNT(*) FROM metrics WHERE run_id = ?", [doomed]).fetchone()[0] == 0

    live = runs.create_run(name="live", stage="pretrain", config=runs.get_run(rid)["config"])
    runs.update_run(live, status="running", pid=os.getpid())  # this very process: alive
    with pytest.raises(run_commands.RunBusyError):
        run_commands.delete_run(runs, live)
    runs.delete_run(live)


@pytest.mark.quick
def test_long_runs_are_thinned_fitted_and_refined_on_zoom(qtbot, tmp_path):
    """Two 6,000-step runs: the overview reads a thinned series spanning the whole run, the ranges fit
    the data (and re-fit when a run is hidden), and zooming re-reads the visible steps from the database."""
    from studio.models.run_store import RunStore
    from studio.views.compare_view import CompareView

    db = RunDB(tmp_path / "runs.db")
    steps = np.arange(1, 6001)
    ids = []
    for i, scale in enumerate((1.0, 3.0)):
        rid = db.create_run(name=f"long{i}", stage="pretrain", config={})
        loss = scale * (2.0 + np.exp(-steps / 1500.0))
        rows = [(rid, int(s), int(s) * 64, s * 0.1, s * 1e9, s * 2e9, "loss", float(v)) for s, v in zip(steps, loss)]
        rows += [(rid, int(s), int(s) * 64, s * 0.1, s * 1e9, s * 2e9, "val_loss", float(scale)) for s in steps[::25]]
        db.insert_metric_rows(rows)
        ids.append(rid)
    view = CompareView(RunStore(db, start=False))
    qtbot.addWidget(view)
    view.resize(1200, 700)
    view.show()
    qtbot.waitExposed(view)
    view.set_x_axis("step")
    view.set_runs(ids)
    per_curve = view.points_per_curve()
    raw, main = view.curves[(ids[1], 0)]
    assert raw.xData.size <= per_curve + 1 < steps.size
    assert (raw.xData[0], raw.xData[-1]) == (1, 6000)  # thinned, but from the first step to the last
    (x0, x1), (y0, y1) = view.panels[0].plot.viewRange()
    assert x0 <= 1 and x1 >= 6000
    assert y0 <= 2.0 and y1 >= 3.0 * 3.0  # both runs' losses are inside the fitted range
    assert type(view.curves[(ids[0], 1)][1]).__name__ == "PlotCurveItem"  # 240 evaluations: a line, no markers

    view.set_run_visible(ids[1], False)  # the larger run hidden: the y range shrinks to the other one
    (_x0, _x1), (_y0, y1) = view.panels[0].plot.viewRange()
    assert 3.0 <= y1 < 4.0

    view.panels[0].plot.setXRange(3000, 3300, padding=0)
    view.refine()
    x, y = view.curves[(ids[0], 0)][0].getData()
    inside = (x >= 3000) & (x <= 3300)
    np.testing.assert_array_equal(x[inside], np.arange(3000, 3301))  # every step of the zoomed range, from the DB
    np.testing.assert_allclose(y[inside], 2.0 + np.exp(-np.arange(3000, 3301) / 1500.0))
    view.panels[0].plot.setXRange(1, 6000, padding=0)
    view.refine()  # zoomed out again: back to the overview
    assert view.curves[(ids[0], 0)][0].xData.size <= per_curve + 1
    db.close()


@pytest.mark.quick
def test_runs_still_training_are_followed_unless_the_user_zoomed(qtbot, tmp_path):
    from studio.models.run_store import RunStore
    from studio.views.compare_view import CompareView

    db = RunDB(tmp_path / "runs.db")
    rid = db.create_run(name="live", stage="pretrain", config={})
    db.update_run(rid, status="running")

    def log(first: int, last: int) -> None:
        db.insert_metric_rows([(rid, s, s * 64, s * 0.1, s * 1e9, s * 2e9, "loss", 5.0 - s / 1000) for s in range(first, last + 1)])

    log(1, 100)
    view = CompareView(RunStore(db, start=False))
    qtbot.addWidget(view)
    view.resize(1000, 600)
    view.set_x_axis("step")
    view.set_runs([rid])
    assert view.curves[(rid, 0)][1].xData[-1] == 100
    log(101, 200)
    view.poll_live()  # what the live timer runs every few seconds
    assert view.curves[(rid, 0)][1].xData[-1] == 200
    assert view.panels[0].plot.viewRange()[0][1] >= 200  # the axis follows the run

    view.panels[0].plot.setXRange(10, 50, padding=0)  # the user zooms: the range is theirs now
    log(201, 300)
    view.poll_live()
    assert view.curves[(rid, 0)][1].xData[-1] == 300
    assert view.panels[0].plot.viewRange()[0] == pytest.approx([10, 50])
    view.set_smoothing(0.3)  # restyling keeps the zoom too
    view.set_run_visible(rid, True)
    assert view.panels[0].plot.viewRange()[0] == pytest.approx([10, 50])

    db.update_run(rid, status="completed")
    log(301, 310)  # the last rows, written as the run ends
    view.poll_live()  # one more read for a run that has just ended, then it stays cached
    assert view.curves[(rid, 0)][1].xData[-1] == 310
    log(311, 320)
    view.poll_live()
    assert view.curves[(rid, 0)][1].xData[-1] == 310
    db.close()
