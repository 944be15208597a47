"""Classification heads over the whole input: windows, pooling, thresholds, loss weights, old heads,
the TF-IDF baseline against scikit-learn, and a classifier fine-tune on real HoC scored by `eval`."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import REPO, SHARED_DATA, CliResult, engine_env, sets

from engine.core.config import ModelConfig, TaskConfig
from engine.data.vocab import train_tokenizer
from engine.model.classifier import ATTENTION, LAST, MEAN, head_from_state, new_head
from engine.model.gpt import GPT
from engine.model.runs import load_head
from engine.tasks import hoc, pubmedqa
from engine.tasks.base import WINDOW_STRIDE, Encoder, Example, Truncation, collate_windows, multi_label_metrics
from engine.tasks.scoring import WEIGHT_MAX, Scorer, evaluate_examples, head_weights, tune_thresholds
from engine.tasks.text_baseline import example_text, tfidf_lr_baseline

HOC = SHARED_DATA / "hoc"
PQA = SHARED_DATA / "pubmedqa" / "pqal_trainval.json"
VALID = SHARED_DATA / "pubmed_abstracts" / "valid.txt"
needs_data = pytest.mark.skipif(not (HOC.is_dir() and PQA.is_file() and VALID.is_file()),
                                reason=f"shared data missing under {SHARED_DATA}")

LINES = ["the tumour cells grew quickly and invaded the nearby tissue of the mice",
         "apoptosis was blocked by the new inhibitor in most cell lines tested",
         "question: does the therapy work? context: patients were treated for six months",
         "angiogenesis and inflammation were measured in every sample of the cohort"] * 25


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(LINES, 300)


# -- thresholds --------------------------------------------------------------------------------------


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = int((pred & gold).sum())
    return 2 * tp / (2 * tp + int((pred & ~gold).sum()) + int((~pred & gold).sum())) if tp else 0.0


@pytest.mark.quick
@pytest.mark.parametrize("seed", range(4))
def test_thresholds_equal_a_brute_force_search(seed):
    """Per label: the tuned cut predicts exactly the set the best of all possible cuts predicts
    (brute force: every distinct score as the lowest positive, ties to the fewest positives), and no
    threshold of a fine grid does better."""
    rng = np.random.default_rng(seed)
    n, k = 80, 10
    gold = rng.random((n, k)) < rng.uniform(0.05, 0.5, k)
    gold[:, 3] = False                                           # a label without positives
    scores = (rng.normal(size=(n, k)) + 1.5 * gold).astype(np.float32)
    scores[:, 5] = np.round(scores[:, 5])                        # many tied scores
    current = np.full(k, 0.25, np.float32)
    cuts = tune_thresholds(scores, gold, current)
    assert cuts.dtype == np.float32 and cuts[3] == np.float32(0.25)  # no positives: left as it was
    for c in range(k):
        s, y = scores[:, c], gold[:, c]
        if not y.any():
            continue
        best_f1, best_set = -1.0, None
        for v in sorted(set(s.tolist()), reverse=True):          # predict every score >= v
            f1 = _f1(s >= v, y)
            if f1 > best_f1:
                best_f1, best_set = f1, s >= v
        assert np.array_equal(s > cuts[c], best_set), c
        assert _f1(s > cuts[c], y) == pytest.approx(best_f1)
        for t in np.linspace(s.min() - 1, s.max() + 1, 400):
            assert _f1(s > t, y) <= best_f1 + 1e-12
    # the F1 of each label is the per-label F1 of multi_label_metrics with these predictions
    pred = [tuple(np.flatnonzero(row > cuts)) for row in scores]
    m = multi_label_metrics([tuple(np.flatnonzero(r)) for r in gold], pred, hoc.CLASSES)
    assert m["f1_per_class"][hoc.CLASSES[0]] == pytest.approx(_f1(scores[:, 0] > cuts[0], gold[:, 0]))


@pytest.mark.quick
def test_threshold_between_adjacent_floats_keeps_the_order():
    hi = np.float32(1.0)
    lo = np.nextafter(hi, np.float32(0))                         # the float32 just below 1.0
    cut = tune_thresholds(np.array([[hi], [lo]], np.float32), np.array([[True], [False]]))
    assert hi > cut[0] >= lo


# -- loss weights ------------------------------------------------------------------------------------


@pytest.mark.quick
def test_head_weights_by_hand():
    labels = [(0,), (0, 1), (), (2,), (0,)] + [()] * 40          # 45 examples
    w = head_weights(hoc, labels).tolist()
    assert w[0] == pytest.approx(WEIGHT_MAX)                     # 42 negatives / 3 positives = 14, clipped
    assert w[1] == pytest.approx(WEIGHT_MAX) and w[4] == 1.0     # 44 / 1 clipped; label 4 never seen: 1
    few = head_weights(hoc, [(0,), (0,), (0, 1), ()])
    assert few[0] == pytest.approx(1 / 3) and few[1] == pytest.approx(3.0)
    c = head_weights(pubmedqa, [0, 0, 0, 1, 0, 0]).tolist()     # yes 5, no 1, maybe 0
    assert c == pytest.approx([6 / (3 * 5), 6 / (3 * 1), 1.0])


# -- windows and pooling -----------------------------------------------------------------------------


def _long_example(tok) -> Example:
    text = " ".join(LINES[:4])
    return Example("long", "question: what?", " " + text, " answer:", "", (1, 4))


@pytest.mark.quick
def test_windows_cover_a_long_document(tok):
    enc = Encoder(tok, 24)
    ex = _long_example(tok)
    h, c, t = enc.parts(ex)
    room = 24 - len(h) - len(t)
    assert len(c) > 2 * room                                     # several windows
    trunc = Truncation()
    windows = enc.windows(ex, trunc)
    step = int(room * WINDOW_STRIDE)
    starts = list(range(0, len(c) - room, step)) + [len(c) - room]
    assert windows == [h + c[s:s + room] + t for s in starts]
    assert all(len(w) == 24 for w in windows)
    covered = set()
    for s in starts:
        covered |= set(range(s, s + room))
    assert covered == set(range(len(c)))                         # every context token read
    assert trunc.windowed == {"long"} and not trunc.context      # nothing cut
    short = Example("short", "question: what?", " the mice", " answer:", "", ())
    assert enc.windows(short) == [enc.prompt(short, 0)]


@pytest.mark.quick
@pytest.mark.parametrize("pooling", [MEAN, ATTENTION])
def test_windowed_pooling_equals_a_hand_computation(tok, pooling):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, n_ctx=24), tok.get_vocab_size()).eval()
    head = new_head(16, len(hoc.CLASSES), pooling)
    nn.init.normal_(head.proj.weight, std=1.0)
    if pooling == ATTENTION:
        nn.init.normal_(head.attn.weight, std=1.0)
    enc = Encoder(tok, 24)
    long, short = _long_example(tok), Example("short", "question: what?", " the mice", " answer:", "", ())
    windows = [enc.windows(long), enc.windows(short)]
    x, lengths, group = collate_windows(windows, enc.pad)
    with torch.no_grad():
        got = Scorer(model, head=head).head_logits(x, lengths, group, 2)          # [2, K]

        def pooled(w: list[int]) -> torch.Tensor:                # one window alone, no padding
            h = model.hidden(torch.tensor([w]))[0]               # [T, C]
            if pooling == MEAN:
                return h.mean(0)
            a = torch.softmax(h @ head.attn.weight[0] + head.attn.bias[0], 0)  # [T]
            return (a[:, None] * h).sum(0)

        want = [head.proj(torch.stack([pooled(w) for w in ws]).mean(0)) for ws in windows]
    assert len(windows[0]) > 2 and len(windows[1]) == 1
    assert torch.allclose(got, torch.stack(want), atol=1e-5)
    # evaluate_examples reads the same windows and counts the windowed example
    m = evaluate_examples(Scorer(model, head=head), enc, hoc, [long, short], TaskConfig(name=hoc.NAME))
    assert m["windowed"] == 1 and m["scoring"] == "head"


@pytest.mark.quick
def test_an_earlier_linear_head_loads_and_predicts_as_before(tok):
    """A checkpoint's plain nn.Linear head (last prompt token, sigmoid > 0.5) keeps scoring as it did."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, n_ctx=24), tok.get_vocab_size()).eval()
    old = nn.Linear(16, len(hoc.CLASSES))
    nn.init.normal_(old.weight, std=2.0)
    head = load_head(old.state_dict())
    assert head.pooling == LAST and not head.training
    enc = Encoder(tok, 24)
    exs = [_long_example(tok), Example("s", "", " the mice grew", hoc.CUE, "", (2,))]
    pred: list = []
    evaluate_examples(Scorer(model, head=head), enc, hoc, exs, TaskConfig(name=hoc.NAME), predictions=pred)
    with torch.no_grad():
        want = []
        for ex in exs:
            p = enc.prompt(ex, 0)                                # cut to the window, as before
            logit = old(model.hidden(torch.tensor([p]))[0, -1])
            want.append(tuple(int(c) for c in torch.nonzero(logit > 0).flatten()))
    assert pred == want
    # a pooled head's state (thresholds included) round-trips
    new = new_head(16, 3, ATTENTION)
    new.set_thresholds([0.5, -1.0, 2.0])
    back = head_from_state(new.state_dict())
    assert back.pooling == ATTENTION and back.thresholds.tolist() == [0.5, -1.0, 2.0]


