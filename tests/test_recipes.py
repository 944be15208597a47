"""Fine-tuning recipes: epochs, early stopping with the best checkpoint kept and used by eval and
export-hf, layer-wise learning-rate decay, the random-init control, and the task data checked before
a run exists. Real HoC and PubMedQA files, the real CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, sets
from test_finetune import Env, main_inproc, parent_env

from engine.core import registry
from engine.core.config import ModelConfig, RunConfig, TrainConfig, load_config
from engine.core.errors import InputError
from engine.model.checkpoint import load_checkpoint
from engine.model.gpt import GPT
from engine.store.rundb import RunDB
from engine.train.cadence import BestKeeper
from engine.train.optim import gpt_depth, make_optimizer
from engine.train.reporter import retain

PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
HOC = SHARED_DATA / "hoc"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
needs_data = pytest.mark.skipif(not (PQA.is_file() and VALID.is_file() and HOC.is_dir()),
                                reason=f"shared data missing under {SHARED_DATA}")

# by epochs: no train.max_steps here (given with --set it would turn the preset's epochs off)
EPOCHS = ["train.batch_size=4", "train.threads=1", "train.warmup_steps=1", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return parent_env(tmp_path_factory.mktemp("recipes"))


def pqa(env: Env, *extra: str) -> list[str]:
    return sets(f"parent={env.parent}", f"task.train={PQA}", "task.fold=0", *EPOCHS, *extra)


# -- units -----------------------------------------------------------------------------------------


@pytest.mark.quick
def test_layer_decay_scales_each_depth_and_is_off_at_one():
    cfg = ModelConfig(n_layer=3, n_head=2, d_model=16, n_ctx=16)
    model, head = GPT(cfg, 50), torch.nn.Linear(16, 4)
    named = list(model.named_parameters()) + list(head.named_parameters())
    tc = TrainConfig(lr=1e-3, layer_decay=0.5)
    opt = make_optimizer(named, tc, depth=gpt_depth(3), n_depths=5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    expect = {"wte.weight": 1e-3 * 0.5 ** 4, "wpe.weight": 1e-3 * 0.5 ** 4,
              "blocks.0.attn.q.weight": 1e-3 * 0.5 ** 3, "blocks.2.mlp.fc.bias": 1e-3 * 0.5 ** 1}
    params = dict(model.named_parameters())
    for name, lr in expect.items():
        assert lr_of[id(params[name])] == pytest.approx(lr), name
    assert lr_of[id(head.weight)] == pytest.approx(1e-3) and lr_of[id(params["ln_f.weight"])] == pytest.approx(1e-3)
    # weight decay still only on matrices
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(params["blocks.1.attn.q.weight"])] == tc.weight_decay and wd[id(params["blocks.1.ln1.weight"])] == 0.0
    # the warm-up + cosine schedule scales every group alike
    from engine.train.optim import make_scheduler
    sched = make_scheduler(opt, TrainConfig(lr=1e-3, layer_decay=0.5, warmup_steps=2, max_steps=10))
    ratios = [g["lr"] / g["initial_lr"] for g in opt.param_groups]
    assert all(r == pytest.approx(ratios[0]) for r in ratios) and sched is not None

    plain = make_optimizer(named, TrainConfig(lr=1e-3), depth=gpt_depth(3), n_depths=5)
    assert len(plain.param_groups) == 2 and all(g["lr"] == 1e-3 and "lr_scale" not in g for g in plain.param_groups)


@pytest.mark.quick
def test_best_keeper_ties_patience_and_state():
    b = BestKeeper(enabled=True, patience=2)
    assert b.observe(3, ("accuracy", 0.5, False)) and b.best_step == 3
    assert not b.observe(6, ("accuracy", 0.5, False))  # a tie is no improvement
    assert not b.should_stop()
    assert b.observe(9, ("accuracy", 0.6, False)) and b.since_best == 0
    assert not b.observe(12, ("accuracy", 0.4, False)) and not b.observe(15, ("accuracy", float("nan"), False))
    assert b.should_stop() and b.best_step == 9
    again = BestKeeper(enabled=True, patience=2)
    again.load_state(json.loads(json.dumps(b.state())))
    assert again.state() == b.state() and again.should_stop()
    loss = BestKeeper(enabled=True)
    assert loss.observe(1, ("loss", 2.0, True)) and loss.observe(2, ("loss", 1.0, True)) and not loss.should_stop()
    assert not BestKeeper().observe(1, ("loss", 1.0, True))  # off: nothing is tracked


@pytest.mark.parametrize("key, value, stage", [("train.epochs", 2, registry.PRETRAIN),
                                               ("train.early_stopping_patience", 1, registry.PRETRAIN),
                                               ("train.layer_decay", 0.8, registry.PROMPT),
                                               ("train.init", "random", registry.PRETRAIN),
                                               ("train.layer_decay", 0.0, registry.FINETUNE),
                                               ("train.init", "zeros", registry.FINETUNE)])
@pytest.mark.quick
def test_recipe_keys_are_refused_where_they_mean_nothing(key, value, stage):
    with pytest.raises(InputError) as e:
        load_config(None, {"stage": stage, "parent": "abc", key: value})
    assert e.value.key == key
    ok = load_config(None, {"stage": registry.FINETUNE, "parent": "abc", "train.epochs": 3,
                            "train.early_stopping_patience": 2, "train.layer_decay": 0.8, "train.init": "random"})
    assert ok.train.epochs == 3 and RunConfig().train.epochs == 0 and RunConfig().train.init == "parent"


@pytest.mark.quick
def test_retention_keeps_the_best_evaluations_checkpoint(tmp_path):
    db = RunDB(tmp_path / "r.db")
    run = db.create_run(name="ft", stage=registry.FINETUNE, config={}, run_dir=str(tmp_path))
    for step in (2, 4, 6, 8):
        f = tmp_path / f"ck{step}"
        f.write_bytes(b"x")
        # the lowest dev loss is at step 4; the best headline metric at step 2
        db.add_evaluation(run, step, registry.PUBMEDQA, "dev", {"loss": 1.0 if step == 4 else 2.0})
        db.add_checkpoint(run, step, 0, str(f), 1, step == 8)
        retain(db, run, 1, tmp_path, best_step=2)
    assert [c["step"] for c in db.checkpoints(run)] == [2, 8]
    assert (tmp_path / "ck2").is_file() and not (tmp_path / "ck4").exists()


# -- end to end ------------------------------------------------------------------------------------


@needs_data
def test_epochs_count_steps_and_evaluate_every_epoch(env):
    # 10 examples, 4 per step: ceil(10 / 4) = 3 steps an epoch, 2 epochs = 6 steps
    r = env.cli("train", "finetune-pubmedqa", *pqa(env, "task.max_examples=10", "train.epochs=2",
                                                   "train.early_stopping_patience=0"))
    assert r.rc == 0, r.stderr
    assert r.of_type("run_started")[0]["max_steps"] == 6
    db = RunDB(env.db)
    run = db.get_run(r.run_id)
    tc = run["config"]["train"]
    assert (tc["epochs"], tc["max_steps"], tc["eval_every"]) == (2, 6, 3)
    assert run["meta"]["epochs"] == {"epochs": 2, "steps_per_epoch": 3, "max_steps": 6}
    assert [m["step"] for m in db.metrics(r.run_id, names=["loss"])] == list(range(1, 7))
    evals = db.evaluations(r.run_id)
    assert [e["step"] for e in evals] == [3, 6]
    # by epochs, the best evaluation is kept: the first with the highest dev accuracy
    acc = [e["metrics"]["accuracy"] for e in evals]
    best = evals[acc.index(max(acc))]["step"]
    assert run["meta"]["best_checkpoint"]["step"] == best == run["summary"]["best_step"]
    assert best in [c["step"] for c in db.checkpoints(r.run_id)]
    assert run["status"] == "completed" and "stopped_early" not in run["summary"]


@needs_data
def test_early_stopping_keeps_the_best_epoch_and_eval_and_export_use_it(env, tmp_path):
    # a learning rate too small to change a prediction: the dev accuracy stays where it is, so the first
    # epoch stays the best (a tie is no improvement) and patience 1 stops the run after the second
    r = env.cli("train", "finetune-pubmedqa", *pqa(env, "task.max_examples=8", "train.epochs=5",
                                                   "train.early_stopping_patience=1", "train.lr=1e-9",
                                                   "train.weight_decay=0", "train.keep_checkpoints=1"))
    assert r.rc == 0, r.stderr
    db = RunDB(env.db)
    run = db.get_run(r.run_id)
    assert run["config"]["train"]["max_steps"] == 10  # 5 epochs of 2 steps, of which 2 ran
    assert [e["step"] for e in db.evaluations(r.run_id)] == [2, 4]
    assert run["status"] == "completed" and run["summary"]["step"] == 4 and run["summary"]["stopped_early"] is True
    assert any("early stopping at step 4" in e["message"] for e in r.of_type("log"))
    assert run["meta"]["best_checkpoint"]["step"] == 2 and run["meta"]["best_checkpoint"]["metric"] == "accuracy"
    # keep_checkpoints = 1 keeps the newest (the final one) and the best, nothing else
    assert [c["step"] for c in db.checkpoints(r.run_id)] == [2, 4]
    assert load_checkpoint(db.checkpoints(r.run_id)[0]["path"])["best_eval"]["best_step"] == 2

    ev = env.cli("eval", r.run_id, "--task", "pubmedqa", "--data", str(PQA), "--split", "dev", "--fold", "0",
                 "--limit", "4", "--no-baselines", "--json")
    assert ev.rc == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert out["step"] == 2
    assert [e["step"] for e in RunDB(env.db).evaluations(r.run_id) if e["id"] == out["evaluation_id"]] == [2]

    hf = env.cli("export-hf", r.run_id, "--out", str(tmp_path / "hf"))
    assert hf.rc == 0, hf.stderr
    assert "Exported from checkpoint step 2 " in (tmp_path / "hf" / "README.md").read_text()


@needs_data
def test_a_prompt_run_publishes_its_best_evaluations_prompt(env):
    from engine.model.soft_prompt import TENSOR
    from engine.store.rundb import PROMPT_ARTIFACT
    from safetensors.torch import load_file

    r = env.cli("train", "prompt-pubmedqa", *pqa(env, "task.max_examples=8", "train.epochs=3", "prompt.n_tokens=8",
                                                 "train.early_stopping_patience=1", "prompt.lr=1e-3"))
    assert r.rc == 0, r.stderr
    db = RunDB(env.db)
    run = db.get_run(r.run_id)
    best = run["meta"]["best_checkpoint"]["step"]
    last = run["summary"]["step"]
    steps = {c["step"]: c["path"] for c in db.checkpoints(r.run_id)}
    assert best in steps and last in steps
    (art,) = db.artifacts(r.run_id, PROMPT_ARTIFACT)
    assert art["meta"]["step"] == best
    published = next(iter(load_file(art["path"]).values()))
    assert torch.equal(published, load_checkpoint(steps[best])[TENSOR])
    if best != last:  # the final prompt moved on (lr 1e-3): the published one is not it
        assert not torch.equal(published, load_checkpoint(steps[last])[TENSOR])


@needs_data
def test_random_init_keeps_shape_and_tokenizer_with_fresh_weights(env):
    r = env.cli("train", "finetune-pubmedqa", *pqa(env, "task.max_examples=8", "train.init=random",
                                                   "train.max_steps=1", "train.lr=1e-9", "train.weight_decay=0"))
    assert r.rc == 0, r.stderr
    db = RunDB(env.db)
    run, parent = db.get_run(r.run_id), db.get_run(env.parent)
    assert run["config"]["train"]["init"] == "random" and run["meta"]["init"] == "random"
    assert run["config"]["train"]["epochs"] == 0  # the --set max_steps turned the preset's epochs off
    assert (Path(run["run_dir"]) / "tokenizer.json").read_bytes() == (Path(parent["run_dir"]) / "tokenizer.json").read_bytes()
    ck = load_checkpoint(db.latest_checkpoint(r.run_id)["path"])
    pck = load_checkpoint(db.latest_checkpoint(env.parent)["path"])
    assert ck["vocab_size"] == pck["vocab_size"] and ck["masks"] == {}
    assert set(ck["model"]) == set(pck["model"])
    matrices = [k for k, v in pck["model"].items() if v.dim() == 2]
    assert matrices
    for k in matrices:
        assert ck["model"][k].shape == pck["model"][k].shape
        assert not torch.allclose(ck["model"][k], pck["model"][k], atol=1e-3), k
    # fresh weights drawn from train.seed: what GPT draws after the seed (one step at lr 1e-9 moved nothing)
    torch.manual_seed(run["config"]["train"]["seed"])
    fresh = GPT(ModelConfig(**run["config"]["model"]), ck["vocab_size"]).state_dict()
    for k in matrices:
        assert torch.allclose(ck["model"][k], fresh[k], atol=1e-6), k


# -- bad input before a run exists -----------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("case", ["hoc_label", "pqa_class", "hoc_empty_dev", "pqa_empty_dev", "hoc_empty_train",
                                  "epochs_and_steps", "epochs_on_lm"])
def test_bad_task_data_exits_2_before_a_run_exists(env, case, tmp_path, capsys):
    hoc_train, hoc_dev = HOC / "train.jsonl", HOC / "dev.jsonl"
    preset, extra, expect = "finetune-hoc", [], ""
    if case == "hoc_label":  # the training file without any abstract of one hallmark the dev file has
        from engine.tasks import hoc
        gone = next(c for c in hoc.CLASSES if any(c in [" ".join(x.lower().split()) for x in json.loads(line)["labels"]]
                                                  for line in hoc_dev.read_text().splitlines() if line.strip()))
        kept = [line for line in hoc_train.read_text().splitlines()
                if line.strip() and gone not in [" ".join(x.lower().split()) for x in json.loads(line)["labels"]]]
        hoc_train = tmp_path / "train.jsonl"
        hoc_train.write_text("\n".join(kept) + "\n")
        expect = repr(gone)
    elif case == "hoc_empty_dev":
        hoc_dev = tmp_path / "dev.jsonl"
        hoc_dev.write_text("")
        expect = "dev.jsonl"
    elif case == "hoc_empty_train":
        hoc_train = tmp_path / "train.jsonl"
        hoc_train.write_text("")
        expect = "train.jsonl"
    args = [f"parent={env.parent}", f"task.train={hoc_train}", f"task.dev={hoc_dev}"]
    if case in ("pqa_class", "pqa_empty_dev", "epochs_and_steps", "epochs_on_lm"):
        preset, args = "finetune-pubmedqa", [f"parent={env.parent}", f"task.train={PQA}"]
    if case == "pqa_class":  # no "maybe" to train on (and no split file beside it), the real file as dev
        data = {k: v for k, v in json.loads(PQA.read_text()).items() if v["final_decision"] != "maybe"}
        (tmp_path / "no_maybe.json").write_text(json.dumps(data))
        args = [f"parent={env.parent}", f"task.train={tmp_path / 'no_maybe.json'}", f"task.dev={PQA}"]
        expect = "'maybe'"
    elif case == "pqa_empty_dev":
        (tmp_path / "empty.json").write_text("{}")
        args.append(f"task.dev={tmp_path / 'empty.json'}")
        expect = "empty.json"
    elif case == "epochs_and_steps":
        extra, expect = ["train.epochs=2", "train.max_steps=5"], "not both"
    elif case == "epochs_on_lm":
        extra, expect = ["task.name=lm", f"data.corpus={VALID}"], "train.epochs"
    before = len(RunDB(env.db).list_runs())
    rc, events, err = main_inproc(env, capsys, "train", preset, *sets(*args, *EPOCHS, *extra))
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mediswift: error:") and expect in lines[0], err
    assert [e for e in events if e["type"] == "error"]
    assert len(RunDB(env.db).list_runs()) == before, "bad input must not leave a run behind"
