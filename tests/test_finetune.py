"""Dense fine-tuning: answer-only loss, truncation, masks dropped, lineage, baselines, resume, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHARED_DATA, CliResult, engine_env, sets

from engine.store.rundb import RunDB
from engine.data.vocab import load_tokenizer
from engine.model.checkpoint import load_checkpoint
from engine.tasks import pubmedqa
from engine.tasks.base import Encoder, Example, Truncation, collate_lm

PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
HOC = SHARED_DATA / "hoc"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
pytestmark = pytest.mark.skipif(not (PQA.is_file() and VALID.is_file() and HOC.is_dir()),
                                reason=f"shared data missing under {SHARED_DATA}")

# a parent small enough to pre-train in seconds; n_ctx 128 leaves room for a question after a soft prompt
PARENT = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=128", "tokenizer.vocab_size=400",
          f"data.corpus={VALID}", "train.max_steps=4", "train.batch_size=4", "train.eval_every=4",
          "train.eval_batches=1", "train.threads=1", "sparsity.kernel=dense", "sparsity.level=0.75"]
QUICK = ["train.max_steps=4", "train.batch_size=4", "train.eval_every=2", "train.checkpoint_every=2",
         "train.threads=1", "task.max_examples=12", "train.warmup_steps=1"]


class Env:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.db = tmp / "runs.db"

    def cli(self, *args: str, timeout: float = 300) -> CliResult:
        cmd = [sys.executable, "-m", "engine", *args, "--db", str(self.db)]
        return CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                                        env=engine_env(self.tmp)))


def parent_env(tmp: Path) -> Env:
    """A run database in ``tmp`` holding a tiny sparse pre-training run (``.parent``) to fine-tune."""
    e = Env(tmp)
    r = e.cli("train", "demo", *sets(*PARENT, "name=parent"))
    assert r.rc == 0, r.stderr
    e.parent = r.run_id
    return e


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return parent_env(tmp_path_factory.mktemp("ft"))


def main_inproc(env: Env, capsys, *args: str) -> tuple[int, list[dict], str]:
    """The CLI in this process (no interpreter start-up): exit code, events, stderr."""
    from engine.cli import main

    rc = main([*args, "--db", str(env.db)])
    cap = capsys.readouterr()
    return rc, [json.loads(line) for line in cap.out.splitlines() if line.startswith("{")], cap.err


def pqa_args(*extra: str) -> list[str]:
    return sets(f"task.train={PQA}", "task.fold=0", *QUICK, *extra)


# -- units -----------------------------------------------------------------------------------------


def test_only_answer_tokens_carry_labels_and_long_context_is_cut(env):
    tok = load_tokenizer(Path(RunDB(env.db).get_run(env.parent)["run_dir"]))
    ex = Example("1", "question: is aspirin useful? context:", " " + "aspirin reduces pain. " * 40,
                 pubmedqa.CUE, " yes.", 0)
    enc = Encoder(tok, 96)
    trunc = Truncation()
    e = enc.train(ex, trunc)
    assert len(e.ids) <= 96 and trunc.context == {"1"} and not trunc.question
    h, c, t = enc.parts(ex)
    answer = enc.answer_ids(" yes.")
    # question and cue intact, answer intact, only the context shortened
    assert e.ids[:len(h)] == h and e.ids[e.answer_start - len(t):e.answer_start] == t
    assert e.ids[e.answer_start:] == answer and e.answer_start - len(h) - len(t) < len(c)
    x, y = collate_lm([e, enc.train(Example("2", "question: q? context:", " short.", pubmedqa.CUE, " no.", 1))], enc.pad)
    labelled = (y[0] != -100).nonzero().flatten().tolist()
    assert labelled == list(range(e.answer_start - 1, len(e.ids) - 1))
    assert y[0, labelled].tolist() == answer
    assert tok.decode(y[1][y[1] != -100].tolist()).startswith(" no.")
    assert (y[1, len(enc.train(Example("2", "question: q? context:", " short.", pubmedqa.CUE, " no.", 1)).ids) - 1:] == -100).all()


@pytest.mark.quick
def test_loss_gradient_reaches_only_answer_positions(env):
    from engine.core.config import ModelConfig
    from engine.model.gpt import GPT
    from engine.tasks.scoring import Scorer

    tok = load_tokenizer(Path(RunDB(env.db).get_run(env.parent)["run_dir"]))
    enc = Encoder(tok, 64)
    e = enc.train(Example("1", "question: q? context:", " some context here.", pubmedqa.CUE, " maybe.", 2))
    x, y = collate_lm([e], enc.pad)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, n_ctx=64), tok.get_vocab_size())
    logits = model.lm_head(model.hidden(x)).detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
    loss.backward()
    touched = (logits.grad.abs().sum(-1)[0] > 0).nonzero().flatten().tolist()
    assert touched == list(range(e.answer_start - 1, len(e.ids) - 1))
    assert float(Scorer(model).lm_loss(x, y).detach()) == pytest.approx(float(loss.detach()), rel=1e-5)


# -- end to end ------------------------------------------------------------------------------------


def test_finetune_drops_masks_records_lineage_and_baselines(env):
    r = env.cli("train", "finetune-pubmedqa", *sets(f"parent={env.parent}"), *pqa_args())
    assert r.rc == 0, r.stderr
    db = RunDB(env.db)
    run, parent = db.get_run(r.run_id), db.get_run(env.parent)
    assert run["parent_id"] == env.parent and run["stage"] == "finetune" and run["status"] == "completed"
    # the model shape comes from the parent, not the preset
    assert run["config"]["model"] == parent["config"]["model"] | {"n_positions": 128}
    assert (Path(run["run_dir"]) / "tokenizer.json").read_bytes() == (Path(parent["run_dir"]) / "tokenizer.json").read_bytes()

    pck = load_checkpoint(db.latest_checkpoint(env.parent)["path"])
    ck = load_checkpoint(db.latest_checkpoint(r.run_id)["path"])
    for key in ("format", "stage", "config", "vocab_size", "model", "masks", "step", "tokens", "flops", "flops_dense"):
        assert key in ck
    assert ck["masks"] == {} and ck["stage"] == "finetune" and ck["step"] == 4
    assert pck["masks"], "the parent must be sparse for this test to mean anything"
    for name, mask in pck["masks"].items():
        before = pck["model"][f"{name}.weight"]
        after = ck["model"][f"{name}.weight"]
        assert (before[~mask] == 0).all()
        assert (after[~mask] != 0).float().mean() > 0.9, f"{name}: previously masked weights did not train"
    assert ck["flops"] == ck["flops_dense"] > 0  # dense fine-tuning

    evals = db.evaluations(r.run_id)
    assert [e["step"] for e in evals] == [2, 4] and all(e["split"] == "dev" and e["task"] == "pubmedqa" for e in evals)
    final = evals[-1]
    assert 0.0 <= final["metrics"]["accuracy"] <= 1.0 and final["metrics"]["n"] == 12
    maj = final["baselines"]["majority"]
    dev = pubmedqa.read(str(PQA))
    fold_dev = [dev[i] for i in json.loads((PQA.parent / "pqal_splits.json").read_text())["folds"][0]["dev"]][:12]
    assert maj["predicts"] == "yes" and maj["accuracy"] == pytest.approx(sum(e.label == 0 for e in fold_dev) / 12)
    assert "accuracy" in final["baselines"]["zero_shot"]
    names = {m["name"] for m in db.metrics(r.run_id)}
    assert {"loss", "dev_accuracy", "dev_macro_f1", "dev_loss"} <= names
    assert run["summary"]["dev_accuracy"] == final["metrics"]["accuracy"]

    ins = env.cli("inspect", r.run_id, "--json")
    assert ins.rc == 0, ins.stderr
    assert json.loads(ins.stdout)["sparsity"]["total"] < 0.01


def test_resume_finetune_run(env):
    r = env.cli("train", "finetune-pubmedqa", *sets(f"parent={env.parent}"), *pqa_args())
    assert r.rc == 0, r.stderr
    r2 = env.cli("train", "--resume", r.run_id, *sets("train.max_steps=6"))
    assert r2.rc == 0, r2.stderr
    db = RunDB(env.db)
    ck = load_checkpoint(db.latest_checkpoint(r.run_id)["path"])
    assert ck["step"] == 6 and ck["masks"] == {}
    steps = [m["step"] for m in db.metrics(r.run_id, names=["loss"])]
    assert steps == list(range(1, 7))


def test_hoc_classifier_head_and_lm_task(env):
    r = env.cli("train", "finetune-hoc", *sets(f"parent={env.parent}", f"task.train={HOC / 'train.jsonl'}",
                                             f"task.dev={HOC / 'dev.jsonl'}", "task.head=classifier", *QUICK))
    assert r.rc == 0, r.stderr
    db = RunDB(env.db)
    final = db.evaluations(r.run_id)[-1]
    assert final["task"] == "hoc" and 0.0 <= final["metrics"]["micro_f1"] <= 1.0
    assert "skipped" in final["baselines"]["zero_shot"] and "micro_f1" in final["baselines"]["majority"]
    assert "head" in load_checkpoint(db.latest_checkpoint(r.run_id)["path"])
    assert {"dev_micro_f1", "dev_macro_f1"} <= {m["name"] for m in db.metrics(r.run_id)}

    lm = env.cli("train", "finetune-pubmedqa", *sets(f"parent={env.parent}", "task.name=lm", f"data.corpus={VALID}",
                                                   "train.eval_batches=1", *QUICK))
    assert lm.rc == 0, lm.stderr
    names = {m["name"] for m in db.metrics(lm.run_id)}
    assert {"val_loss", "val_perplexity"} <= names


@pytest.mark.quick
@pytest.mark.parametrize("case", ["no_parent", "no_train", "wrong_format", "no_labels", "n_ctx", "bad_splits"])
def test_bad_input_exits_2_without_a_run(env, case, tmp_path, capsys):
    args = [f"parent={env.parent}", f"task.train={PQA}"]
    if case == "no_parent":
        args[0] = "parent=ffffffff"
    elif case == "no_train":
        args[1] = "task.train="
    elif case == "wrong_format":
        args[1] = f"task.train={HOC / 'dev.jsonl'}"
    elif case == "no_labels":
        data = json.loads(PQA.read_text())
        first = next(iter(data))
        del data[first]["final_decision"]
        bad = tmp_path / "unlabelled.json"
        bad.write_text(json.dumps(data))
        args[1] = f"task.train={bad}"
    elif case == "n_ctx":
        args.append("model.n_ctx=256")
    elif case == "bad_splits":
        (tmp_path / "splits.json").write_text('{"folds": [{"fold": 0, "train": ["1"], "dev": ["2"]}]}')
        args.append(f"task.splits={tmp_path / 'splits.json'}")
    before = len(RunDB(env.db).list_runs())
    rc, events, err = main_inproc(env, capsys, "train", "finetune-pubmedqa", *sets(*args, *QUICK))
    assert rc == 2, (rc, err)
    assert err.strip().startswith("mediswift: error:") and len(err.strip().splitlines()) == 1
    assert [e for e in events if e["type"] == "error"]
    assert len(RunDB(env.db).list_runs()) == before, "bad input must not leave a run behind"


def test_smaller_context_is_honoured(env):
    r = env.cli("train", "finetune-pubmedqa", *sets(f"parent={env.parent}", "model.n_ctx=96", "model.n_layer=7"),
                *pqa_args("train.max_steps=1"))
    assert r.rc == 0, r.stderr
    model = RunDB(env.db).get_run(r.run_id)["config"]["model"]
    assert model["n_ctx"] == 96 and model["n_positions"] == 128 and model["n_layer"] == 1


@pytest.mark.quick
def test_tokenizer_mismatch_exits_2(env, tmp_path, capsys):
    db = RunDB(env.db)
    run_dir = Path(db.get_run(env.parent)["run_dir"])
    tok_file = run_dir / "tokenizer.json"
    saved = tmp_path / "tokenizer.json"
    shutil.copyfile(tok_file, saved)
    try:
        from engine.data.vocab import save_tokenizer, train_tokenizer

        other = train_tokenizer(VALID.read_text().splitlines()[:50], 300)
        save_tokenizer(other, run_dir)
        rc, _, err = main_inproc(env, capsys, "train", "finetune-pubmedqa", *sets(f"parent={env.parent}"), *pqa_args())
        assert rc == 2 and "tokenizer mismatch" in err, err
    finally:
        shutil.copyfile(saved, tok_file)
