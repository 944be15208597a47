"""Model families in the studio: the runs list, the details and the import message name a run's family and
shape; the form shows the model keys the chosen family reads (and a child's parent shape with its
family); the schedule preview and the estimate count the family's FLOPs, as the engine's formula does.

Runs are rows written through ``RunDB`` with configs the engine validated; only the last test starts the
engine (its ``estimate`` command, in the background as the studio runs it).
"""
from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from PySide6.QtWidgets import QFormLayout

from engine.core.config import FAMILIES, ModelConfig, RunConfig, from_dict
from engine.core.errors import InputError
from engine.core.flops import flop_model_for_model
from engine.model.family import variations
from engine.store.rundb import RunDB
from test_studio_form import parent_run, shown

# SmolLM-135M's shape on a short context: grouped-query attention (9 query heads over 3 key/value heads)
LLAMA = {"family": "llama", "n_layer": 30, "d_model": 576, "n_head": 9, "n_kv_head": 3, "d_ff": 1536, "n_ctx": 64,
         "rope_theta": 100000.0}
LLAMA_LINE = "llama · 30 layers · d 576 · 9 heads / 3 kv"
GPT2_ONLY = ("model.bias", "model.activation")
LLAMA_KEYS = ("model.n_kv_head", "model.d_ff", "model.rope_theta", "model.norm_eps", "model.tie_embeddings")


def stored_run(db: RunDB, name: str, stage: str, model: dict, vocab: int = 300) -> str:
    return parent_run(db, name, model, vocab, stage)


@pytest.mark.quick
def test_the_runs_browser_shows_each_run_s_family_and_shape(qtbot, db):
    from studio.commands.run_commands import Commands
    from studio.models.run_store import RunStore
    from studio.views.runs_browser import COLUMNS, RunsBrowser

    llama = stored_run(db, "smol", "import", LLAMA)
    # a run stored before families: its model section has no family, which means gpt2
    old = db.create_run(name="old", stage="pretrain",
                        config={"model": {"n_layer": 4, "d_model": 128, "n_head": 4, "n_ctx": 128}})
    bpe = db.create_run(name="bpe", stage="vocab", config=from_dict({"name": "bpe", "stage": "vocab"}).to_dict())
    store = RunStore(db, start=False)
    browser = RunsBrowser(store, Commands(store, act_on_store=False))
    qtbot.addWidget(browser)
    col = COLUMNS.index("Model")
    assert browser.item_for(llama).text(col) == LLAMA_LINE
    assert browser.item_for(old).text(col) == "gpt2 · 4 layers · d 128 · 4 heads"
    assert browser.item_for(bpe).text(col) == ""  # a vocabulary run builds no model
    tip = browser.item_for(llama).toolTip(col)
    assert "d_ff 1536" in tip and "context 64" in tip
    browser.select(llama)
    assert "model: llama · 30 layers · d_model 576 · 9 heads / 3 kv · d_ff 1536" in browser.detail.text()
    browser.select(bpe)
    assert "model:" not in browser.detail.text()