# -- the TF-IDF baseline -----------------------------------------------------------------------------


@needs_data
def test_tfidf_baseline_equals_scikit_learn_on_real_hoc():
    """The stored baseline is exactly what scikit-learn gives on the same files, written out here."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from threadpoolctl import threadpool_limits

    train, dev = hoc.read(str(HOC / "train.jsonl"))[:400], hoc.read(str(HOC / "dev.jsonl"))
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    xt = vec.fit_transform([" ".join(s for s in (e.head, e.context) if s) for e in train])
    xd = vec.transform([" ".join(s for s in (e.head, e.context) if s) for e in dev])
    Y = np.array([[c in e.label for c in range(10)] for e in train], dtype=int)
    G = np.array([[c in e.label for c in range(10)] for e in dev], dtype=int)
    with threadpool_limits(limits=1):  # as fast as it gets on two shared cores; the result is the same
        P = np.stack([LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000).fit(xt, Y[:, c]).predict(xd)
                      for c in range(10)], 1)
    got = tfidf_lr_baseline(hoc, train, dev)
    assert got["micro_f1"] == pytest.approx(f1_score(G, P, average="micro"))
    assert got["macro_f1"] == pytest.approx(f1_score(G, P, average="macro", zero_division=0))
    assert got["fitted_on"] == 400 and got["n"] == len(dev) == 186
    assert got["micro_f1"] > 0.5                                  # a bag of words reads HoC well
    assert example_text(train[0]) == train[0].context
    # nothing to fit or score, or no word to read: skipped with the reason, never a failed evaluation
    assert "skipped" in tfidf_lr_baseline(hoc, [], dev) and "skipped" in tfidf_lr_baseline(hoc, train, [])
    blank = [Example(str(i), "", " ", hoc.CUE, "", (i % 2,)) for i in range(4)]
    assert "could not be fitted" in tfidf_lr_baseline(hoc, blank, blank)["skipped"]


@needs_data
def test_tfidf_baseline_equals_scikit_learn_on_a_real_pubmedqa_fold():
    """Single-label: one multinomial regression, fitted on fold 0's 450 training questions."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from threadpoolctl import threadpool_limits

    train, dev, _ = pubmedqa.train_dev(TaskConfig(name=pubmedqa.NAME, train=str(PQA)), 0.05, 0, lambda m: None)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    xt = vec.fit_transform([f"{e.head} {e.context}" for e in train])
    with threadpool_limits(limits=1):
        lr = LogisticRegression(C=10.0, class_weight="balanced", max_iter=2000).fit(xt, [e.label for e in train])
    pred = lr.predict(vec.transform([f"{e.head} {e.context}" for e in dev]))
    gold = [e.label for e in dev]
    got = tfidf_lr_baseline(pubmedqa, train, dev)
    assert (len(train), len(dev), got["fitted_on"]) == (450, 50, 450)
    assert got["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=[0, 1, 2], average="macro", zero_division=0))


# -- a classifier fine-tune on real HoC, then `eval` --------------------------------------------------


@needs_data
def test_classifier_finetune_on_hoc_tunes_thresholds_and_eval_uses_them(tmp_path):
    db = tmp_path / "runs.db"

    def cli(*args: str) -> CliResult:
        cmd = [sys.executable, "-m", "engine", *args, "--db", str(db)]
        return CliResult(subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO,
                                        env=engine_env(tmp_path)))

    p = cli("train", "demo", *sets("model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_ctx=64",
                                   "tokenizer.vocab_size=400", f"data.corpus={VALID}", "train.max_steps=2",
                                   "train.batch_size=4", "train.eval_batches=1", "train.threads=1", "sparsity.kernel=dense"))
    assert p.rc == 0, p.stderr
    f = cli("train", "finetune-hoc", *sets(f"parent={p.run_id}", f"task.train={HOC / 'train.jsonl'}",
                                           f"task.dev={HOC / 'dev.jsonl'}", "task.head=classifier", "task.max_examples=24",
                                           "train.max_steps=6", "train.batch_size=4", "train.eval_every=3",
                                           "train.checkpoint_every=3", "train.warmup_steps=1", "train.threads=1",
                                           "train.lr=3e-3", "train.precision=fp32"))
    assert f.rc == 0, f.stderr
    from engine.model.checkpoint import load_checkpoint
    from engine.model.runs import load_run
    from engine.store.rundb import RunDB

    rdb = RunDB(db)
    run = rdb.get_run(f.run_id)
    info = run["meta"]["task"]
    assert info["train_windowed"] > 0 and info["dev_windowed"] > 0 and info["window_stride"] == WINDOW_STRIDE
    assert len(info["pos_weight"]) == 10 and info["pooling"] == MEAN
    # eval on the same 24 dev abstracts scores the checkpoint the run keeps for its model (with
    # train.early_stopping_patience, the best evaluation's): its stored thresholds reproduce that
    # evaluation's dev figures
    dev24 = tmp_path / "dev24.jsonl"
    dev24.write_text("".join((HOC / "dev.jsonl").read_text().splitlines(keepends=True)[:24]))
    preds = tmp_path / "preds.jsonl"
    r = cli("eval", f.run_id, "--data", str(dev24), "--json", "--predictions", str(preds), "--batch-size", "4")
    assert r.rc == 0, r.stderr
    out = json.loads(r.stdout)
    (final,) = [e for e in rdb.evaluations(f.run_id) if e["split"] == "dev" and e["step"] == out["step"]]
    assert final["metrics"]["windowed"] == info["dev_windowed"] and "before_tuning" in final["metrics"]
    assert set(final["baselines"]) >= {"majority", "tfidf_lr", "zero_shot"}
    assert final["baselines"]["tfidf_lr"]["fitted_on"] == 24
    (row,) = [c for c in rdb.checkpoints(f.run_id) if c["step"] == out["step"]]
    stored = load_checkpoint(row["path"])["head"]["thresholds"]
    assert final["metrics"]["thresholds"] == pytest.approx(dict(zip(hoc.CLASSES, torch.sigmoid(stored).tolist())))
    assert not torch.equal(stored, torch.zeros(10))               # tuned on dev, not the default
    assert out["scoring"] == "head" and out["micro_f1"] == pytest.approx(final["metrics"]["micro_f1"])
    assert out["thresholds"] == pytest.approx(final["metrics"]["thresholds"])
    assert {"majority", "tfidf_lr", "zero_shot"} <= set(out["baselines"])
    assert out["baselines"]["tfidf_lr"]["micro_f1"] == pytest.approx(final["baselines"]["tfidf_lr"]["micro_f1"])
    # the written predictions are the head's logits above the stored thresholds, computed here
    rm = load_run(rdb, f.run_id)
    enc = Encoder(rm.tok, rm.cfg.model.n_ctx)
    dev = hoc.read(str(dev24))
    x, lengths, group = collate_windows([enc.windows(ex) for ex in dev], enc.pad)
    with torch.no_grad():
        logits = Scorer(rm.model, head=rm.head).head_logits(x, lengths, group, len(dev))
    want = [[hoc.CLASSES[c] for c in range(10) if logits[i, c] > stored[c]] for i in range(len(dev))]
    assert [json.loads(line)["pred"] for line in preds.read_text().splitlines()] == want

    # the model card describes the head and lists the stored thresholds; baselines beside the model's figures
    out_dir = tmp_path / "export"
    e = cli("export-hf", f.run_id, "--out", str(out_dir))
    assert e.rc == 0, e.stderr
    card = (out_dir / "README.md").read_text()
    assert '`task.pooling = "mean"`' in card and "### Baselines" in card and "tfidf_lr" in card
    for c, t in zip(hoc.CLASSES, stored.tolist()):
        assert f"| {c} | {torch.sigmoid(torch.tensor(t)).item():.4f} | {t:.4f} |" in card
