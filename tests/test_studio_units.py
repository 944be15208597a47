"""Studio pieces that need no engine process: buffers, smoothing, run data, the form's validation."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest

from engine.core.config import load_config, parse_overrides
from engine.core.paths import resolve_preset
from engine.store.rundb import RunDB
from studio.commands.engine_process import LineReader, parse_json_output, toml_value, train_args
from studio.models.plot_buffers import EMA, GrowingArray, Series, minmax_thin
from studio.models.run_data import RunData


@pytest.mark.quick
def test_growing_array_doubles_and_keeps_rows():
    a = GrowingArray(2, capacity=4)
    for i in range(100):
        a.append((i, i * i))
    assert len(a) == 100 and a.capacity == 128
    assert a.column(1)[-1] == 99 * 99
    assert a.column(0).flags["C_CONTIGUOUS"]  # plotted without copies
    a.truncate_after(49)
    assert len(a) == 50 and a.last(0) == 49


@pytest.mark.quick
def test_ema_incremental_matches_reference():
    rng = np.random.default_rng(0)
    v = rng.random(5000)
    for w in (0.0, 0.3, 0.9, 0.999):
        e = EMA(w)
        e.extend(v[:1234])
        e.extend(v[1234:])
        ref, last = [], 0.0
        for i, x in enumerate(v, 1):
            last = last * w + (1 - w) * x
            ref.append(last / (1 - w**i) if w else x)
        np.testing.assert_allclose(e.values(), ref, rtol=1e-9)


@pytest.mark.quick
def test_minmax_thin_keeps_spikes():
    x = np.arange(200_000.0)
    y = np.sin(x / 1000)
    y[123_457] = 40.0
    y[7] = -40.0
    tx, ty = minmax_thin(x, y, 2000)
    assert len(tx) <= 2000 and ty.max() == 40.0 and ty.min() == -40.0
    assert np.all(np.diff(tx) > 0)


@pytest.mark.quick
def test_run_data_dedupes_steps_from_events_and_db():
    d = RunData()
    ev = {"type": "metrics", "run_id": "r", "step": 1, "tokens": 64, "wall_time": 0.1, "flops": 10.0, "flops_dense": 25.0,
          "metrics": {"loss": 5.0, "lr": 1e-3, "val_loss": 4.9}}
    assert d.add_event(ev)
    assert not d.add_event(ev)  # the same step again (from a DB poll) is ignored
    rows = [dict(step=s, tokens=64 * s, wall_time=0.1 * s, flops=10.0 * s, flops_dense=25.0 * s, name=n, value=v)
            for s in (1, 2, 3) for n, v in (("loss", 5.0 - s), ("lr", 1e-3))]
    assert d.add_db_rows(rows) == 2
    assert list(d.series["loss"].x("step")) == [1, 2, 3]
    assert list(d.val["loss"].y()) == [4.9]
    assert d.flops_totals() == (30.0, 75.0)
    d.truncate_after(2)
    assert d.last_step == 2 and len(d.series["loss"]) == 2


@pytest.mark.quick
def test_toml_values_round_trip_through_the_engine_parser():
    items = {"train.lr": 3e-4, "data.corpus": ["builtin:hpo", "/x y/z.jsonl"], "name": "a b", "model.bias": False}
    args = train_args("demo.toml", items)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert parse_overrides(sets) == items
    assert toml_value("x") == '"x"'


@pytest.mark.quick
def test_line_reader_and_json_output():
    r = LineReader()
    assert r.feed(b'{"a": 1}\n{"b"') == ['{"a": 1}']
    assert r.feed(b": 2}\n") == ['{"b": 2}']
    result, events = parse_json_output('{"params": {"total": 3}}')
    assert result == {"params": {"total": 3}} and events == []


# -- widgets --------------------------------------------------------------------------------------------

@pytest.fixture
def form(qtbot, tmp_path):
    from studio.models.run_store import RunStore
    from studio.views.run_form import RunForm

    db = RunDB(tmp_path / "runs.db")
    f = RunForm(RunStore(db, start=False), tmp_path / "runs")
    qtbot.addWidget(f)
    yield f
    db.close()


@pytest.mark.quick
def test_form_opens_with_demo_and_previews_the_command(form):
    assert form.preset_combo.currentText() == "demo"
    assert form.is_valid() and form.start_button.isEnabled()
    assert form.editors["model.d_model"].widget.toolTip().count("Width of the residual stream")
    assert form.command_preview().startswith("mediswift train ")
    assert str(resolve_preset("demo")) in form.command_preview()
    form.set_field("train.max_steps", 42)
    assert "--set train.max_steps=42" in form.command_preview()
    # the preview is the run the engine will build
    cfg = load_config(resolve_preset("demo"), form.overrides())
    assert cfg == form.config and cfg.train.max_steps == 42


@pytest.mark.quick
def test_bad_value_marks_its_field_and_disables_start(form, qtbot):
    form.set_field("model.n_head", 3)  # 128 is not divisible by 3
    ed = form.editors["model.n_head"]
    assert not form.start_button.isEnabled()
    assert "must be divisible by model.n_head" in ed.error_label.text() and ed.error_label.isVisibleTo(form)
    assert "d5" in ed.widget.styleSheet() or "border" in ed.widget.styleSheet()
    form.set_field("train.lr", "fast")  # a second error in another section is shown too
    assert "train.lr must be a number" in form.editors["train.lr"].error_label.text()
    form.set_field("model.n_head", 4)
    form.set_field("train.lr", "0")  # open lower bound: the engine's own wording
    assert form.editors["model.n_head"].error is None
    assert "train.lr must be in (0, 10]" in form.editors["train.lr"].error
    assert not form.start_button.isEnabled()
    form.set_field("train.lr", "1e-3")
    assert form.start_button.isEnabled() and form.config.train.lr == 1e-3


@pytest.mark.quick
def test_stage_needs_parent_and_engine_errors_land_on_fields(form):
    form.set_field("stage", "finetune")
    assert not form.groups["task"].isHidden() and form.groups["sparsity"].isHidden()
    assert "parent is required" in form.editors["parent"].error
    assert not form.start_button.isEnabled()
    form.set_field("stage", "pretrain")
    assert form.is_valid()
    form.set_field("data.corpus", ["/no/such/corpus.jsonl"])
    form.show_engine_error("corpus file not found: /no/such/corpus.jsonl", None, "/no/such/corpus.jsonl")
    assert "not found" in form.editors["data.corpus"].error and not form.start_button.isEnabled()
    form.set_field("data.corpus", ["builtin:hpo"])  # editing the field clears the engine's complaint
    assert form.is_valid()


@pytest.mark.quick
def test_toml_export_import_and_clone(form, tmp_path):
    form.set_field("sparsity.level", 0.9)
    out = form.export_toml(str(tmp_path / "x.toml"))
    assert load_config(out).sparsity.level == 0.9
    form.load_preset("demo")
    assert form.config.sparsity.level == 0.75
    assert form.load_file(out) and form.config.sparsity.level == 0.9 and form.overrides() == {}
    run_id = form.store.db.create_run(name="old", stage="pretrain", config=form.config.to_dict())
    form.load_preset("demo")
    assert form.clone_run(run_id)
    assert form.config.sparsity.level == 0.9 and form.config.name == "old-clone"
    assert form.base_path is not None and form.base_path.exists()


@pytest.mark.quick
def test_downsampled_curve_keeps_a_spike(qtbot):
    from studio.views.live_monitor import LiveMonitor

    m = LiveMonitor()
    qtbot.addWidget(m)
    m.resize(800, 600)
    m.show()
    n = 200_000
    steps = np.arange(1, n + 1, dtype=float)
    loss = np.full(n, 3.0)
    loss[150_001] = 30.0
    s = Series()
    s.extend(np.column_stack([steps, steps * 64, steps * 1e6, steps * 0.01, loss]))
    m.data.series["loss"] = s
    m.data.frames.extend(np.column_stack([steps, steps * 64, steps * 1e6, steps * 0.01, steps * 2.5e6]))
    m.redraw(force=True)
    qtbot.waitExposed(m)
    qtbot.wait(300)  # auto-range, then the curve re-samples for the new view
    x, y = m.loss_raw.getData()  # what is drawn: downsampled to the view's width
    assert len(x) < n / 10
    assert y.max() == 30.0
    assert m.curve_points("loss")[1].shape == (n,)


@pytest.mark.quick
def test_peak_decimator_incremental_equals_from_scratch_and_keeps_extremes():
    from studio.models.plot_buffers import PeakDecimator

    rng = np.random.default_rng(1)
    y = rng.normal(size=60_000)
    y[41_234] = 50.0  # a spike
    y[7_000] = np.nan  # a missing value must not break min/max
    grown = PeakDecimator(max_bins=256)
    n = 0
    while n < len(y):  # fed as a live run feeds it: the array grows between calls
        n = min(len(y), n + 997)
        idx = grown.indices(y[:n])
    scratch = PeakDecimator(max_bins=256).indices(y)
    assert np.array_equal(idx, scratch)
    assert len(idx) <= 2 * 256 + 3 and np.all(np.diff(idx) >= 0)
    assert idx[-1] == len(y) - 1 and np.nanmax(y[idx]) == 50.0 and np.nanmin(y[idx]) == np.nanmin(y)
    assert PeakDecimator(max_bins=256).indices(y[:300]) is None  # short: drawn whole


@pytest.mark.quick
def test_zoom_draws_the_visible_part_at_full_detail(qtbot):
    from studio.views.live_monitor import LiveMonitor

    m = LiveMonitor()
    qtbot.addWidget(m)
    m.resize(800, 600)
    m.show()
    n = 100_000
    steps = np.arange(1, n + 1, dtype=float)
    s = Series()
    s.extend(np.column_stack([steps, steps, steps, steps, np.sin(steps / 7.0)]))
    m.data.series["loss"] = s
    m.data.frames.extend(np.column_stack([steps, steps, steps, steps, steps]))
    m.redraw(force=True)
    assert len(m.loss_raw.getData()[0]) < 5_000  # the overview
    m.loss_plot.setXRange(50_000, 50_500, padding=0)
    m._zoomed()
    x, _y = m.loss_raw.getData()
    inside = x[(x >= 50_000) & (x <= 50_500)]
    assert np.array_equal(inside, np.arange(50_000, 50_501))  # every point of the visible part
    m.loss_plot.enableAutoRange()
    m._zoomed()
    assert len(m.loss_raw.getData()[0]) < 5_000


@pytest.mark.quick
def test_x_range_follows_the_run_in_jumps_and_respects_a_user_zoom(qtbot):
    from studio.views.live_monitor import LiveMonitor

    m = LiveMonitor()
    qtbot.addWidget(m)
    m.resize(800, 600)
    m.show()

    def add(a: int, b: int) -> None:
        for s in range(a, b + 1):
            m.data.add_metrics(s, s * 64, s * 0.01, s * 1e6, s * 2.5e6, {"loss": 3.0, "lr": 1e-3})
        m.redraw()

    add(1, 100)
    lo, hi = m.loss_plot.getViewBox().viewRange()[0]
    assert lo <= 1 and hi >= 100  # every point is in view
    add(101, 110)
    assert m.loss_plot.getViewBox().viewRange()[0] == [lo, hi]  # small growth: no new range, no tick re-layout
    add(111, 400)
    lo2, hi2 = m.loss_plot.getViewBox().viewRange()[0]
    assert hi2 >= 400 and hi2 <= 3 * 400
    assert m.lr_plot.getViewBox().viewRange()[0] == [lo2, hi2]  # the charts share the x axis
    m.loss_plot.getViewBox().sigRangeChangedManually.emit([True, True])  # the user zoomed
    m.loss_plot.setXRange(50, 60, padding=0)
    add(401, 900)
    assert m.loss_plot.getViewBox().viewRange()[0] == pytest.approx([50, 60])


@pytest.mark.quick
def test_ema_live_and_whole_array_agree_with_nans_and_a_resume():
    """The live monitor's EMA (``follow`` as points arrive) and the compare view's (``ema`` of the whole
    array) give the same numbers, through NaNs and a resume that truncates the series."""
    from studio.models.plot_buffers import ema

    rng = np.random.default_rng(1)
    y = rng.normal(size=3000)
    y[[0, 7, 8, 1100]] = np.nan
    y[100] = np.inf
    s, live = Series(), EMA(0.9)

    def arrive(steps, values):
        s.extend(np.column_stack([steps, steps, steps, steps, values]))
        return live.follow(s.y(), s.cuts)

    for a, b in ((0, 1), (1, 700), (700, 2000)):  # events come in batches of any size
        arrive(np.arange(a, b), y[a:b])
    s.truncate_after(1199)  # a resume from step 1199 replays what follows, and the series regrows
    y[1200:] = rng.normal(size=1800)  # past its old length before the monitor draws again
    y[[1500, 2999]] = np.nan
    got = arrive(np.arange(1200, 3000), y[1200:])
    np.testing.assert_allclose(got, ema(y, 0.9), rtol=1e-12)
    ok = np.isfinite(y)
    assert np.isnan(got[7]) and got[100] == np.inf  # a non-finite point shows as itself ...
    np.testing.assert_allclose(got[ok], ema(y[ok], 0.9), rtol=1e-12)  # ... and is skipped by the average
