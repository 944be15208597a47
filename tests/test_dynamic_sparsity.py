"""Dynamic sparsity: GMP, SET and RigL masks in packed storage, their schedules, FLOPs and resume."""
from __future__ import annotations

import pytest
import torch
from helpers import PUBMED_TRAIN, needs_shared_data, tiny

from engine.core.config import RunConfig, from_dict
from engine.core.flops import flop_model_for_config, flop_model_for_model
from engine.store.rundb import RunDB
from engine.core.sparsity_schedule import (
    Schedule, gpt_layer_shapes, layer_shapes, nonzero_counts, planned, step_flops_per_token,
)
from engine.model.mask_updates import drop_and_grow, install_mask, magnitude_prune
from engine.model.sparse_linear import SparseLinear

CORPUS = f"data.corpus={PUBMED_TRAIN}"


def _layer(weight: list[list[float]], mask: list[list[int]]) -> SparseLinear:
    w = torch.tensor(weight)
    layer = SparseLinear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.set_mask(torch.tensor(mask, dtype=torch.bool))
    return layer


def _with_moments(layer: SparseLinear) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([layer.values], lr=0.1)
    st = opt.state[layer.values]
    st["step"] = torch.tensor(3.0)
    st["exp_avg"] = torch.arange(1.0, layer.values.numel() + 1)  # moment i belongs to packed value i
    st["exp_avg_sq"] = 10 * torch.arange(1.0, layer.values.numel() + 1)
    return opt


@pytest.mark.quick
def test_set_drops_the_smallest_and_grows_the_highest_scores_with_zero_values_and_moments():
    # row-major offsets:  0    1    2    3  |  4    5    6    7
    layer = _layer([[0.5, 0.0, -0.1, 0.9], [0.0, -0.3, 0.0, 0.2]],
                   [[1, 0, 1, 1], [0, 1, 0, 1]])  # active 0,2,3,5,7 with |w| .5 .1 .9 .3 .2
    opt = _with_moments(layer)  # moments 1..5 on offsets 0,2,3,5,7
    score = torch.tensor([[9.0, 0.4, 9.0, 9.0], [0.7, 9.0, 0.1, 9.0]])  # inactive 1,4,6 score .4 .7 .1
    new = drop_and_grow(layer.weight, layer.mask, 2, score)
    # drop the two smallest active (offsets 2 and 7: |w| .1 and .2); grow the two best inactive (4 then 1)
    assert new.reshape(-1).nonzero().squeeze(1).tolist() == [0, 1, 3, 4, 5]
    stats = install_mask(layer, new, opt)
    assert stats == {"before": 5, "after": 5, "left": 2, "entered": 2}
    assert layer.values.tolist() == pytest.approx([0.5, 0.0, 0.9, 0.0, -0.3])  # grown 1 and 4 start at zero
    st = opt.state[layer.values]
    assert st["exp_avg"].tolist() == [1.0, 0.0, 3.0, 0.0, 4.0]  # kept 0,3,5 keep theirs; grown reset
    assert st["exp_avg_sq"].tolist() == [10.0, 0.0, 30.0, 0.0, 40.0]
    assert float(st["step"]) == 3.0
    assert torch.equal(layer.weight != 0, torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool))


@pytest.mark.quick
def test_rigl_grows_where_the_dense_gradient_is_largest_never_where_it_just_dropped():
    layer = _layer([[0.05, 0.0], [0.0, 0.8]], [[1, 0], [0, 1]])
    grad = torch.tensor([[100.0, 0.2], [0.5, 100.0]])  # the largest |grad| sit on active (or dropped) weights
    new = drop_and_grow(layer.weight, layer.mask, 1, grad.abs())
    # offset 0 (|w| .05) leaves; offset 2 (|g| .5) enters, not offset 0 again despite its gradient
    assert new.reshape(-1).tolist() == [False, False, True, True]
    assert int(new.sum()) == int(layer.mask.sum())


@pytest.mark.quick
def test_magnitude_pruning_keeps_the_largest_and_serves_a_dense_matrix_too():
    w = torch.tensor([[0.3, -2.0, 0.1], [1.0, -0.2, 0.0]])
    assert magnitude_prune(w, None, 2).reshape(-1).tolist() == [False, True, False, True, False, False]
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)  # -2.0 is already pruned
    assert magnitude_prune(w, mask, 2).reshape(-1).tolist() == [True, False, False, True, False, False]
    with pytest.raises(ValueError):
        magnitude_prune(w, mask, 6)


