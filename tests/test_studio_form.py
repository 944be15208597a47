"""The new-run form as a user meets it: Basic first and Advanced folded, fields greyed out where the method
or task does not read them, pre-flight warnings that never hold Start back, a child run's model shape read
from its parent, and a start the engine refuses.

Parent runs are rows written through ``RunDB``; only the last test starts the engine (which refuses the
run before creating it, in a few seconds).
"""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtCore import Qt

from engine.core.config import from_dict
from engine.store.rundb import RunDB
from studio.models.config_form import BASIC_KEYS, METHOD_FIELDS

SMALL = {"n_layer": 2, "d_model": 64, "n_head": 2, "n_ctx": 64}
WIDE = {"n_layer": 6, "d_model": 192, "n_head": 6, "n_ctx": 128, "n_positions": 256}


def parent_run(db: RunDB, name: str, model: dict, vocab: int, stage: str = "pretrain") -> str:
    """A completed run of ``stage`` with this model shape, as a parent is stored (the config the engine
    validated)."""
    cfg = from_dict({"name": name, "stage": "pretrain", "model": model, "tokenizer": {"vocab_size": vocab}}).to_dict()
    rid = db.create_run(name=name, stage=stage, config=cfg)
    db.merge_meta(rid, vocab_size=vocab)
    db.set_status(rid, "completed")
    return rid


def shown(form, key: str) -> bool:
    """The field is on screen once the form is (its row, section and fold are)."""
    return form.editors[key].widget.isVisibleTo(form)


@pytest.mark.quick
def test_basic_first_and_advanced_folded_until_an_error_is_inside(form):
    assert form.editors["stage"].value() == "pretrain"
    for key in ("name", "stage", "parent", "data.corpus", "sparsity.level", "train.max_steps", "train.batch_size",
                "train.lr", "train.seed", "train.threads", "train.precision"):
        assert shown(form, key), key
    assert not shown(form, "model.d_model") and not shown(form, "train.eval_every")  # folded
    assert "Advanced (" in form.advanced_toggle.text() and not form.advanced_toggle.isChecked()
    assert not shown(form, "train.epochs")  # a pre-training counts steps: epochs is a fine-tuning key
    form.set_field("model.n_head", 3)  # 128 is not divisible by 3: the fold opens on the error
    assert form.advanced_toggle.isChecked() and shown(form, "model.n_head")
    assert form.editors["model.n_head"].error_label.isVisibleTo(form) and "1 error" in form.advanced_toggle.text()
    form.set_field("model.n_head", 4)
    form.show_advanced(False)
    assert not shown(form, "model.n_head") and form.is_valid()
    assert set(BASIC_KEYS) <= set(form.editors)


@pytest.mark.quick
def test_static_method_greys_out_the_dynamic_sparsity_fields(form):
    form.show_advanced(True)
    form.set_field("sparsity.method", "static")
    for key in METHOD_FIELDS:
        assert not form.editors[key].widget.isEnabled(), key
    form.set_field("sparsity.method", "rigl")
    on = {key: form.editors[key].widget.isEnabled() for key in METHOD_FIELDS}
    assert on == {"sparsity.start_step": True, "sparsity.end_step": True, "sparsity.update_every": True,
                  "sparsity.drop_fraction": True, "sparsity.initial": False}
    form.set_field("sparsity.method", "gmp")
    assert form.editors["sparsity.initial"].widget.isEnabled()
    assert not form.editors["sparsity.drop_fraction"].widget.isEnabled()
    assert form.editors["sparsity.level"].widget.isEnabled() and form.is_valid()


def warning(form, key: str) -> str:
    ed = form.editors[key]
    assert ed.error is None, ed.error
    return ed.warning or ""


@pytest.mark.quick
def test_preflight_warns_without_holding_start_back(form, tmp_path):
    assert form.warnings == {} and form.start_button.isEnabled()
    corpus = tmp_path / "abstracts.txt"
    corpus.write_text("one abstract\n")
    form.set_field("data.corpus", ["builtin:hpo", str(corpus), str(tmp_path / "gone.jsonl")])
    assert "gone.jsonl" in warning(form, "data.corpus") and "abstracts.txt" not in warning(form, "data.corpus")
    assert form.editors["data.corpus"].error_label.isVisibleTo(form)  # shown under the field
    assert form.start_button.isEnabled() and form.queue_button.isEnabled() and form.is_valid()
    assert "gone.jsonl" in form.summary.text()
    form.set_field("data.corpus", ["builtin:hpo"])
    assert "data.corpus" not in form.warnings

    form.set_field("train.max_steps", 40)
    form.set_field("train.warmup_steps", 5)
    form.set_field("train.eval_every", 50)
    assert "validated only at its end" in warning(form, "train.eval_every")
    form.set_field("train.checkpoint_every", 41)
    assert "beyond train.max_steps (40)" in warning(form, "train.checkpoint_every")
    form.set_field("train.eval_every", 40)
    form.set_field("train.checkpoint_every", 40)  # at the last step: what the user asked for
    assert not form.warnings
    form.set_field("train.warmup_steps", 30)
    assert "75 % of the run" in warning(form, "train.warmup_steps")
    form.set_field("train.warmup_steps", 19)
    assert not form.warnings
    form.set_field("train.warmup_steps", 20)  # half the run
    assert "50 %" in warning(form, "train.warmup_steps")
    assert "1 warning" in form.advanced_toggle.text()  # the fold says what it holds
    assert form.start_button.isEnabled()


