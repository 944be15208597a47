"""Studio features around the pipeline and past runs: compare from the browser's selection, parent
pickers per stage, task-score charts, lineage with best scores, archive/delete, exports.

The runs are rows written through ``RunDB`` as the engine writes them (metrics, evaluations with
baselines, artifacts), so each test states exactly what the database holds.
"""
from __future__ import annotations

import csv
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QMessageBox

from engine.core.config import from_dict
from engine.store.rundb import RunDB

PUBMEDQA_MAJORITY = {"accuracy": 0.552, "macro_f1": 0.237, "predicts": "yes"}


def make_run(db: RunDB, name: str, stage: str, parent: str | None = None, status: str = "completed",
             level: float = 0.75, task: str = "lm", steps: int = 20, loss0: float = 6.0) -> str:
    d = {"name": name, "stage": stage, "parent": parent or "", "sparsity": {"level": level}, "task": {"name": task}}
    rid = db.create_run(name=name, stage=stage, config=from_dict(d).to_dict(), parent_id=parent)
    for step in range(1, steps + 1):  # what the engine logs each step, with its FLOPs counters
        flops = step * 1e9 * (1 - (level if stage == "pretrain" else 0.0))
        db.log_metrics(rid, step, step * 512, step * 0.1, flops, step * 1e9,
                       {"loss": loss0 - 0.1 * step, "lr": 1e-3, "sparsity": level if stage == "pretrain" else 0.0})
    db.set_status(rid, status)
    return rid