@pytest.mark.quick
def test_gmp_sparsity_follows_the_cubic_schedule_and_drop_fractions_decay_on_a_cosine():
    s = Schedule("gmp", level=0.9, initial=0.2, start=10, end=110, every=10, drop=0.3)
    for t in (10, 20, 50, 100, 110):
        assert s.gmp_sparsity(t) == pytest.approx(0.9 + (0.2 - 0.9) * (1 - (t - 10) / 100) ** 3)
    assert s.gmp_sparsity(500) == pytest.approx(0.9) and s.sparsity_during(5) == 0.2
    assert s.sparsity_during(31) == pytest.approx(s.gmp_sparsity(30)) and s.sparsity_during(30) == pytest.approx(s.gmp_sparsity(20))
    assert s.updates(130) == list(range(10, 111, 10))
    r = Schedule("rigl", 0.75, 0.75, start=0, end=100, every=25, drop=0.3)
    assert r.updates(200) == [25, 50, 75, 100]
    assert [r.drop_fraction(t) for t in (0, 50, 100)] == pytest.approx([0.3, 0.15, 0.0])
    assert not Schedule("static", 0.75, 0.75, 0, 100, 1, 0.3).updates(100)


@pytest.mark.quick
def test_the_end_step_defaults_to_three_quarters_of_the_run():
    cfg = RunConfig().replace({"sparsity.method": "rigl", "train.max_steps": 400})
    assert Schedule.from_config(cfg).end == 300


@needs_shared_data()
# (SET with uniform levels: test_the_sparse_core_keeps_working_after_updates; RigL here in bf16, and on a
# llama-family model: grouped-query k and v narrower than q, SwiGLU's three MLP matrices)
@pytest.mark.parametrize("method,distribution,precision,family", [
    ("gmp", "erk", "fp32", ()), ("rigl", "erk", "bf16", ()),
    ("rigl", "erk", "fp32", ("model.family=llama", "model.n_kv_head=1", "model.d_ff=48"))])
def test_every_update_leaves_each_layer_its_exact_count_and_flops_follow_the_formula(cli, db_path, method,
                                                                                      distribution, precision, family):
    args = tiny(CORPUS, f"sparsity.method={method}", f"sparsity.distribution={distribution}", "sparsity.update_every=2",
                "sparsity.initial=0.3", "train.max_steps=10", "sparsity.end_step=8", "sparsity.kernel=dense",
                "model.n_layer=2", f"train.precision={precision}", *family)
    r = cli("train", "demo", *args)
    assert r.rc == 0, r.stderr
    db = RunDB(db_path)
    run = db.get_run(r.run_id)
    cfg = from_dict(run["config"])
    sched = Schedule.from_config(cfg)
    shapes = layer_shapes(cfg.model)  # the family's matrices
    assert len(shapes) == 2 * (7 if family else 6)
    updates = sched.updates(10)
    assert updates == [2, 4, 6, 8]
    churn = {m["step"]: m["value"] for m in db.metrics(r.run_id, names=["mask_churn"])}
    assert sorted(churn) == updates and all(0 <= c <= 1 for c in churn.values())
    for step in updates:
        level = sched.gmp_sparsity(step) if method == "gmp" else cfg.sparsity.level
        want = nonzero_counts(shapes, level, distribution)
        rows = {m["name"][len("sparsity/"):]: m["value"] for m in db.metrics(r.run_id) if m["step"] == step
                and m["name"].startswith("sparsity/")}
        assert rows == {n: pytest.approx(1 - want[n] / (s[0] * s[1]), abs=0) for n, s in shapes.items()}, step
    if method != "gmp":
        assert churn[2] == pytest.approx(sched.drop_fraction(2), abs=0.01)
    # the FLOPs spent: the documented per-step formula summed over the run's steps
    fm = flop_model_for_model(cfg.model, run["meta"]["vocab_size"], 0.0)  # the family's formula
    plan = planned(sched, shapes, 10, fm)
    tokens = cfg.train.batch_size * cfg.model.n_ctx
    assert run["summary"]["flops"] == pytest.approx(tokens * sum(plan["flops_per_token"]), rel=1e-9)
    if method == "rigl":
        nnz = sum(nonzero_counts(shapes, cfg.sparsity.level, distribution).values())
        assert plan["flops_per_token"][1] - plan["flops_per_token"][0] == pytest.approx(
            step_flops_per_token(fm, nnz, True) - step_flops_per_token(fm, nnz, False))


