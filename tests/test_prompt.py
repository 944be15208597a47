"""Soft prompting: the model stays frozen, only the prompt trains, only the prompt is saved."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHARED_DATA, CliResult, engine_env, sets

from engine.core.config import load_config, parse_overrides
from engine.core.events import EventWriter
from engine.core.paths import resolve_preset
from engine.store.rundb import RunDB
from engine.model.checkpoint import load_checkpoint
from engine.model.runs import check_parent
from engine.model.soft_prompt import load_prompt
from engine.train.child import child_config
from engine.train.identity import RunIdentity
from engine.train.prompt import PromptStage
from engine.train.reporter import RunReporter
from engine.train.runtime import start_runtime
from engine.train.step import train_step

PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
pytestmark = pytest.mark.skipif(not (PQA.is_file() and VALID.is_file()), reason=f"shared data missing under {SHARED_DATA}")

PARENT = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=128", "tokenizer.vocab_size=400",
          f"data.corpus={VALID}", "train.max_steps=4", "train.batch_size=4", "train.eval_every=4",
          "train.eval_batches=1", "train.threads=1", "sparsity.kernel=dense"]
QUICK = [f"task.train={PQA}", "task.fold=0", "train.max_steps=4", "train.batch_size=4", "train.eval_every=2",
         "train.checkpoint_every=2", "train.threads=1", "task.max_examples=12", "prompt.n_tokens=8", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt")
    db = tmp / "runs.db"

    def cli(*args: str) -> CliResult:
        cmd = [sys.executable, "-m", "engine", *args, "--db", str(db)]
        return CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=engine_env(tmp)))

    r = cli("train", "demo", *sets(*PARENT))
    assert r.rc == 0, r.stderr
    return {"db": db, "parent": r.run_id, "cli": cli, "tmp": tmp}


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.quick
def test_only_the_prompt_trains(env, tmp_path):
    db = RunDB(env["db"])
    cfg = load_config(resolve_preset("prompt-pubmedqa"), parse_overrides(
        [f"parent={env['parent']}", *QUICK, "prompt.init=text", "prompt.init_text=yes no maybe"]))
    parent = check_parent(db, cfg)
    cfg = child_config(cfg, parent, explicit=set())
    report = RunReporter(db, EventWriter(io.StringIO()), cfg, tmp_path / "runs")
    stage = PromptStage()
    report.start(cfg.train.max_steps)
    stage.build(RunIdentity(report.run_id, report.run_dir, cfg, parent), report, start_runtime(cfg.train), None)
    opt = stage.make_optimizer()
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    # init from text: the prompt starts as the embeddings of the text's tokens, repeated to n_tokens
    ids = stage.child.tok.encode("yes no maybe", add_special_tokens=False).ids
    assert torch.equal(stage.prompt.weight.data, stage.model.wte.weight.data[[ids[i % len(ids)] for i in range(8)]])
    p0 = stage.prompt.weight.detach().clone()
    assert [p for g in opt.param_groups for p in g["params"]] == [stage.prompt.weight]
    for _ in range(2):
        r = train_step(opt, stage.micro_batch, cfg.train.grad_accum, cfg.train.grad_clip)
    assert all(torch.equal(before[k], v) for k, v in stage.model.state_dict().items()), "a model weight changed"
    assert all(p.grad is None and not p.requires_grad for p in stage.model.parameters())
    assert not torch.equal(p0, stage.prompt.weight.detach()), "the prompt did not train"
    # prompting counts forward + activation-gradient backward (2x forward), below fine-tuning's 3x
    assert r.flops > 0 and stage.child.train_factor == 2.0
    # the frozen 75 %-sparse parent's forward is counted on its nonzeros
    assert 0 < r.flops < r.flops_dense
    report.close()


def test_prompt_run_saves_only_the_prompt_and_eval_uses_parent_plus_prompt(env, tmp_path):
    cli, db = env["cli"], RunDB(env["db"])
    parent_ck = db.latest_checkpoint(env["parent"])["path"]
    digest = sha(parent_ck)
    r = cli("train", "prompt-pubmedqa", *sets(f"parent={env['parent']}", *QUICK))
    assert r.rc == 0, r.stderr
    assert sha(parent_ck) == digest, "the parent checkpoint must not change"
    run = db.get_run(r.run_id)
    assert run["stage"] == "prompt" and run["parent_id"] == env["parent"]
    ck = load_checkpoint(db.latest_checkpoint(r.run_id)["path"])
    assert "model" not in ck and ck["prompt"].shape == (8, 32) and ck["parent_checkpoint"] == parent_ck

    (art,) = db.artifacts(r.run_id, "prompt")
    assert Path(art["path"]).stat().st_size < 10_000
    vec, meta = load_prompt(art["path"])
    assert torch.equal(vec, ck["prompt"]) and meta["parent_run"] == env["parent"]
    near = art["meta"]["nearest_tokens"]
    assert len(near) == 8 and all(len(row) == 5 and row[0]["cos"] >= row[-1]["cos"] for row in near)
    # the nearest token by cosine, recomputed by hand for the first vector
    wte = load_checkpoint(parent_ck)["model"]["wte.weight"]
    cos = torch.nn.functional.cosine_similarity(vec[0:1], wte, dim=-1)
    assert near[0][0]["id"] == int(cos.argmax())

    final = db.evaluations(r.run_id)[-1]
    assert final["split"] == "dev" and "accuracy" in final["metrics"] and "accuracy" in final["baselines"]["zero_shot"]
    assert run["summary"]["flops"] > 0

    data = tmp_path / "pqa_copy.json"
    data.write_text(PQA.read_text())
    ev = cli("eval", r.run_id, "--task", "pubmedqa", "--data", str(data), "--limit", "6", "--json")
    assert ev.rc == 0, ev.stderr
    out = json.loads(ev.stdout)
    base = cli("eval", env["parent"], "--task", "pubmedqa", "--data", str(data), "--limit", "6", "--json", "--no-baselines")
    plain = json.loads(base.stdout)
    # zero-shot of the prompt run = its parent without the prompt; the prompt changes the scores
    assert out["baselines"]["zero_shot"]["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert out["loss"] != pytest.approx(plain["loss"], rel=1e-6)

    # a prompt run is no parent for fine-tuning; the prompt must leave room (a classifier head is allowed:
    # tests/test_prompt_head.py)
    for args in ([f"parent={r.run_id}"], [f"parent={env['parent']}", "prompt.n_tokens=120"]):
        preset = "finetune-pubmedqa" if args[0] == f"parent={r.run_id}" else "prompt-pubmedqa"
        bad = cli("train", preset, *sets(*QUICK, *args))
        assert bad.rc == 2 and bad.stderr.startswith("mediswift: error:"), bad.stderr
