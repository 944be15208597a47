"""Evaluation: metrics against hand-computed values, prediction paths, and `mediswift eval` on files anywhere."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, SHARED_DATA, CliResult, engine_env, sets

from engine.core.config import ModelConfig, TaskConfig, TrainConfig
from engine.store.rundb import RunDB
from engine.data.vocab import train_tokenizer
from engine.model.gpt import GPT
from engine.model.soft_prompt import SoftPrompt
from engine.tasks import hoc, pubmedqa
from engine.tasks.base import Encoder, Example, multi_label_metrics, single_label_metrics
from engine.tasks.scoring import Scorer, evaluate_examples, majority_baseline

PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
HOC_DEV = SHARED_DATA / "hoc" / "dev.jsonl"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
needs_data = pytest.mark.skipif(not (PQA.is_file() and VALID.is_file() and HOC_DEV.is_file()),
                                reason=f"shared data missing under {SHARED_DATA}")


# -- metrics by hand -------------------------------------------------------------------------------


@pytest.mark.quick
def test_single_label_metrics_match_hand_computation():
    # gold yes yes no maybe; predicted yes no no (unparsed)
    m = single_label_metrics([0, 0, 1, 2], [0, 1, 1, -1], pubmedqa.CLASSES)
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1
    # yes: tp1 fp0 fn1 -> 2/3; no: tp1 fp1 fn0 -> 2/3; maybe: 0
    assert m["f1_per_class"] == pytest.approx({"yes": 2 / 3, "no": 2 / 3, "maybe": 0.0})
    assert m["macro_f1"] == pytest.approx(4 / 9)


@pytest.mark.quick
def test_multi_label_metrics_match_hand_computation():
    gold = [(0, 1), (), (2,)]
    pred = [(0,), (3,), (2, 1)]
    m = multi_label_metrics(gold, pred, hoc.CLASSES)
    # pooled: tp = 2 (0, 2), fp = 2 (3, 1), fn = 1 (1) -> micro F1 = 4 / 7
    assert m["micro_f1"] == pytest.approx(4 / 7)
    # per label: 0 -> 1, 1 -> 0 (fn1 fp1), 2 -> 1, 3 -> 0 (fp), the other six 0 -> macro = 2 / 10
    assert m["macro_f1"] == pytest.approx(0.2)
    assert m["exact_match"] == 0.0 and m["precision"] == 0.5 and m["recall"] == pytest.approx(2 / 3)


@pytest.mark.quick
@pytest.mark.parametrize("seed", range(6))
def test_metrics_agree_with_scikit_learn_on_random_labels(seed):
    """Our convention: F1 over the task's fixed class list (``labels=``), and a class with no true
    positive scores 0, also when it is in neither gold nor prediction (no division by zero): that is
    scikit-learn's ``zero_division=0``, so it is passed to every score below. Some classes are left out
    of gold, of predictions, or of both; single-label predictions include -1 (unparsed: wrong, in no class)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))

    def some(classes, size):  # labels drawn from a random subset of the classes
        return rng.choice(rng.choice(classes, int(rng.integers(1, len(classes) + 1)), replace=False), size)

    gold = some(np.arange(3), n)
    pred = some(np.arange(-1, 3), n)
    m = single_label_metrics(gold.tolist(), pred.tolist(), pubmedqa.CLASSES)
    labels = list(range(3))
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=labels, average="macro", zero_division=0))
    per_class = f1_score(gold, pred, labels=labels, average=None, zero_division=0)
    assert m["f1_per_class"] == pytest.approx(dict(zip(pubmedqa.CLASSES, per_class)))
    assert m["unparsed"] == int((pred == -1).sum()) and m["n"] == n

    k = len(hoc.CLASSES)
    rates = rng.uniform(0, 0.5, (2, k))
    a, b, c = rng.choice(k, 3, replace=False)
    rates[0, a] = rates[1, b] = rates[:, c] = 0.0    # label a never in gold, b never predicted, c neither
    Y = rng.random((n, k)) < rates[0]                # [n, K] gold indicators
    P = rng.random((n, k)) < rates[1]                # [n, K] predicted indicators
    as_sets = lambda a: [tuple(np.flatnonzero(row).tolist()) for row in a]  # noqa: E731
    h = multi_label_metrics(as_sets(Y), as_sets(P), hoc.CLASSES)
    for ours, theirs in (("micro_f1", f1_score(Y, P, average="micro", zero_division=0)),
                         ("macro_f1", f1_score(Y, P, average="macro", zero_division=0)),
                         ("precision", precision_score(Y, P, average="micro", zero_division=0)),
                         ("recall", recall_score(Y, P, average="micro", zero_division=0)),
                         ("exact_match", accuracy_score(Y, P))):  # subset accuracy on indicator rows
        assert h[ours] == pytest.approx(theirs), ours
    per_label = f1_score(Y, P, average=None, zero_division=0)
    assert h["f1_per_class"] == pytest.approx(dict(zip(hoc.CLASSES, per_label)))