@pytest.mark.parametrize("method, extra", [("gmp", {"sparsity.initial": 0.2}), ("rigl", {"sparsity.distribution": "erk"}),
                                           ("set", {})])
def test_the_estimate_of_a_long_dynamic_run_sums_its_plan_per_update(monkeypatch, method, extra):
    import engine.core.sparsity_schedule as ss
    from engine.train.estimate import estimate

    cfg = RunConfig().replace({"sparsity.method": method, "train.max_steps": 3000, "sparsity.update_every": 7,
                               "model.n_layer": 2, "model.d_model": 64, "tokenizer.vocab_size": 512, **extra})
    m = cfg.model
    fm = flop_model_for_config(m.n_layer, m.d_model, m.n_ctx, cfg.tokenizer.vocab_size, 0.0)
    per_step = planned(Schedule.from_config(cfg), gpt_layer_shapes(m.n_layer, m.d_model), 3000, fm)["flops_per_token"]
    tokens = 3000 * cfg.train.batch_size * cfg.train.grad_accum * m.n_ctx
    monkeypatch.setattr(ss, "planned", None)  # the estimate never walks the steps
    assert estimate(cfg, probe_steps=0)["flops"]["sparse"] == sum(per_step) * tokens / 3000


@needs_shared_data()
@pytest.mark.parametrize("method", ["gmp"])  # SET's seeded growth: test_set_growth_is_a_function_of_seed_step_and_layer
def test_resume_across_an_update_equals_the_uninterrupted_run(cli, db_path, method):
    # a constant learning rate, and end_step given: the schedules do not depend on max_steps
    common = (CORPUS, f"sparsity.method={method}", "sparsity.update_every=3", "sparsity.end_step=9",
              "train.warmup_steps=0", "train.min_lr_ratio=1.0", "sparsity.kernel=dense")
    full = cli("train", "demo", *tiny(*common, "train.max_steps=12"))
    assert full.rc == 0, full.stderr
    part = cli("train", "demo", *tiny(*common, "train.max_steps=5"))
    assert part.rc == 0, part.stderr
    resumed = cli("train", "--resume", part.run_id, "--set", "train.max_steps=12")
    assert resumed.rc == 0, resumed.stderr

    def losses(result):
        return {m["step"]: m["metrics"]["loss"] for m in result.of_type("metrics") if "loss" in m["metrics"]}

    ref, after = losses(full), losses(resumed)
    assert sorted(after) == list(range(6, 13))
    for step in after:
        assert after[step] == pytest.approx(ref[step], rel=1e-6), step
    from engine.model.checkpoint import load_checkpoint

    db = RunDB(db_path)
    a, b = (load_checkpoint(db.latest_checkpoint(i)["path"]) for i in (full.run_id, part.run_id))
    assert a["step"] == b["step"] == 12 and sorted(a["masks"]) == sorted(b["masks"])
    assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])  # the same connections grew
    assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
               for k in a["optimizer"]["state"])


@needs_shared_data()
def test_the_sparse_core_keeps_working_after_updates(cli):
    from engine.model.kernels import kernel_available

    if not kernel_available():
        pytest.skip("sparse matmul core unavailable on this machine")
    curves = {}
    for kernel in ("dense", "sparse"):
        r = cli("train", "demo", *tiny(CORPUS, "sparsity.method=set", "sparsity.update_every=2", "train.max_steps=6",
                                       f"sparsity.kernel={kernel}", "train.precision=fp32"))
        assert r.rc == 0, r.stderr
        curves[kernel] = [m["metrics"]["loss"] for m in r.of_type("metrics") if "loss" in m["metrics"]]
    assert curves["sparse"] == pytest.approx(curves["dense"], rel=1e-4)