@pytest.fixture
def window(qtbot, db, tmp_path):
    from studio.views.main_window import KEEP, MainWindow

    win = MainWindow(db.path, tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    win.resize(1400, 900)
    qtbot.addWidget(win)
    win.show()  # items need geometry to be clicked
    qtbot.waitExposed(win)
    yield win
    win.close()


def pipeline(db: RunDB) -> dict[str, str]:
    """sparse pre-training -> dense PubMedQA fine-tune -> soft prompt, with evaluation rows as the engine writes them."""
    ids = {"pre": make_run(db, "sparse75", "pretrain")}
    db.add_evaluation(ids["pre"], 10, "lm", "val", {"loss": 5.0, "perplexity": 148.4})
    db.add_evaluation(ids["pre"], 20, "lm", "val", {"loss": 4.2, "perplexity": 66.7})
    ids["ft"] = make_run(db, "ft-pubmedqa", "finetune", ids["pre"], task="pubmedqa", steps=10)
    db.add_evaluation(ids["ft"], 5, "pubmedqa", "dev", {"accuracy": 0.62, "macro_f1": 0.45, "loss": 1.1})
    db.add_evaluation(ids["ft"], 10, "pubmedqa", "dev", {"accuracy": 0.58, "macro_f1": 0.47, "loss": 1.0},
                      baselines={"majority": PUBMEDQA_MAJORITY, "zero_shot": {"accuracy": 0.31, "macro_f1": 0.2}})
    ids["pr"] = make_run(db, "prompt-pubmedqa", "prompt", ids["ft"], task="pubmedqa", steps=10)
    db.add_evaluation(ids["pr"], 10, "pubmedqa", "dev", {"accuracy": 0.6, "macro_f1": 0.4},
                      baselines={"majority": PUBMEDQA_MAJORITY})
    return ids


def click_item(qtbot, tree, item, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    rect = tree.visualItemRect(item)
    qtbot.mouseClick(tree.viewport(), Qt.MouseButton.LeftButton, modifier, rect.center())


@pytest.mark.quick
def test_compare_opens_from_a_browser_multi_selection(qtbot, window, db):
    from studio.views.compare_view import ComparePanel

    ids = [make_run(db, f"s{int(lv * 100)}", "pretrain", level=lv) for lv in (0.0, 0.5, 0.9)]
    b = window.browser
    b.refresh()
    window.tabs.setCurrentWidget(b)
    click_item(qtbot, b.tree, b.item_for(ids[0]))
    click_item(qtbot, b.tree, b.item_for(ids[2]), Qt.KeyboardModifier.ControlModifier)
    assert set(b.selected_ids()) == {ids[0], ids[2]}
    b.refresh()  # the periodic rebuild keeps the selection
    assert set(b.selected_ids()) == {ids[0], ids[2]}
    assert b.action_buttons["compare"].isEnabled()
    qtbot.mouseClick(b.action_buttons["compare"], Qt.MouseButton.LeftButton)
    panel = window.tabs.currentWidget()
    assert isinstance(panel, ComparePanel) and window.tabs.tabText(window.tabs.currentIndex()) == "Compare"
    assert set(panel.charts.run_ids()) == {ids[0], ids[2]}
    # each compared run has a loss curve holding its database rows on the FLOPs axis
    for rid in (ids[0], ids[2]):
        x, y = panel.charts.curves[(rid, 0)][1].getData()
        assert len(y) == 20
    assert {r["id"] for r in panel.summary.rows} == {ids[0], ids[2]}  # the summary tab follows
    # a second selection re-points the same tab
    b.select_many([ids[1]])
    qtbot.mouseClick(b.action_buttons["compare"], Qt.MouseButton.LeftButton)
    assert window.compare is panel and panel.charts.run_ids() == [ids[1]]


@pytest.mark.quick
def test_parent_picker_lists_only_compatible_parents(qtbot, window, db):
    vocab = make_run(db, "vocab", "vocab", steps=0)
    pre = make_run(db, "pre", "pretrain")
    pre_stopped = make_run(db, "pre-stopped", "pretrain", status="stopped")
    make_run(db, "pre-failed", "pretrain", status="failed")
    make_run(db, "pre-running", "pretrain", status="running")
    ft = make_run(db, "ft", "finetune", pre, task="pubmedqa")
    pr = make_run(db, "pr", "prompt", ft, task="pubmedqa")
    form = window.form
    offered, enabled = {}, {}
    for stage in ("vocab", "pretrain", "finetune", "prompt"):
        form.set_field("stage", stage)
        offered[stage] = form.editors["parent"].run_ids()
        enabled[stage] = form.editors["parent"].widget.isEnabled()
    assert offered["vocab"] == [] and enabled == {"vocab": False, "pretrain": True, "finetune": True, "prompt": True}
    assert set(offered["pretrain"]) == {vocab, pre, pre_stopped}
    assert set(offered["finetune"]) == {pre, pre_stopped, ft}
    assert set(offered["prompt"]) == {ft, pre, pre_stopped} and offered["prompt"][0] == ft  # fine-tunes first
    assert pr not in sum(offered.values(), [])
    # the presets of the pipeline load into the form with their task fields
    form.load_preset("finetune-hoc")
    assert form.editors["stage"].value() == "finetune" and form.editors["task.name"].value() == "hoc"
    assert form.editors["task.dev"].widget.isEnabled() and not form.editors["task.fold"].widget.isEnabled()
    form.load_preset("prompt-pubmedqa")
    # the prompt's keys are offered: its length and learning rate under Basic, the rest in the (folded) Advanced part
    assert form.editors["task.fold"].widget.isEnabled() and form.editors["prompt.n_tokens"].widget.isVisibleTo(form)
    assert not form.groups["prompt"].isHidden()
    form.set_field("parent", ft)
    assert form.editors["parent"].value() == ft and "parent" not in form.errors


@pytest.mark.quick
def test_task_metric_rows_become_chart_series(qtbot, db):
    from studio.models.run_store import RunStore
    from studio.views.run_view import RunView

    pre = make_run(db, "pre", "pretrain")
    ft = make_run(db, "ft", "finetune", pre, task="pubmedqa", steps=10)
    for step, acc, f1 in ((5, 0.5, 0.3), (10, 0.62, 0.45)):  # the rows engine.train.finetune logs at each evaluation
        db.log_metrics(ft, step, step * 512, step * 0.1, step * 1e9, step * 1e9,
                       {"dev_accuracy": acc, "dev_macro_f1": f1, "dev_loss": 1.2 - step / 100})
    db.merge_meta(ft, baselines={"majority": PUBMEDQA_MAJORITY})
    view = RunView(RunStore(db, start=False))
    qtbot.addWidget(view)
    assert view.attach_run(ft)
    m = view.monitor
    x, y = m.curve_points("dev_accuracy")
    assert list(x) == [5, 10] and list(y) == pytest.approx([0.5, 0.62])
    assert list(m.curve_points("dev_macro_f1")[1]) == pytest.approx([0.3, 0.45])
    assert list(m.curve_points("dev_loss")[1]) == pytest.approx([1.15, 1.1])
    assert m.task_shown and m.task_plot.scene() is m.glw.scene() and "Task scores (development set)" in m.plots()
    assert [round(line.value(), 3) for line in m.baseline_lines] == [0.552, 0.237]
    # a pre-training run has no task rows: no score chart
    other = RunView(RunStore(db, start=False))
    qtbot.addWidget(other)
    other.attach_run(pre)
    assert not other.monitor.task_shown and other.monitor.task_plot.scene() is None


@pytest.mark.quick
def test_lineage_chain_with_best_scores_and_baselines(qtbot, window, db):
    from studio.models.lineage import best_scores, score_text
    from studio.views.runs_browser import COLUMNS

    ids = pipeline(db)
    scores = best_scores(window.store.evaluations_by_run())
    assert scores[ids["pre"]]["metrics"] == {"loss": 4.2}
    assert scores[ids["ft"]]["metrics"] == {"accuracy": 0.62, "macro_f1": 0.45}  # best by accuracy, not the last row
    assert scores[ids["ft"]]["baseline"] == {"accuracy": 0.552, "macro_f1": 0.237}
    b = window.browser
    b.refresh()
    b.select(ids["pr"])
    text = b.pipeline.text()
    assert text.index("sparse75") < text.index("ft-pubmedqa") < text.index("prompt-pubmedqa")
    assert "LM val loss 4.200" in text
    assert "PubMedQA acc 0.620 · macro-F1 0.450 (majority 0.552 · 0.237)" in text
    assert "acc 0.600" in text
    assert b.item_for(ids["ft"]).text(COLUMNS.index("Best score (baselines)")) == score_text(scores[ids["ft"]])
    # the tree is the lineage: prompt under fine-tune under pre-training
    assert b.item_for(ids["pr"]).parent() is b.item_for(ids["ft"])
    assert b.item_for(ids["ft"]).parent() is b.item_for(ids["pre"])


@pytest.mark.quick
def test_prompt_run_view_shows_nearest_tokens(qtbot, db):
    from studio.models.run_store import RunStore
    from studio.views.run_view import RunView

    ids = pipeline(db)
    nearest = [[{"id": 5, "token": " cancer", "piece": "Ġcancer", "cos": 0.41}, {"id": 9, "token": " tumor", "cos": 0.39}],
               [{"id": 7, "token": " answer", "cos": 0.33}, {"id": 3, "token": "?", "cos": 0.2}]]
    db.add_artifact(ids["pr"], "prompt", "/nowhere/prompt.safetensors", {"n_tokens": 2, "nearest_tokens": nearest})
    view = RunView(RunStore(db, start=False))
    qtbot.addWidget(view)
    view.attach_run(ids["pr"])
    t = view.prompt_table
    assert view.bottom.indexOf(t) > 0 and (t.rowCount(), t.columnCount()) == (2, 2)
    assert [t.item(0, j).text() for j in range(2)] == ["␣cancer", "␣tumor"]  # the leading space stays visible
    assert t.item(1, 1).text() == "?" and "0.330" in t.item(1, 0).toolTip()
    # without the artifact, the token strings in the run's meta
    db.db.execute("DELETE FROM artifacts")
    db.db.conn.commit()
    db.merge_meta(ids["pr"], prompt_nearest_tokens=[["a", "b", "c"]])
    assert view.prompt_tokens(db.get_run(ids["pr"])) == [[("a", None), ("b", None), ("c", None)]]


@pytest.mark.quick
def test_archive_and_delete_behind_a_confirmation(qtbot, window, db, monkeypatch):
    ids = pipeline(db)
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.StandardButton.Yes)
    warned = []
    monkeypatch.setattr(QMessageBox, "warning", lambda *a, **k: warned.append(a[2]))
    b = window.browser
    b.refresh()
    b.select(ids["pr"])
    assert b.notes.run_id == ids["pr"]
    qtbot.mouseClick(b.notes.archive_button, Qt.MouseButton.LeftButton)
    assert asked and "Archive run" in asked[-1]
    assert db.get_run(ids["pr"])["archived"] == 1 and b.item_for(ids["pr"]) is None
    b.archived_box.setChecked(True)  # "show archived" brings it back
    assert b.item_for(ids["pr"]) is not None
    b.archived_box.setChecked(False)
    # a live run is not deleted
    db.update_run(ids["ft"], status="running", pid=os.getpid())
    b.refresh()
    b.select(ids["ft"])
    assert not b.notes.delete() and db.get_run(ids["ft"]) is not None and warned
    db.update_run(ids["ft"], status="completed", pid=None)
    b.refresh()
    b.select(ids["ft"])
    with qtbot.waitSignal(b.run_deleted):  # to the trash (Undo brings it back), then for good when it is emptied
        qtbot.mouseClick(b.notes.delete_button, Qt.MouseButton.LeftButton)
    assert b.item_for(ids["ft"]) is None and db.get_run(ids["ft"]) is not None
    assert b.empty_trash() == [ids["ft"]] and "for good" in asked[-1]
    assert db.get_run(ids["ft"]) is None and b.item_for(ids["ft"]) is None
    assert not db.metrics(ids["ft"]) and not db.evaluations(ids["ft"])


def test_exports_from_the_browser_and_the_run_view(qtbot, window, db, tmp_path):
    from studio.widgets.chart_export import export_plot

    ids = pipeline(db)
    b = window.browser
    b.refresh()
    b.select_many([ids["pre"], ids["ft"]])
    n = b.export_metrics_dialog(str(tmp_path / "m.csv"))
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert n == len(rows) == 3 * 20 + 3 * 10 and {r["run_id"] for r in rows} == {ids["pre"], ids["ft"]}
    b.select(ids["ft"])
    path = b.export_toml_dialog(str(tmp_path / "ft.toml"))
    text = path.read_text()
    assert 'stage = "finetune"' in text and f'parent = "{ids["pre"]}"' in text
    # a run view's chart at a chosen size
    view = window.open_run(ids["pre"])
    plots = view.monitor.plots()
    out = export_plot(plots["Loss"], tmp_path / "loss.png", 640, 360, "png")
    assert QImage(str(out)).size().toTuple() == (640, 360)
    # export-hf runs the engine CLI; an unknown run comes back as the engine's error
    job = window.export_hf("nosuchrun", str(tmp_path / "hf"))
    with qtbot.waitSignal(job.done, timeout=60_000) as sig:
        pass
    ok, message, _report = sig.args
    assert not ok and "nosuchrun" in message


@pytest.mark.quick
def test_run_header_shows_the_precision_and_the_cpu_features_it_was_chosen_from(qtbot, tmp_path):
    from studio.models.run_store import RunStore
    from studio.views.run_view import RunView

    db = RunDB(tmp_path / "runs.db")
    pre = make_run(db, "pre", "pretrain", steps=10)
    db.merge_meta(pre, precision="bf16", precision_reason="precision bf16 (auto): the CPU (Test CPU) has AVX512-BF16",
                  cpu={"model": "Test CPU", "features": {"AMX": False, "AVX512-BF16": True, "AVX-512": True, "AVX2": True}})
    plain = make_run(db, "plain", "pretrain", steps=10)
    db.merge_meta(plain, precision="fp32", precision_reason="precision fp32 (auto): ...",
                  cpu={"model": "Old CPU", "features": {"AMX": False, "AVX512-BF16": False, "AVX-512": False, "AVX2": True}})
    shown = {}
    for run in (pre, plain):
        view = RunView(RunStore(db, start=False))
        qtbot.addWidget(view)
        assert view.attach_run(run)
        shown[run] = (view.precision_label.text(), view.precision_label.toolTip())
    assert shown[pre][0] == "bf16 · AVX512-BF16"
    assert "has AVX512-BF16" in shown[pre][1] and "Test CPU" in shown[pre][1] and "AMX no" in shown[pre][1]
    assert shown[plain][0] == "fp32 · no bf16 units"


HOC_MAJORITY = {"micro_f1": 0.195, "macro_f1": 0.09, "predicts": []}
HOC_TFIDF = {"micro_f1": 0.739, "macro_f1": 0.61, "fitted_on": 1295,
             "model": "TF-IDF 1-2-grams (sublinear) + logistic regression (C=10, balanced)"}


def hoc_runs(db: RunDB) -> dict[str, str]:
    """Two HoC fine-tunes of one parent: one evaluated with both text baselines (and a zero-shot one), as the
    engine stores them now; one evaluated before baselines were stored (none in its row, none in its meta)."""
    ids = {"pre": make_run(db, "pre", "pretrain")}
    ids["both"] = make_run(db, "ft-both", "finetune", ids["pre"], task="hoc", steps=10)
    for step, f1 in ((5, 0.55), (10, 0.612)):
        db.log_metrics(ids["both"], step, step * 512, step * 0.1, step * 1e9, step * 1e9,
                       {"dev_micro_f1": f1, "dev_macro_f1": f1 - 0.2, "dev_loss": 0.5})
    db.add_evaluation(ids["both"], 10, "hoc", "dev", {"micro_f1": 0.612, "macro_f1": 0.41, "loss": 0.5},
                      baselines={"majority": HOC_MAJORITY, "tfidf_lr": HOC_TFIDF,
                                 "zero_shot": {"skipped": "a classification head has no zero-shot form"}})
    db.merge_meta(ids["both"], baselines={"majority": HOC_MAJORITY, "tfidf_lr": HOC_TFIDF})
    ids["none"] = make_run(db, "ft-old", "finetune", ids["pre"], task="hoc", steps=10)
    db.log_metrics(ids["none"], 10, 5120, 1.0, 1e10, 1e10, {"dev_micro_f1": 0.5, "dev_loss": 0.6})
    db.add_evaluation(ids["none"], 10, "hoc", "dev", {"micro_f1": 0.5, "macro_f1": 0.3, "loss": 0.6})
    return ids


@pytest.mark.quick
def test_tfidf_baseline_in_the_browser_and_the_score_chart(qtbot, window, db):
    from studio.models.lineage import score_text
    from studio.views.runs_browser import COLUMNS
    from studio.models.run_store import RunStore
    from studio.views.run_view import RunView

    ids = hoc_runs(db)
    # a PubMedQA run with a majority but no TF-IDF baseline (stored before it existed): brackets as before
    old = make_run(db, "ft-pubmedqa", "finetune", ids["pre"], task="pubmedqa", steps=10)
    db.add_evaluation(old, 10, "pubmedqa", "dev", {"accuracy": 0.62, "macro_f1": 0.45},
                      baselines={"majority": PUBMEDQA_MAJORITY})
    b = window.browser
    b.refresh()
    col = COLUMNS.index("Best score (baselines)")
    assert b.tree.headerItem().text(col) == "Best score (baselines)"
    assert "TF-IDF" in b.tree.headerItem().toolTip(col) and "majority" in b.tree.headerItem().toolTip(col)
    both = b.item_for(ids["both"])
    assert both.text(col) == "HoC micro-F1 0.612 (majority 0.195, TF-IDF 0.739)"
    assert both.toolTip(col).startswith(both.text(col)) and "logistic regression" in both.toolTip(col)
    assert b.item_for(ids["none"]).text(col) == "HoC micro-F1 0.500"  # nothing stored: no brackets
    assert b.item_for(old).text(col) == "PubMedQA acc 0.620 · macro-F1 0.450 (majority 0.552 · 0.237)"
    b.select(ids["both"])
    assert "(majority 0.195, TF-IDF 0.739)" in b.pipeline.text()
    # a multi-metric score keeps each baseline's values together
    best = {"task": "pubmedqa", "step": 1, "metrics": {"accuracy": 0.62, "macro_f1": 0.45},
            "baseline": {"accuracy": 0.552, "macro_f1": 0.237}, "baseline_kind": "majority",
            "tfidf": {"accuracy": 0.601, "macro_f1": 0.41}}
    assert score_text(best) == "PubMedQA acc 0.620 · macro-F1 0.450 (majority 0.552 · 0.237, TF-IDF 0.601 · 0.410)"

    # the run view's score chart: a dashed majority line and a dotted TF-IDF line per score, both labelled
    view = RunView(RunStore(db, start=False))
    qtbot.addWidget(view)
    assert view.attach_run(ids["both"])
    m = view.monitor
    kinds = {k: sorted(round(v, 3) for v in vals) for k, vals in m.baseline_kinds().items()}
    assert kinds == {"majority": [0.09, 0.195], "tfidf_lr": [0.61, 0.739]}
    assert all(ln in m.task_plot.items for ln in m.baseline_lines)
    labels = {ln.label.toPlainText(): ln.pen.style() for ln in m.baseline_lines}
    assert labels == {"majority micro-F1 0.195": Qt.PenStyle.DashLine, "majority macro-F1 0.090": Qt.PenStyle.DashLine,
                      "TF-IDF micro-F1 0.739": Qt.PenStyle.DotLine, "TF-IDF macro-F1 0.610": Qt.PenStyle.DotLine}
    # showing the results again replaces the lines, it does not stack them
    view._show_results(db.get_run(ids["both"]))
    assert len(m.baseline_lines) == 4
    # a run with no baselines stored: a score chart without reference lines
    plain = RunView(RunStore(db, start=False))
    qtbot.addWidget(plain)
    assert plain.attach_run(ids["none"])
    assert plain.monitor.task_shown and plain.monitor.baseline_lines == []


@pytest.mark.quick
def test_study_view_shows_the_tfidf_baseline_of_chained_runs(qtbot, db, tmp_path):
    from engine.orchestrate.queue import Queue
    from studio.models.run_store import RunStore
    from studio.views.study_view import TABLE_COLUMNS, StudyView

    ids = hoc_runs(db)
    other = make_run(db, "pre50", "pretrain", level=0.5)
    q = Queue(db)
    sweep = q.create_sweep("levels", {"grid": {"sparsity.level": [0.75, 0.5]}})
    item = {"config_name": "demo", "config_text": "", "sets": [], "runs_dir": str(tmp_path / "runs"),
            "cwd": str(tmp_path), "sweep_id": sweep}
    entries = q.add([{**item, "label": "sparsity.level=0.75", "stage": "pretrain"},
                     {**item, "label": "sparsity.level=0.75", "stage": "finetune", "after": 0},
                     {**item, "label": "sparsity.level=0.5", "stage": "pretrain"},
                     {**item, "label": "sparsity.level=0.5", "stage": "finetune", "after": 2}])
    for entry, run in zip(entries, (ids["pre"], ids["both"], other, ids["none"])):
        q.set_run(entry, run)
        q.finish(entry, "completed")
    view = StudyView(RunStore(db, start=False), sweep)
    qtbot.addWidget(view)
    t = view.table
    header = [t.horizontalHeaderItem(c).text() for c in range(t.columnCount())]
    assert header == list(TABLE_COLUMNS) and header[-4:] == ["Score", "Majority", "TF-IDF", "Zero-shot"]
    assert "logistic regression" in t.horizontalHeaderItem(header.index("TF-IDF")).toolTip()
    rows = {t.item(r, 10).text(): [t.item(r, c).text() for c in range(12, 16)] for r in range(t.rowCount())}
    assert rows == {ids["both"]: ["0.6120", "0.1950", "0.7390", "–"],  # the zero-shot one was skipped
                    ids["none"]: ["0.5000", "–", "–", "–"]}
    # the chart: bars, the majority dash and the TF-IDF diamond (each with its legend entry) where stored
    bar = [r for r, (_p, c) in enumerate(view.score_bars) if c["run_id"] == ids["both"]][0]
    assert set(view.baseline_markers) == {"majority", "tfidf_lr"}
    x, y = view.baseline_markers["tfidf_lr"].getData()
    assert list(x) == [bar] and list(y) == pytest.approx([0.739])
    assert list(view.baseline_markers["majority"].getData()[1]) == pytest.approx([0.195])
    legend = [label.text for _sample, label in view.score_legend.items]
    assert legend == ["majority baseline", "TF-IDF + LR baseline"]
    # the CSV export carries the same baselines, in columns of their own
    import csv
    import io
    from engine.orchestrate.study import study_csv, sweep_study
    table = {r["child_run"]: r for r in csv.DictReader(io.StringIO(study_csv(sweep_study(db, sweep))))}
    assert [table[ids["both"]][k] for k in ("child_score", "majority", "tfidf_lr", "zero_shot")] == ["0.612", "0.195", "0.739", ""]
    assert table[ids["none"]]["tfidf_lr"] == ""
    # the old run alone: nothing drawn for the baselines, no legend entries
    db.db.execute("UPDATE evaluations SET baselines = '{}'")
    db.db.conn.commit()
    view.refresh()
    assert view.baseline_markers == {} and view.score_legend.items == []
    assert {t.item(r, 14).text() for r in range(t.rowCount())} == {"–"}