@pytest.mark.quick
def test_majority_baseline():
    ex = lambda y: Example("x", "", "", "", "", y)  # noqa: E731
    m = majority_baseline(pubmedqa, [ex(1), ex(1), ex(0)], [ex(1), ex(0), ex(2), ex(1)])
    assert m["predicts"] == "no" and m["accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx((0 + 2 * 2 / (2 * 2 + 2) + 0) / 3)
    h = majority_baseline(hoc, [ex((8,)), ex((8, 1)), ex(())], [ex((8,)), ex(())])
    assert h["predicts"] == hoc.CLASSES[8] and h["micro_f1"] == pytest.approx(2 / 3)


@pytest.mark.quick
def test_parsers():
    assert pubmedqa.parse(" maybe. yes") == 2 and pubmedqa.parse("Yes.") == 0 and pubmedqa.parse("unclear") == -1
    assert hoc.parse(" resisting cell death;  Cellular energetics; nonsense. genomic instability and mutation") == (2, 7)
    assert hoc.parse(" none.") == ()
    assert hoc.parse(hoc.target_text((9, 0))) == (0, 9)


# -- prediction paths against a hand-written loop ---------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(VALID.read_text(encoding="utf-8").splitlines()[:150], 400) if VALID.is_file() else None


@pytest.mark.quick
@needs_data
def test_likelihood_prediction_matches_manual_log_probs(tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, n_ctx=96), tok.get_vocab_size()).eval()
    enc = Encoder(tok, 96)
    base = Example("p", "question: does it work? context:", " it was tested in mice.", pubmedqa.CUE, "", 0)  # no cut
    # the same question under each gold label: exactly the predicted class is right
    exs = [Example(f"p{y}", base.head, base.context, base.tail, pubmedqa.target_text(y), y) for y in range(3)]
    preds: list = []
    m = evaluate_examples(Scorer(model, batch_size=2), enc, pubmedqa, exs, TaskConfig(), predictions=preds)
    cands = [enc.answer_ids(c) for c in pubmedqa.candidates()]
    prompt = enc.prompt(base, max(map(len, cands)))
    scores = []
    with torch.no_grad():
        for c in cands:
            ids = torch.tensor([prompt + c])
            logp = torch.log_softmax(model(ids[:, :-1])[0][0], -1)
            scores.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(c)))
    best = int(np.argmax(scores))
    assert preds == [best] * 3 and m["accuracy"] == pytest.approx(1 / 3)
    assert m["f1_per_class"][pubmedqa.CLASSES[best]] == pytest.approx(2 * 1 / (2 * 1 + 2))
    # the dev loss is the mean answer-token cross-entropy of the gold answers
    gold_nll = -(scores[0] + scores[1] + scores[2]) / sum(map(len, cands))
    assert m["loss"] == pytest.approx(gold_nll, rel=1e-4)


@pytest.mark.quick
@needs_data
def test_greedy_generation_matches_manual_loop(tok):
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, n_ctx=64), tok.get_vocab_size()).eval()
    with torch.no_grad():  # large block weights: the next token depends on the context, not only on the
        for name, w in model.named_parameters():  # last token's tied embedding (which repeats it)
            if name.startswith("blocks.") and w.dim() == 2:
                w.normal_(std=0.5)
    enc = Encoder(tok, 64)
    prompts = [enc.ids("the patients were"), enc.ids("tumour growth"), enc.ids("the mice were")]
    soft = SoftPrompt(4, 32)
    torch.nn.init.normal_(soft.weight, std=0.5)
    for prompt in (None, soft):  # the cached generation path, with and without a soft prompt in front
        got = Scorer(model, prompt, batch_size=2).generate(prompts, 5, enc.eot, 60)
        assert all(len(set(g)) > 1 for g in got), got  # varied continuations: a wrong cache would show
        for p, g in zip(prompts, got):
            ids = list(p)
            want = []
            with torch.no_grad():
                for _ in range(5):
                    prefix = soft.weight.unsqueeze(0) if prompt is not None else None
                    nxt = int(model(torch.tensor([ids]), prefix=prefix)[0][0, -1].argmax())
                    if nxt == enc.eot:
                        break
                    want.append(nxt)
                    ids.append(nxt)
            assert g == want


