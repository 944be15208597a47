"""sparsity.kernel = "auto": the choice is made for the run's precision, a dense candidate that would
not fit in memory is never tried, and the choice kept is never slower than the measured dense step."""
from __future__ import annotations

import json

import pytest
import torch

from engine.core.config import from_dict
from engine.model.gpt import GPT
from engine.model.kernels import ops
from engine.model.sparsity import apply_sparsity
from engine.train.kernel_choice import KernelTrial, choose_kernels, dense_path_bytes
from helpers import tiny


CFG = from_dict({"sparsity": {"kernel": "auto"}})


class Reporter:
    """What the kernel choice reports (engine.train.reporter): meta and log lines."""

    def __init__(self):
        self.meta_items, self.lines = {}, []

    def meta(self, **kw):
        self.meta_items.update(kw)

    def info(self, msg):
        self.lines.append(msg)

    warn = info


def _model(level=0.75):
    torch.manual_seed(0)
    m = GPT(from_dict({"model": {"n_layer": 1, "n_head": 2, "d_model": 64, "n_ctx": 16}}).model, 100)
    apply_sparsity(m, level, "uniform", 0)
    return m


@pytest.mark.quick
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_times_each_shape_in_the_runs_precision(monkeypatch, precision):
    seen = []

    def fake_time(pattern, n_tokens, repeats=5, precision="fp32"):
        seen.append(precision)
        return {"dense_ms": 2.0, "sparse_ms": 1.0}

    monkeypatch.setattr(ops, "time_kernels", fake_time)
    r, model = Reporter(), _model()
    choice = choose_kernels(r, CFG, model, 64, torch.device("cpu"), precision)
    assert set(choice.values()) == {"sparse"} and seen and set(seen) == {precision}
    assert r.meta_items["kernel_precision"] == precision and len(seen) == len(r.meta_items["kernel_timings"])  # once per shape


@pytest.mark.quick
def test_a_dense_candidate_that_would_not_fit_is_never_tried(monkeypatch):
    def no_trial(*a, **k):
        raise AssertionError("the dense candidate was timed")

    monkeypatch.setattr(ops, "time_kernels", no_trial)
    r, model = Reporter(), _model()
    layers = {n: m for n, m in model.sparse_layers().items() if m.is_sparse}
    need = dense_path_bytes(layers, "bf16")
    assert need > 6 * sum(m.out_features * m.in_features for m in layers.values()) - 1
    choice = choose_kernels(r, CFG, model, 64, torch.device("cpu"), "bf16", available=need)  # 80 % of it is free
    assert set(choice.values()) == {"sparse"}
    assert "without a dense trial" in r.meta_items["kernel_dense_skipped"]
    assert all(m.kernel == "sparse" for m in layers.values())
    # with room to spare the same model is timed
    monkeypatch.setattr(ops, "time_kernels", lambda *a, **k: {"dense_ms": 1.0, "sparse_ms": 2.0})
    assert set(choose_kernels(Reporter(), CFG, model, 64, torch.device("cpu"), "bf16", available=1 << 40).values()) == {"dense"}


@pytest.mark.quick
@pytest.mark.parametrize("mix_s, dense_s, kept", [(0.5, 1.0, "sparse"), (1.2, 1.0, "dense")])
def test_the_whole_step_trial_keeps_the_faster_and_records_both(mix_s, dense_s, kept):
    r, model = Reporter(), _model()
    mix = {n: "sparse" for n, m in model.sparse_layers().items() if m.is_sparse}
    for n in mix:  # the trial's steps built both paths of every layer
        layer = model.sparse_layers()[n]
        layer.pattern()
        layer._dense_weight()
    trial = KernelTrial(r, model, mix)
    while not trial.done:
        trial.before_step()
        trial.after_step(mix_s if trial.current == "mix" else dense_s)
    assert set(trial.kernels.values()) == {kept}
    t = r.meta_items["kernel_trial"]
    assert (t["mix_step_s"], t["dense_step_s"]) == (mix_s, dense_s)
    assert all(m.kernel == kept for n, m in model.sparse_layers().items() if n in mix)
    for n in mix:  # the path not kept holds nothing any more
        layer = model.sparse_layers()[n]
        assert (layer._dense is None) == (kept == "sparse") and (layer._pattern is None) == (kept == "dense")


def test_a_real_auto_run_never_keeps_a_choice_slower_than_its_dense_step(cli):
    r = cli("train", "demo", *tiny("model.d_model=128", "model.n_head=4", "model.n_ctx=64", "train.batch_size=8",
                                   "train.max_steps=8", "train.eval_every=8", "train.checkpoint_every=8"))
    assert r.rc == 0, r.stderr
    meta = json.loads(cli("runs", "show", r.run_id, "--json").stdout)["meta"]
    assert meta["kernel_precision"] in ("fp32", "bf16") and meta["kernel_timings"]
    trial = meta.get("kernel_trial")
    if trial:  # some shape timed faster on the sparse core: the whole-step trial decided
        kept_sparse = "sparse" in meta["kernels"].values()
        chosen = trial["mix_step_s"] if kept_sparse else trial["dense_step_s"]
        assert chosen <= trial["dense_step_s"]
        assert chosen == min(trial["mix_step_s"], trial["dense_step_s"])
    else:
        assert set(meta["kernels"].values()) == {"dense"}
