"""Calibrated answer-likelihood scoring: the prior an answer brings to every example is subtracted.

The constructed scorer below gives each answer a fixed log-prior (strongly favouring "yes") plus
evidence read from the example's content tokens; raw likelihood then says "yes" throughout, and
only calibration against the content-free inputs recovers the gold labels. The real
``evaluate_examples`` runs on real tokenizer ids; the scorer alone is a stand-in.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine.core.config import ModelConfig, TaskConfig, from_dict
from engine.core.errors import InputError
from engine.data.vocab import train_tokenizer
from engine.model.gpt import GPT
from engine.model.soft_prompt import SoftPrompt
from engine.tasks import hoc, pubmedqa
from engine.tasks.base import CONTENT_FREE_TEXTS, Encoded, Encoder
from engine.tasks.scoring import Scorer, evaluate_examples, scoring_used

# a word in the content that is evidence for each answer
CUE_WORDS = {0: "effective", 1: "harmful", 2: "unclear"}
LOG_PRIOR = np.array([-0.1, -6.0, -8.0])  # yes, no, maybe: "yes" is far likelier a priori
EVIDENCE = 4.0                             # enough to beat the prior only once the prior is removed

LINES = [
    "the drug was effective in most patients and the trial was stopped early",
    "the treatment was harmful in older patients with kidney disease",
    "whether the screening helps remains unclear from this small cohort",
    "question: does the therapy work? context: patients were treated for six months",
    "N/A the answer to the question given the context is yes. no. maybe.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(LINES, 400)


class PriorPlusEvidence:
    """Stands in for ``Scorer``: an answer's log-probability is its fixed prior plus EVIDENCE for each
    occurrence of its cue word among the prompt's content tokens. Records every sequence it scores."""

    def __init__(self, tok, candidates: list[list[int]]):
        self.model = nn.Linear(1, 1)  # evaluate_examples switches the model to eval mode and back
        self.head = None
        self.batch_size = 4
        self.tok = tok
        self.candidates = candidates
        self.prompts: list[str] = []

    def answer_logprobs(self, seqs, pad):
        out = []
        for e in seqs:
            prompt, answer = e.ids[:e.answer_start], e.ids[e.answer_start:]
            text = self.tok.decode(prompt)
            self.prompts.append(text)
            if answer not in self.candidates:  # the gold answer of the loss: any finite value will do
                out.append(-1.0)
                continue
            k = self.candidates.index(answer)
            out.append(float(LOG_PRIOR[k] + EVIDENCE * text.split().count(CUE_WORDS[k])))
        return out


def _examples():
    """Two questions per label; each context holds its label's cue word once."""
    out = []
    for y, word in CUE_WORDS.items():
        for j in range(2):
            out.append(pubmedqa.make_example(f"q{y}{j}", f"does treatment {j} work?",
                                             f"in this cohort the therapy was {word} overall", y))
    return out


@pytest.mark.quick
def test_calibration_recovers_labels_that_the_prior_hides(tok):
    enc = Encoder(tok, 128)
    cands = [enc.answer_ids(c) for c in pubmedqa.candidates()]
    examples = _examples()
    gold = [ex.label for ex in examples]

    raw_scorer, raw_pred = PriorPlusEvidence(tok, cands), []
    raw = evaluate_examples(raw_scorer, enc, pubmedqa, examples, TaskConfig(name="pubmedqa", scoring="raw"),
                            predictions=raw_pred)
    assert raw_pred == [0] * len(examples)  # the prior wins everywhere
    assert raw["scoring"] == "raw" and raw["accuracy"] == pytest.approx(1 / 3)
    assert raw["predicted"] == {"yes": 6, "no": 0, "maybe": 0} and "content_free" not in raw
    assert not any("N/A" in p for p in raw_scorer.prompts)  # raw scoring reads no content-free input

    cal_scorer, cal_pred = PriorPlusEvidence(tok, cands), []
    cal = evaluate_examples(cal_scorer, enc, pubmedqa, examples, TaskConfig(name="pubmedqa", scoring="calibrated"),
                            predictions=cal_pred)
    assert cal_pred == gold
    assert cal["scoring"] == "calibrated" and cal["accuracy"] == 1.0 and cal["macro_f1"] == 1.0
    # the subtracted prior is what the content-free inputs gave: no cue word there, so exactly LOG_PRIOR
    assert list(cal["content_free"]) == list(pubmedqa.CLASSES)
    assert list(cal["content_free"].values()) == pytest.approx(LOG_PRIOR.tolist())
    # the gold-answer losses (6), the candidates of every example (6 x 3), then each content-free input's
    # candidates once for the whole call (2 x 3), in the same template and through the same encoder
    assert len(cal_scorer.prompts) == 6 + 18 + 3 * len(CONTENT_FREE_TEXTS)
    free = cal_scorer.prompts[-3 * len(CONTENT_FREE_TEXTS):]
    assert free[:3] == ["question: N/A context: N/A" + pubmedqa.CUE] * 3
    assert free[3:] == ["question: context:" + pubmedqa.CUE] * 3
    assert cal["loss"] == raw["loss"]  # the loss is on the gold answers: scoring does not change it