@pytest.mark.quick
def test_an_imported_model_is_announced_with_its_family_and_shape(qtbot, db, tmp_path):
    from studio.views.main_window import KEEP, MainWindow
    from studio.views.runs_browser import COLUMNS

    win = MainWindow(db.path, tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    rid = stored_run(db, "smol", "import", LLAMA)
    # what `mediswift import-hf --json` prints last, as the studio reads it when the import ends
    report = {"run_id": rid, "from": "/models/SmolLM-135M", "family": "llama", "params": 134_515_008}
    win._imported(None, 0, [json.dumps(report)])
    message = win.statusBar().currentMessage()
    assert f"as run {rid} ({LLAMA_LINE}, 134,515,008 parameters)" in message
    assert win.browser.item_for(rid).text(COLUMNS.index("Model")) == LLAMA_LINE
    win.form.set_field("stage", "finetune")
    assert rid in win.form.editors["parent"].run_ids()
    win.close()


@pytest.mark.quick
def test_the_form_shows_the_keys_the_chosen_family_reads(form):
    form.show_advanced(True)
    family = form.editors["model.family"]
    assert [family.widget.itemData(i) for i in range(family.widget.count())] == list(FAMILIES)  # the engine's list
    model_form = form.forms["model"]
    assert model_form.itemAt(0, QFormLayout.ItemRole.FieldRole).widget() is family.container  # it heads its section
    assert family.value() == "gpt2"
    assert all(shown(form, k) for k in GPT2_ONLY) and not any(shown(form, k) for k in LLAMA_KEYS)
    gpt2_title = form.advanced_toggle.text()

    form.set_field("model.family", "llama")
    assert all(shown(form, k) for k in LLAMA_KEYS) and not any(shown(form, k) for k in GPT2_ONLY)
    assert form.advanced_toggle.text() != gpt2_title  # the fold counts the settings it shows
    form.set_field("model.n_kv_head", 2)
    assert form.is_valid() and "model.n_kv_head=2" in form.preview.toPlainText()

    # gpt2 refuses grouped-query attention: the key keeps its row, with the engine's message, until it is fixed
    form.set_field("model.family", "gpt2")
    assert shown(form, "model.n_kv_head") and "gpt2" in form.editors["model.n_kv_head"].error
    assert not shown(form, "model.rope_theta") and not form.is_valid()
    form.set_field("model.n_kv_head", 0)
    assert not shown(form, "model.n_kv_head") and form.is_valid()


@pytest.mark.quick
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_shows_what_the_engine_builds_for_it(form, family):
    """Data-driven: rope_theta shows exactly for the families engine.model.family gives rotary positions,
    and the keys the engine fixes for a family (gpt2's d_ff) hide with it; a family added there is covered."""
    form.show_advanced(True)
    form.set_field("model.family", family)
    built = variations(ModelConfig(family=family))
    assert shown(form, "model.rope_theta") == (built.positions == "rotary")
    assert shown(form, "model.activation") == (built.mlp == "gelu")
    for key in ("model.n_layer", "model.d_model", "model.n_head", "model.n_ctx"):
        assert shown(form, key)  # the shape belongs to every family
    try:
        ModelConfig(family=family, d_ff=256)
        takes_d_ff = True
    except InputError:
        takes_d_ff = False
    assert shown(form, "model.d_ff") == takes_d_ff
    assert form.is_valid()


@pytest.mark.quick
def test_a_child_form_shows_its_llama_parent_s_family_and_shape(form, db):
    parent = stored_run(db, "smol", "pretrain", LLAMA, vocab=512)
    form.refresh_parents()
    form.set_field("stage", "finetune")
    form.set_field("parent", parent)
    assert form.shape_label.text() == ("from the parent: llama · 30 layers · d_model 576 · 9 heads / 3 kv · "
                                       "d_ff 1536 · context 64 · vocabulary 512")
    form.show_advanced(True)
    # the family and its keys are the parent's: not offered, whatever the form's own family says
    assert not any(shown(form, k) for k in ("model.family", *LLAMA_KEYS, *GPT2_ONLY))
    assert shown(form, "model.n_ctx")


@pytest.mark.quick
def test_a_pretraining_that_continues_an_imported_llama_plans_with_its_shape_and_flops(form, db):
    """Pre-training from an imported model continues its weights (the engine takes the parent's model):
    the form shows that shape instead of asking for one, and the schedule preview counts that model."""
    from studio.models.config_form import with_parent_shape

    imported = stored_run(db, "smol", "import", LLAMA, vocab=512)
    ours = stored_run(db, "ours", "pretrain", {"n_layer": 2, "d_model": 64, "n_head": 2, "n_ctx": 64}, vocab=512)
    form.refresh_parents()
    form.set_field("stage", "pretrain")
    form.show_advanced(True)
    assert shown(form, "model.n_layer")  # no parent yet: the form's own shape
    form.set_field("parent", imported)
    assert form.shape_label.text().startswith("from the parent: llama · 30 layers · d_model 576")
    assert not any(shown(form, k) for k in ("model.family", "model.n_layer", *LLAMA_KEYS))
    assert shown(form, "model.n_ctx")
    planned = form.planned_config()
    assert planned is not None and dataclasses.asdict(planned.model) == dataclasses.asdict(
        dataclasses.replace(from_dict({"model": LLAMA}).model, n_positions=64))
    assert planned.tokenizer.vocab_size == 512
    # a pre-training from one of our own runs reuses only its vocabulary: the form's shape stands
    form.set_field("parent", ours)
    assert shown(form, "model.n_layer") and not form.shape_label.isVisibleTo(form)
    assert with_parent_shape(form.config, db.get_run(ours)).model == form.config.model


def _config(family: str, **model) -> RunConfig:
    return from_dict({"name": "x", "stage": "pretrain", "tokenizer": {"vocab_size": 512}, "train": {"max_steps": 20},
                      "sparsity": {"level": 0.75},
                      "model": {"n_layer": 4, "d_model": 128, "n_head": 4, "n_ctx": 64, "family": family, **model}})


@pytest.mark.quick
def test_the_schedule_preview_counts_the_family_s_flops(qtbot):
    from studio.widgets.schedule_preview import SchedulePreview

    preview = SchedulePreview()
    qtbot.addWidget(preview)
    totals = {}
    for family, extra in (("gpt2", {}), ("llama", {"n_kv_head": 2, "d_ff": 344})):
        cfg = _config(family, **extra)
        preview.show_config(cfg)
        per_token = flop_model_for_model(cfg.model, 512, cfg.sparsity.level).train_per_token(True)
        totals[family] = preview.total_flops()
        # a static run's plan: the engine formula's sparse FLOPs per token at every one of its 20 steps
        assert totals[family] == pytest.approx(20 * per_token, rel=1e-4)
        tokens = cfg.train.batch_size * cfg.model.n_ctx  # a step's (one process, no accumulation)
        assert f"{totals[family] * tokens:.3g} training FLOPs over 20 steps" in preview.note.text()
    assert totals["llama"] != pytest.approx(totals["gpt2"])  # same width and depth, another model


def test_the_estimate_of_a_llama_config_is_the_engine_formula_s(qtbot, form):
    """The estimate panel runs `mediswift estimate` as the studio does and shows the family's FLOPs."""
    from studio.models import formatting as fmt
    from studio.widgets.estimate_panel import EstimatePanel

    for key, value in (("model.family", "llama"), ("model.n_kv_head", 2), ("model.d_ff", 344),
                       ("train.max_steps", 10)):
        form.set_field(key, value)
    assert form.is_valid()
    panel = EstimatePanel(form.estimate_args)
    panel.auto.setChecked(False)
    panel.probe.setValue(0)  # the analytic estimate only: no probe steps
    qtbot.addWidget(panel)
    panel.estimate()
    qtbot.waitUntil(lambda: panel.result is not None or panel.error is not None, timeout=180_000)
    assert panel.error is None, panel.error
    cfg, r = form.config, panel.result
    tc = cfg.train
    assert r["tokens"] == tc.max_steps * tc.batch_size * tc.grad_accum * cfg.model.n_ctx
    fm = flop_model_for_model(cfg.model, cfg.tokenizer.vocab_size, cfg.sparsity.level)
    assert r["flops"]["sparse"] == pytest.approx(fm.train_per_token(True) * r["tokens"])
    assert r["flops"]["dense"] == pytest.approx(fm.train_per_token(False) * r["tokens"])
    as_gpt2 = dataclasses.replace(cfg.model, family="gpt2", n_kv_head=0, d_ff=0)
    assert r["flops"]["dense"] != pytest.approx(
        flop_model_for_model(as_gpt2, cfg.tokenizer.vocab_size, 0.0).train_per_token(False) * r["tokens"])
    sparse, dense = fmt.flops(r["flops"]["sparse"]), fmt.flops(r["flops"]["dense"])
    assert panel.labels["flops"].text() == f"{sparse} sparse vs {dense} dense"