@pytest.mark.quick
def test_finetune_warns_about_missing_task_files(form, db, tmp_path):
    parent = parent_run(db, "pre", SMALL, 300)
    form.refresh_parents()
    form.load_preset("finetune-pubmedqa")
    form.set_field("parent", parent)
    form.set_field("task.train", str(tmp_path / "no" / "pqal_train.json"))
    assert "file not found" in warning(form, "task.train") and form.start_button.isEnabled()
    form.set_field("task.train", "")
    assert "no training file" in warning(form, "task.train")
    train = tmp_path / "pqal_train.json"
    train.write_text("{}")
    form.set_field("task.train", str(train))
    form.set_field("task.dev", str(tmp_path / "dev.json"))
    assert "task.train" not in form.warnings and "file not found" in warning(form, "task.dev")
    assert not form.editors["data.corpus"].widget.isEnabled()  # PubMedQA reads its files, not the corpus
    form.set_field("task.name", "lm")  # the lm task reads the corpus, not these files
    assert "task.dev" not in form.warnings and not form.editors["task.dev"].widget.isEnabled()
    assert form.editors["data.corpus"].widget.isEnabled()


@pytest.mark.quick
def test_finetune_form_shows_the_parent_s_shape(qtbot, db, tmp_path):
    from studio.views.main_window import KEEP, MainWindow

    small = parent_run(db, "small", SMALL, 300)
    wide = parent_run(db, "wide", WIDE, 512)
    win = MainWindow(db.path, tmp_path / "runs", attach=False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    estimates = []
    win.estimate.estimate = lambda: estimates.append(win.form.editors["parent"].value())  # no engine process
    win.estimate.debounce.timeout.disconnect()
    win.estimate.debounce.timeout.connect(lambda: win.estimate.estimate())
    win.estimate.debounce.setInterval(20)
    form = win.form
    form.set_field("stage", "finetune")
    assert not form.shape_label.isHidden() and "choose" in form.shape_label.text()
    form.set_field("parent", small)
    shape = form.shape_label.text()
    assert "2 layers" in shape and "d_model 64" in shape and "2 heads" in shape and "vocabulary 300" in shape
    form.show_advanced(True)
    # the parent's shape is the model: only the context length may be set, the rest is not offered
    assert not form.editors["model.d_model"].widget.isVisibleTo(form)
    assert form.editors["model.n_ctx"].widget.isVisibleTo(form)
    assert form.shape_label.textInteractionFlags() & Qt.TextInteractionFlag.TextSelectableByMouse  # read-only
    qtbot.waitUntil(lambda: estimates == [small], timeout=5000)
    win.estimate.show_result({"params": {"total": 1000, "nonzero": 1000}})
    form.set_field("parent", wide)
    assert "6 layers" in form.shape_label.text() and "context 128 (up to 256)" in form.shape_label.text()
    assert not win.estimate.labels["params"].isEnabled()  # the small parent's numbers are marked stale
    qtbot.waitUntil(lambda: estimates == [small, wide], timeout=5000)  # and estimated again
    form.set_field("stage", "pretrain")
    assert form.shape_label.isHidden() and form.editors["model.d_model"].widget.isVisibleTo(form)
    win.close()


def test_a_run_refused_at_launch_leaves_no_tab(qtbot, db, tmp_path):
    """The engine refuses a missing corpus before creating the run: no tab of empty charts is left; the
    form says why and marks the field."""
    from studio.views.main_window import KEEP, MainWindow

    win = MainWindow(db.path, tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    missing = str(tmp_path / "not-there.txt")
    win.form.set_field("data.corpus", [missing])
    assert win.form.start_button.isEnabled()  # a warning only: the file may appear before launch
    tabs = win.tabs.count()
    view = win.start_from_form()
    assert view is not None and win.tabs.count() == tabs + 1
    qtbot.waitUntil(lambda: view not in win.views, timeout=60_000)  # (the view itself is deleted)
    assert win.tabs.count() == tabs and win.tabs.currentWidget() is win.form
    assert "corpus file not found" in win.form.launch_banner.text() and win.form.launch_banner.isVisibleTo(win.form)
    assert "not found" in (win.form.editors["data.corpus"].error or "")
    assert db.list_runs() == []  # nothing was created
    win.form.set_field("data.corpus", ["builtin:hpo"])  # the fix clears the message
    assert win.form.launch_banner.isHidden() and win.form.is_valid()
    win.close()