@pytest.mark.quick
def test_calibration_uses_the_mean_over_content_free_inputs(tok):
    """A prior seen only after "N/A" (not after the empty input) is halved by the average over both."""
    enc = Encoder(tok, 128)
    cands = [enc.answer_ids(c) for c in pubmedqa.candidates()]

    class NAFavoursNo(PriorPlusEvidence):
        def answer_logprobs(self, seqs, pad):
            out = super().answer_logprobs(seqs, pad)
            return [v + (10.0 if "N/A" in self.tok.decode(e.ids[:e.answer_start]) and e.ids[e.answer_start:] == cands[1]
                         else 0.0) for v, e in zip(out, seqs)]

    m = evaluate_examples(NAFavoursNo(tok, cands), enc, pubmedqa, _examples(),
                          TaskConfig(name="pubmedqa", scoring="calibrated"))
    assert m["content_free"]["no"] == pytest.approx(LOG_PRIOR[1] + 5.0)
    assert m["content_free"]["yes"] == pytest.approx(LOG_PRIOR[0])


@pytest.mark.quick
def test_content_free_examples_follow_the_template():
    real = pubmedqa.make_example("1", " Is it safe? ", " It was. ", 0)
    assert (real.head, real.context, real.tail, real.target) == ("question: Is it safe? context:", " It was.",
                                                                 pubmedqa.CUE, " yes.")
    free = pubmedqa.content_free()
    assert [(e.head, e.context, e.tail, e.label) for e in free] == [
        ("question: N/A context:", " N/A", pubmedqa.CUE, None), ("question: context:", "", pubmedqa.CUE, None)]


@pytest.mark.quick
def test_calibrated_scoring_runs_through_the_soft_prompt(tok):
    """With a real model and soft prompt: calibrated = raw log-prob minus the mean content-free log-prob,
    both computed by hand with the same prompt vectors in front."""
    torch.manual_seed(3)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, n_ctx=64), tok.get_vocab_size()).eval()
    soft = SoftPrompt(4, 32)
    nn.init.normal_(soft.weight, std=1.0)
    enc = Encoder(tok, 60)
    examples = _examples()
    cands = [enc.answer_ids(c) for c in pubmedqa.candidates()]
    reserve = max(map(len, cands))

    def logprob(prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids[:, :-1], prefix=soft.weight.unsqueeze(0))[0][0, soft.weight.shape[0]:]
        lp = torch.log_softmax(logits.float(), -1)
        return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))

    raw = np.array([[logprob(enc.prompt(ex, reserve), c) for c in cands] for ex in examples])            # [N, K]
    prior = np.mean([[logprob(enc.prompt(ex, reserve), c) for c in cands] for ex in pubmedqa.content_free()], 0)
    for scoring, want in (("raw", raw.argmax(1)), ("calibrated", (raw - prior).argmax(1))):
        pred: list = []
        m = evaluate_examples(Scorer(model, soft, batch_size=4), enc, pubmedqa, examples,
                              TaskConfig(name="pubmedqa", scoring=scoring), predictions=pred)
        assert pred == want.tolist(), scoring
        assert m["scoring"] == scoring
    assert m["content_free"] == pytest.approx(dict(zip(pubmedqa.CLASSES, prior.tolist())), abs=1e-4)
    # the soft prompt matters: without it the content-free prior differs
    free = [Encoded(enc.prompt(ex, reserve) + c, len(enc.prompt(ex, reserve))) for ex in pubmedqa.content_free() for c in cands]
    plain = np.asarray(Scorer(model).answer_logprobs(free, enc.pad)).reshape(-1, len(cands)).mean(0)
    assert not np.allclose(plain, prior, atol=1e-3)


@pytest.mark.quick
def test_scoring_names_the_prediction_path(tok):
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=32, n_ctx=64), tok.get_vocab_size())
    plain, with_head = Scorer(model), Scorer(model, head=nn.Linear(32, 3))
    assert scoring_used(plain, pubmedqa, TaskConfig(scoring="raw")) == "raw"
    assert scoring_used(plain, pubmedqa, TaskConfig(scoring="calibrated")) == "calibrated"
    assert scoring_used(plain, pubmedqa, TaskConfig(predict="generate", scoring="calibrated")) == "generate"
    assert scoring_used(plain, hoc, TaskConfig(scoring="calibrated")) == "generate"
    assert scoring_used(with_head, pubmedqa, TaskConfig(scoring="calibrated")) == "head"
    # a generate evaluation records "generate" whatever task.scoring says
    ex = _examples()[:2]
    m = evaluate_examples(plain, Encoder(tok, 64), pubmedqa, ex, TaskConfig(predict="generate", max_new_tokens=2))
    assert m["scoring"] == "generate"


@pytest.mark.quick
def test_task_scoring_config_key():
    assert TaskConfig().scoring == "raw"  # the measured default (docs/pipeline.md, Scoring)
    assert from_dict({"task": {"name": "pubmedqa", "scoring": "raw"}}).task.scoring == "raw"
    with pytest.raises(InputError) as e:
        TaskConfig(scoring="platt")
    assert e.value.key == "task.scoring"