@pytest.mark.quick
def test_set_growth_is_a_function_of_seed_step_and_layer():
    """What makes a resumed SET run grow exactly what the uninterrupted one grew: no hidden RNG state."""
    from engine.core.config import ModelConfig
    from engine.model.gpt import GPT
    from engine.train.dynamic_sparsity import MaskSchedule

    class Quiet:
        def info(self, _message):
            pass

    cfg = RunConfig().replace({"sparsity.method": "set", "sparsity.update_every": 1, "train.max_steps": 8})
    masks = []
    for i in range(2):
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, n_ctx=8), 50)
        sched = MaskSchedule(Quiet(), model, cfg)
        sched.init_masks(cfg.train.seed)
        torch.rand(1000 * (i + 1))  # the global RNG moves differently in the two runs: growth must not care
        assert sched.after_step(3)
        masks.append({n: m.mask.clone() for n, m in model.sparse_layers().items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert sched.pending["mask_churn"] == pytest.approx(sched.schedule.drop_fraction(3), abs=0.02)


@pytest.mark.quick
@pytest.mark.parametrize("sets,key", [
    (("sparsity.method='magnitude'",), "sparsity.method"),
    (("sparsity.start_step=50", "sparsity.end_step=20"), "sparsity.end_step"),
    (("sparsity.update_every=0",), "sparsity.update_every"),
    (("sparsity.drop_fraction=0",), "sparsity.drop_fraction"),
    (("sparsity.drop_fraction=1.0",), "sparsity.drop_fraction"),
    (("sparsity.method='gmp'", "sparsity.initial=0.9", "sparsity.level=0.75"), "sparsity.initial"),
    (("sparsity.method='rigl'", "sparsity.start_step=280", "train.max_steps=300"), "sparsity.start_step"),
    (("sparsity.method='set'", "train.nproc=2"), "sparsity.method"),
])
def test_bad_dynamic_sparsity_settings_exit_2_naming_the_key(tmp_path, capsys, sets, key):
    from engine.cli import main

    db = tmp_path / "runs.db"
    assert main(["train", "demo", *tiny(*sets), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], err
    assert RunDB(db).list_runs() == []


@pytest.mark.quick
def test_the_form_previews_the_planned_schedule_before_launch(qtbot, tmp_path):
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from studio.views.main_window import KEEP, MainWindow

    win = MainWindow(tmp_path / "runs.db", tmp_path / "runs", attach=False)
    win.estimate.auto.setChecked(False)
    win.close_policy = KEEP
    qtbot.addWidget(win)
    for key, value in {"sparsity.method": "gmp", "sparsity.level": 0.9, "sparsity.initial": 0.0,
                       "sparsity.distribution": "erk", "sparsity.update_every": 50, "train.max_steps": 300}.items():
        win.form.set_field(key, value)
    plan = win.schedule.plan
    assert win.schedule.isVisibleTo(win) or not win.isVisible()
    assert plan["updates"] == [50, 100, 150, 200, 225]  # end_step: 75 % of 300, where GMP reaches the level
    assert plan["sparsity"][0] == 0.0 and plan["sparsity"][-1] == pytest.approx(0.9, abs=1e-4)
    sched = Schedule.from_config(win.form.config)
    assert plan["sparsity"][101] == pytest.approx(sched.gmp_sparsity(100), abs=1e-4)  # step 102 trains at step 100's
    assert plan["groups"]["attention"][-1] != pytest.approx(plan["groups"]["mlp"][-1], abs=1e-3)  # ERK differs
    assert plan["flops_per_token"][0] > plan["flops_per_token"][-1]  # GMP's early steps are denser
    assert "5 mask updates" in win.schedule.note.text()
    win.form.set_field("sparsity.method", "rigl")
    rigl = win.schedule.plan
    spikes = [i + 1 for i, (a, b) in enumerate(zip(rigl["flops_per_token"], rigl["flops_per_token"][1:]))
              if b < a]
    assert spikes == rigl["updates"] == [50, 100, 150, 200]  # the dense gradient costs on update steps only
    win.close()


@pytest.mark.quick
def test_the_live_monitor_plots_mask_churn_and_a_changing_layer_heatmap(qtbot):
    from engine.core.events import make_event
    from studio.views.live_monitor import LiveMonitor

    m = LiveMonitor()
    qtbot.addWidget(m)
    m.resize(900, 600)
    m.show()
    for step in range(1, 41):
        metrics = {"loss": 5.0 - step * 0.01}
        if step % 10 == 0:  # a GMP update: churn, and each layer pruned further
            metrics.update({"mask_churn": 0.5 / step * 10, "sparsity": step / 50,
                            "sparsity/blocks.0.attn.q": step / 60, "sparsity/blocks.0.mlp.fc": step / 45})
        m.data.add_event(make_event("metrics", run_id="r", step=step, tokens=step * 64, wall_time=step * 0.1,
                                    flops=step * 1e9, flops_dense=step * 2e9, metrics=metrics))
    m.redraw(force=True)
    x, y = m.curve_points("mask_churn")
    assert list(x) == [10, 20, 30, 40] and list(y) == pytest.approx([0.5, 0.25, 0.5 / 3, 0.125])
    img, layers, _ = m.data.heatmap()
    assert layers == ["blocks.0.attn.q", "blocks.0.mlp.fc"] and float(img.max()) > float(img[img > 0].min())