# -- the eval command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (PQA.is_file() and VALID.is_file()):
        pytest.skip(f"shared data missing under {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("eval")
    db = tmp / "runs.db"

    def cli(*args: str) -> CliResult:
        cmd = [sys.executable, "-m", "engine", *args, "--db", str(db)]
        return CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=engine_env(tmp)))

    p = cli("train", "demo", *sets("model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=96",
                                   "tokenizer.vocab_size=400", f"data.corpus={VALID}", "train.max_steps=2",
                                   "train.batch_size=4", "train.eval_batches=1", "train.threads=1", "sparsity.kernel=dense"))
    assert p.rc == 0, p.stderr
    f = cli("train", "finetune-pubmedqa", *sets(f"parent={p.run_id}", f"task.train={PQA}", "train.max_steps=2",
                                                "train.batch_size=4", "task.max_examples=8", "train.threads=1"))
    assert f.rc == 0, f.stderr
    return {"db": db, "parent": p.run_id, "ft": f.run_id, "cli": cli, "tmp": tmp}


def test_eval_cli_on_a_copy_outside_the_repo(runs, tmp_path):
    copy = tmp_path / "somewhere" / "my test set.json"
    copy.parent.mkdir()
    data = json.loads(PQA.read_text())
    copy.write_text(json.dumps(dict(list(data.items())[:10])))
    preds = tmp_path / "preds.jsonl"
    r = runs["cli"]("eval", runs["ft"], "--task", "pubmedqa", "--data", str(copy), "--json", "--predictions", str(preds))
    assert r.rc == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["task"] == "pubmedqa" and out["n"] == 10 and out["data"] == str(copy.resolve())
    # the printed figures follow from the written predictions, computed by hand
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [row["id"] for row in rows] == list(data)[:10]
    assert out["accuracy"] == pytest.approx(sum(row["gold"] == row["pred"] for row in rows) / 10)
    f1 = []
    for c in pubmedqa.CLASSES:
        tp = sum(row["gold"] == c and row["pred"] == c for row in rows)
        fp = sum(row["gold"] != c and row["pred"] == c for row in rows)
        fn = sum(row["gold"] == c and row["pred"] != c for row in rows)
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert out["macro_f1"] == pytest.approx(sum(f1) / 3)
    # majority from the run's training labels (fold 0 train, first 8): "yes" here
    assert out["baselines"]["majority"]["predicts"] == "yes"
    assert out["baselines"]["majority"]["accuracy"] == pytest.approx(sum(row["gold"] == "yes" for row in rows) / 10)
    assert "accuracy" in out["baselines"]["zero_shot"]
    # TF-IDF + logistic regression fitted on the same 8 training questions, as scikit-learn gives it here
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = pubmedqa.train_dev(TaskConfig(name=pubmedqa.NAME, train=str(PQA)), 0.05, TrainConfig().seed, lambda m: None)[0][:8]
    scored = pubmedqa.select(str(copy), "all", None, 0)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    xt = vec.fit_transform([f"{e.head} {e.context}" for e in train])
    labels = [e.label for e in train]
    if len(set(labels)) == 1:  # these 8 are all "yes": that is the only answer a regression can learn
        want = np.array(labels[:1] * len(scored))
    else:
        lr = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000).fit(xt, labels)
        want = lr.predict(vec.transform([f"{e.head} {e.context}" for e in scored]))
    tfidf = out["baselines"]["tfidf_lr"]
    assert tfidf["fitted_on"] == 8 and tfidf["n"] == 10
    assert tfidf["accuracy"] == pytest.approx(float(np.mean(want == np.array([e.label for e in scored]))))
    stored = RunDB(runs["db"]).evaluations(runs["ft"])[-1]
    assert stored["id"] == out["evaluation_id"] and stored["data_path"] == str(copy.resolve())
    assert stored["baselines"]["tfidf_lr"] == tfidf
    assert stored["metrics"]["accuracy"] == out["accuracy"] and stored["baselines"]["majority"]["predicts"] == "yes"
    # the run's own task.scoring (the config default) was used, for the model and its zero-shot baseline
    assert out["scoring"] == TaskConfig().scoring == stored["metrics"]["scoring"]
    assert out["baselines"]["zero_shot"]["scoring"] == out["scoring"]
    assert sum(out["predicted"].values()) == 10


