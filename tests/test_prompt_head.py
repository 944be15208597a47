"""Soft prompting with a classification head (task.head = "classifier"): only the prompt and the head
train, the head pools the text tokens behind the prompt, its FLOPs are counted apart from the frozen
parent's, and everything that handles a prompt run handles its head: checkpoints and resume, the best
evaluation's checkpoint, `eval` (the prompt run's own head, never its parent's), `inspect` and
`export-hf`. A tiny parent trained here, small slices of the real HoC and PubMedQA files, the real CLI (its
``main`` in this process, no interpreter start-up and torch import each; a subprocess resumes a run)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from helpers import hoc_slices, SHARED_DATA, cli_inproc, sets
from test_finetune import PARENT, Env

from engine.core.config import load_config, parse_overrides
from engine.core.events import EventWriter
from engine.core.flops import FlopModel
from engine.core.paths import resolve_preset
from engine.model.checkpoint import load_checkpoint
from engine.model.runs import check_parent, load_run
from engine.model.soft_prompt import TENSOR
from engine.store.rundb import PROMPT_ARTIFACT, RunDB
from engine.tasks import hoc
from engine.tasks.base import collate_windows
from engine.train.child import child_config
from engine.train.identity import RunIdentity
from engine.train.prompt import PromptStage
from engine.train.reporter import RunReporter
from engine.train.runtime import start_runtime
from engine.train.step import train_step

HOC = SHARED_DATA / "hoc"
PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
SPLITS = SHARED_DATA / "pubmedqa" / "pqal_splits.json"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
pytestmark = pytest.mark.skipif(not (HOC.is_dir() and PQA.is_file() and SPLITS.is_file() and VALID.is_file()),
                                reason=f"shared data missing under {SHARED_DATA}")

N_TRAIN, N_DEV = 12, 6
PQA_TRAIN, PQA_DEV = 16, 8
COMMON = ["train.batch_size=4", "train.threads=1", "train.log_every=1", "prompt.n_tokens=8", "task.head=classifier",
          "train.precision=fp32"]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    """The tiny 75 %-sparse parent of tests/test_finetune.py (n_ctx 128: HoC abstracts are read in several
    windows behind an 8-token prompt); slices of HoC (dev abstracts whose hallmarks all occur in the
    training slice) and of PubMedQA fold 0 (a split file beside the slice of pqal_trainval.json)."""
    e = Env(tmp_path_factory.mktemp("prompt_head"))
    r = cli_inproc(e.tmp, e.db, "train", "demo", *sets(*PARENT, "name=parent"))
    assert r.rc == 0, r.stderr
    e.parent = r.run_id
    e.train, e.dev = hoc_slices(e.tmp, N_TRAIN, N_DEV, prefix='hoc_')

    data = json.loads(PQA.read_text())
    fold0 = next(f for f in json.loads(SPLITS.read_text())["folds"] if f.get("fold", 0) == 0)
    tr, dv = [str(i) for i in fold0["train"][:PQA_TRAIN]], [str(i) for i in fold0["dev"][:PQA_DEV]]
    assert {data[i]["final_decision"] for i in dv} <= {data[i]["final_decision"] for i in tr}
    (e.tmp / "pqa").mkdir()
    e.pqa = e.tmp / "pqa" / "pqal_trainval.json"
    e.pqa.write_text(json.dumps({i: data[i] for i in tr + dv}))
    (e.tmp / "pqa" / "pqal_splits.json").write_text(json.dumps({"folds": [{"fold": 0, "train": tr, "dev": dv}]}))
    return e


def hoc_args(env: Env, parent: str, *extra: str) -> list[str]:
    return sets(f"parent={parent}", "task.name=hoc", f"task.train={env.train}", f"task.dev={env.dev}", *COMMON, *extra)


# -- in process: what trains, what the head pools, the FLOPs ---------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_only_the_prompt_and_the_head_train_on_text_tokens(env, tmp_path, pooling):
    db = RunDB(env.db)
    cfg = load_config(resolve_preset("prompt-pubmedqa"), parse_overrides(
        [f"parent={env.parent}", "task.name=hoc", f"task.train={env.train}", f"task.dev={env.dev}", *COMMON,
         f"task.pooling={pooling}", "train.max_steps=2", "train.warmup_steps=0", "train.lr=0.01", "prompt.lr=0.3"]))
    parent = check_parent(db, cfg)
    cfg = child_config(cfg, parent, explicit=set())
    report = RunReporter(db, EventWriter(io.StringIO()), cfg, tmp_path / "runs")
    report.start(cfg.train.max_steps)
    stage = PromptStage()
    stage.build(RunIdentity(report.run_id, report.run_dir, cfg, parent), report, start_runtime(cfg.train), None)
    opt = stage.make_optimizer()
    head, prompt, model = stage.head, stage.prompt, stage.model
    assert head is not None and head.pooling == pooling and set(stage.trained_modules()) == {"prompt", "head"}
    # the prompt at prompt.lr without decay; the head at train.lr, decay on its matrices only
    groups = [(g["lr"], g["weight_decay"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    assert groups[0] == (0.3, 0.0, {id(prompt.weight)})
    matrices = {id(p) for p in head.parameters() if p.dim() == 2}
    vectors = {id(p) for p in head.parameters() if p.dim() < 2}
    assert groups[1:] == [(0.01, cfg.train.weight_decay, matrices), (0.01, 0.0, vectors)]
    assert report.db.get_run(report.run_id)["meta"]["trainable_params"] == \
        prompt.weight.numel() + sum(p.numel() for p in head.parameters())

    # the head pools the text tokens only: the hidden states behind the prompt, the prompt's positions dropped
    feed = stage.child.feed
    windows = [feed.windows[0], feed.windows[1]]
    x, lengths, group = collate_windows(windows, feed.data.enc.pad)
    assert x.shape[1] <= cfg.model.n_ctx - cfg.prompt.n_tokens and len(windows[0]) > 1  # read in windows
    with torch.no_grad():
        got = stage.child.scorer.head_logits(x, lengths, group, 2)
        want = []
        for ws in windows:
            pooled = []
            for w in ws:
                h = model.hidden(torch.tensor([w]), prompt(1))[0]          # [P + T, C]
                text = h[cfg.prompt.n_tokens:]
                if pooling == "mean":
                    pooled.append(text.mean(0))
                else:
                    a = torch.softmax(text @ head.attn.weight[0] + head.attn.bias[0], 0)
                    pooled.append((a[:, None] * text).sum(0))
            want.append(head.proj(torch.stack(pooled).mean(0)))
    assert torch.allclose(got, torch.stack(want), atol=1e-5)

    # the FLOPs of the next micro-batch by hand: the frozen parent forward on its nonzeros without the
    # LM head (no vocabulary logits), x 2 for the activation gradients; the head's pooling and
    # projection x 3 (its weight gradients)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p0, h0 = prompt.weight.detach().clone(), {k: v.clone() for k, v in head.state_dict().items()}
    order = feed.loader.state()
    idx = feed.loader.next_indices()
    feed.loader.load_state(order)
    xb, _, _ = collate_windows([feed.windows[i] for i in idx], feed.data.enc.pad)
    rows, T = xb.shape
    P, d, c = cfg.prompt.n_tokens, cfg.model.d_model, stage.child
    fm = FlopModel(cfg.model.n_layer, d, T + P, 0, c.sparse_numel, c.parent_nonzero)
    head_fwd = 2 * d * (2 if pooling == "attention" else 1) * rows * T + 2 * d * len(hoc.CLASSES) * rows
    r = train_step(opt, stage.micro_batch, cfg.train.grad_accum, cfg.train.grad_clip)
    assert r.flops == pytest.approx(2 * fm.forward_per_token(True) * rows * (T + P) + 3 * head_fwd, rel=1e-12)
    assert r.flops_dense == pytest.approx(2 * fm.forward_per_token(False) * rows * (T + P) + 3 * head_fwd, rel=1e-12)
    assert c.parent_nonzero < c.sparse_numel and r.flops < r.flops_dense  # the sparse parent's nonzeros
    print(f"\nhead share of the step's FLOPs ({pooling}): {3 * head_fwd / r.flops:.4%}")
    train_step(opt, stage.micro_batch, cfg.train.grad_accum, cfg.train.grad_clip)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a parent weight changed"
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not torch.equal(p0, prompt.weight), "the prompt did not train"
    assert not torch.equal(h0["proj.weight"], head.state_dict()["proj.weight"]), "the head did not train"
    # the checkpoint state: prompt and head (thresholds included), no model weights
    st = stage.state()
    assert "model" not in st and torch.equal(st[TENSOR], prompt.weight.detach())
    assert set(st["head"]) == set(head.state_dict()) and "thresholds" in st["head"]
    report.close()


# -- end to end ---------------------------------------------------------------------------------------


def test_hoc_prompt_head_run_best_epoch_eval_inspect_and_export(env, tmp_path):
    """On a fine-tuned classifier parent (which has a head of its own): the prompt run's best checkpoint
    holds its prompt and head, `eval` of the run reproduces the dev evaluation stored at that step with
    the prompt run's head and thresholds (never the parent's), `inspect` and `export-hf` work and the card
    describes that head."""
    ft = cli_inproc(env.tmp, env.db, "train", "finetune-hoc",
                    *sets(f"parent={env.parent}", f"task.train={env.train}", f"task.dev={env.dev}", "task.head=classifier",
                          "train.max_steps=2", "train.batch_size=4", "train.threads=1", "train.warmup_steps=1"))
    assert ft.rc == 0, ft.stderr
    db = RunDB(env.db)
    ft_ck = db.latest_checkpoint(ft.run_id)["path"]
    parent_head = load_checkpoint(ft_ck)["head"]
    digest = sha(ft_ck)

    r = cli_inproc(env.tmp, env.db, "train", "prompt-pubmedqa",
                   *hoc_args(env, ft.run_id, "train.epochs=3", "train.early_stopping_patience=2", "train.warmup_steps=1",
                             "train.lr=3e-3", "prompt.lr=0.1", "train.checkpoint_every=1000"))
    assert r.rc == 0, r.stderr
    assert sha(ft_ck) == digest, "the parent checkpoint must not change"
    db = RunDB(env.db)
    run = db.get_run(r.run_id)
    assert run["stage"] == "prompt" and run["config"]["task"]["head"] == "classifier"
    assert run["config"]["train"]["max_steps"] == 9  # 3 epochs of ceil(12 / 4) steps
    info = run["meta"]["task"]
    assert info["train_windowed"] > 0 and info["pooling"] == "mean"
    evals = [e for e in db.evaluations(r.run_id) if e["split"] == "dev"]
    assert [e["step"] for e in evals] == [3, 6, 9]
    assert all("skipped" in e["baselines"]["zero_shot"] and "thresholds" in e["metrics"] for e in evals)
    best = run["meta"]["best_checkpoint"]
    micro = [e["metrics"]["micro_f1"] for e in evals]
    assert best["metric"] == "micro_f1" and best["step"] == evals[micro.index(max(micro))]["step"]
    cks = {c["step"]: c["path"] for c in db.checkpoints(r.run_id)}
    assert best["step"] in cks and 9 in cks
    ck = load_checkpoint(cks[best["step"]])
    assert "model" not in ck and ck[TENSOR].shape == (8, 32) and set(ck["head"]) == {"proj.weight", "proj.bias", "thresholds"}
    assert ck["parent_checkpoint"] == ft_ck
    assert not torch.equal(ck["head"]["proj.weight"], parent_head["proj.weight"])
    # the published prompt is the best evaluation's, as the head the card and eval read
    (art,) = db.artifacts(r.run_id, PROMPT_ARTIFACT)
    assert art["meta"]["step"] == best["step"] and art["meta"]["head"] == {"pooling": "mean", "classes": 10}
    stored = next(e for e in evals if e["step"] == best["step"])
    assert stored["metrics"]["thresholds"] == pytest.approx(
        dict(zip(hoc.CLASSES, torch.sigmoid(ck["head"]["thresholds"]).tolist())))
    # FLOPs: the parent's forward (no vocabulary logits) x 2 + the head; dense parent: spent = dense-equivalent
    assert 0 < run["summary"]["flops"] == pytest.approx(run["summary"]["flops_dense"])

    # the run's model: the parent checkpoint it recorded + its own prompt and head
    rm = load_run(db, r.run_id)
    assert rm.step == best["step"] and torch.equal(rm.prompt.weight.detach(), ck[TENSOR])
    assert torch.equal(rm.head.proj.weight, ck["head"]["proj.weight"])
    assert torch.equal(rm.head.thresholds, ck["head"]["thresholds"])

    ev = cli_inproc(env.tmp, env.db, "eval", r.run_id, "--task", "hoc", "--data", str(env.dev), "--json", "--batch-size", "4")
    assert ev.rc == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert out["step"] == best["step"] and out["scoring"] == "head" and out["n"] == N_DEV
    for k in ("micro_f1", "macro_f1", "windowed"):
        assert out[k] == pytest.approx(stored["metrics"][k]), k
    assert out["thresholds"] == pytest.approx(stored["metrics"]["thresholds"])
    assert out["f1_per_class"] == pytest.approx(stored["metrics"]["f1_per_class"])
    assert "skipped" in out["baselines"]["zero_shot"]
    assert out["baselines"]["tfidf_lr"]["micro_f1"] == pytest.approx(stored["baselines"]["tfidf_lr"]["micro_f1"])

    ins = cli_inproc(env.tmp, env.db, "inspect", r.run_id, "--json")
    assert ins.rc == 0, ins.stderr
    rep = json.loads(ins.stdout)
    assert rep["stage"] == "prompt" and rep["step"] == best["step"] and rep["params"]["total"] > 0

    out_dir = tmp_path / "hf"
    hf = cli_inproc(env.tmp, env.db, "export-hf", r.run_id, "--out", str(out_dir), "--json")
    assert hf.rc == 0, hf.stderr
    report = json.loads(hf.stdout.strip().splitlines()[-1])
    assert report["head"] == {"exported": False, "pooling": "mean", "classes": 10, "step": best["step"]}
    assert (out_dir / "prompt_adapter" / "adapter_config.json").is_file() and (out_dir / "soft_prompt.safetensors").is_file()
    card = (out_dir / "README.md").read_text()
    assert "## Classification head: not exported, and why" in card and "## Soft prompt" in card
    assert "This prompt run trained a classification head together with its soft prompt" in card
    assert "PEFT prompt-tuning adapter" in card and f"step {best['step']})" in card
    for cls, t in zip(hoc.CLASSES, ck["head"]["thresholds"].tolist()):
        assert f"| {cls} | {torch.sigmoid(torch.tensor(t)).item():.4f} | {t:.4f} |" in card
    if not torch.equal(parent_head["thresholds"], ck["head"]["thresholds"]):
        t = parent_head["thresholds"].tolist()
        assert not all(f"| {cls} | {torch.sigmoid(torch.tensor(v)).item():.4f} | {v:.4f} |" in card
                       for cls, v in zip(hoc.CLASSES, t)), "the card lists the parent's head"


def test_pubmedqa_prompt_head_resumed_equals_the_uninterrupted_run(env):
    # a constant learning rate (no warm-up, no decay): the schedule does not depend on max_steps
    args = ["train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.eval_every=3", "train.checkpoint_every=3",
            "train.lr=3e-3", "prompt.lr=0.1", "task.fold=0", "task.pooling=attention"]
    base = sets(f"parent={env.parent}", f"task.train={env.pqa}", *COMMON, *args)
    full = cli_inproc(env.tmp, env.db, "train", "prompt-pubmedqa", *base, *sets("train.max_steps=6"))
    assert full.rc == 0, full.stderr
    part = cli_inproc(env.tmp, env.db, "train", "prompt-pubmedqa", *base, *sets("train.max_steps=3"))
    assert part.rc == 0, part.stderr
    resumed = env.cli("train", "--resume", part.run_id, *sets("train.max_steps=6"))
    assert resumed.rc == 0, resumed.stderr
    db = RunDB(env.db)
    assert db.get_run(full.run_id)["meta"]["task"]["n_train"] == PQA_TRAIN

    def losses(run_id):
        return {m["step"]: m["value"] for m in db.metrics(run_id, names=["loss"])}

    ref, got = losses(full.run_id), losses(part.run_id)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert got == pytest.approx(ref, rel=1e-6)
    a, b = (load_checkpoint(db.latest_checkpoint(i)["path"]) for i in (full.run_id, part.run_id))
    assert a["step"] == b["step"] == 6
    assert torch.allclose(a[TENSOR], b[TENSOR], atol=1e-6)
    assert set(a["head"]) == set(b["head"]) == {"attn.weight", "attn.bias", "proj.weight", "proj.bias", "thresholds"}
    assert all(torch.allclose(a["head"][k], b["head"][k], atol=1e-6) for k in a["head"])
    ea = {e["step"]: e["metrics"] for e in db.evaluations(full.run_id)}
    eb = {e["step"]: e["metrics"] for e in db.evaluations(part.run_id)}
    assert sorted(ea) == sorted(eb) == [3, 6]
    for step in (3, 6):
        assert eb[step]["accuracy"] == ea[step]["accuracy"] and eb[step]["macro_f1"] == pytest.approx(ea[step]["macro_f1"])
        assert eb[step]["loss"] == pytest.approx(ea[step]["loss"], rel=1e-6)