def test_eval_cli_scoring_raw_and_calibrated(runs, tmp_path, capsys):
    """``--scoring`` chooses how answer likelihoods are compared; the JSON and the stored row say which,
    the zero-shot baseline is scored the same way, and the predictions written follow from it."""
    from engine.cli import main

    copy = tmp_path / "ten.json"
    copy.write_text(json.dumps(dict(list(json.loads(PQA.read_text()).items())[:10])))
    outs = {}
    for scoring in ("raw", "calibrated"):
        preds = tmp_path / f"{scoring}.jsonl"
        rc = main(["eval", runs["ft"], "--data", str(copy), "--scoring", scoring, "--json", "--predictions", str(preds),
                   "--db", str(runs["db"])])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        out = outs[scoring] = json.loads(captured.out)
        assert out["scoring"] == scoring and out["baselines"]["zero_shot"]["scoring"] == scoring
        assert ("content_free" in out) == (scoring == "calibrated")
        stored = RunDB(runs["db"]).evaluations(runs["ft"])[-1]
        assert stored["id"] == out["evaluation_id"] and stored["metrics"]["scoring"] == scoring
        assert stored["baselines"]["zero_shot"]["scoring"] == scoring
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        assert out["predicted"] == {c: sum(r["pred"] == c for r in rows) for c in pubmedqa.CLASSES}
    assert outs["raw"]["loss"] == pytest.approx(outs["calibrated"]["loss"])  # gold-answer loss: same either way
    # human-readable output names the scoring too
    assert main(["eval", runs["ft"], "--data", str(copy), "--scoring", "raw", "--no-baselines", "--db", str(runs["db"])]) == 0
    assert "scoring raw" in capsys.readouterr().out


def test_eval_cli_hoc_and_lm(runs, tmp_path):
    lm = runs["cli"]("eval", runs["ft"], "--task", "lm", "--data", str(VALID), "--limit", "4", "--json")
    assert lm.rc == 0, lm.stderr
    out = json.loads(lm.stdout)
    assert out["tokens"] == 4 * 96 and out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert "loss" in out["baselines"]["zero_shot"]
    h = tmp_path / "hoc.jsonl"
    h.write_text("".join(HOC_DEV.read_text().splitlines(keepends=True)[:5]))
    r = runs["cli"]("eval", runs["parent"], "--task", "hoc", "--data", str(h), "--json")
    assert r.rc == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 5 and 0.0 <= out["micro_f1"] <= 1.0 and "macro_f1" in out
    assert "skipped" in out["baselines"]["majority"]  # a pre-training run has no training labels
    assert out["scoring"] == "generate"  # HoC labels are generated, not compared by likelihood


def test_eval_cli_bad_input_exits_2(runs, tmp_path, capsys):
    from engine.cli import main

    unlabelled = tmp_path / "unlabelled.json"
    data = json.loads(PQA.read_text())
    first = dict(list(data.items())[:2])
    del first[next(iter(first))]["final_decision"]
    unlabelled.write_text(json.dumps(first))
    no_hallmarks = tmp_path / "x.jsonl"
    no_hallmarks.write_text('{"pmid": "1", "sentences": ["a b c"]}\n')
    cases = [
        ("nope", "pubmedqa", str(PQA), "unknown run"),
        (runs["ft"], "pubmedqa", str(tmp_path / "missing.json"), "not found"),
        (runs["ft"], "pubmedqa", str(HOC_DEV), "not a JSON file"),
        (runs["ft"], "pubmedqa", str(unlabelled), "no label"),
        (runs["ft"], "hoc", str(PQA), "not JSON Lines"),
        (runs["ft"], "hoc", str(no_hallmarks), "no 'labels'"),
    ]
    for run_id, task, path, words in cases:
        rc = main(["eval", run_id, "--task", task, "--data", path, "--json", "--db", str(runs["db"])])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and err.startswith("mediswift: error:"), (task, path, err)
    # calibration applies to answer likelihoods only: HoC labels are generated, lm is scored by its loss
    h = tmp_path / "hoc.jsonl"
    h.write_text("".join(HOC_DEV.read_text().splitlines(keepends=True)[:2]))
    before = len(RunDB(runs["db"]).evaluations(runs["parent"]))
    for task, path, words in (("hoc", h, "greedy generation"), ("lm", VALID, "scored by its loss")):
        rc = main(["eval", runs["parent"], "--task", task, "--data", str(path), "--scoring", "calibrated", "--json",
                   "--db", str(runs["db"])])
        captured = capsys.readouterr()
        assert rc == 2 and captured.out == "", (task, captured)
        assert captured.err.count("\n") == 1 and captured.err.startswith("mediswift: error: --scoring calibrated"), captured.err
        assert words in captured.err
    assert len(RunDB(runs["db"]).evaluations(runs["parent"])) == before  # nothing stored
