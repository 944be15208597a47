"""Dense fine-tuning (SPDF): the parent's weights with its masks dropped, so every weight trains, on a
task (engine/train/task_feeds.py), optionally through a new classification head (engine/model/classifier.py)."""
from __future__ import annotations

import torch

from engine.core import registry
from engine.model.classifier import new_head
from engine.tasks import get_task
from engine.train.child import ChildRun
from engine.train.identity import RunIdentity
from engine.train.optim import gpt_depth, make_optimizer
from engine.train.reporter import Reporter
from engine.train.step import MicroBatch


class FinetuneStage:
    def build(self, run: RunIdentity, report: Reporter, rt, resume: dict | None) -> None:
        cfg = self.cfg = run.cfg
        self.child = ChildRun(run, report, rt, resume)
        self.vocab_size = self.child.vocab_size
        self.model = self.child.model
        self.model.train()
        if self.child.parent_masked:
            c = self.child
            report.info(f"dropped the parent's masks: {c.sparse_numel - c.parent_nonzero:,} of {c.sparse_numel:,} sparse-layer "
                        f"weights were zero and now train (dense fine-tuning)")
        self.head = None
        if registry.task(cfg.task.name).labelled and cfg.task.head == "classifier":
            self.head = new_head(cfg.model.d_model, len(get_task(cfg.task.name).CLASSES), cfg.task.pooling).to(rt.device)
        self.child.start(None, self.head, train_factor=3.0, sparse_forward=False, resume=resume,
                         head_flops=self.head is not None)  # a head forms no vocabulary logits

    def trained_modules(self) -> dict:
        return {"model": self.model, **({"head": self.head} if self.head is not None else {})}

    def train_order(self):
        return self.child.feed.loader

    def make_optimizer(self) -> torch.optim.Optimizer:
        named = list(self.model.named_parameters()) + (list(self.head.named_parameters()) if self.head else [])
        tc, n_layer = self.cfg.train, self.cfg.model.n_layer
        opt = make_optimizer(named, tc, depth=gpt_depth(n_layer), n_depths=n_layer + 2)
        if tc.layer_decay != 1.0:
            self.child.report.info(f"layer-wise learning-rate decay {tc.layer_decay:g}: the embeddings train at "
                                   f"{tc.layer_decay ** (n_layer + 1):.3g} x train.lr, block 0 at "
                                   f"{tc.layer_decay ** n_layer:.3g} x, the heads at 1 x")
        self.child.meta(sum(p.numel() for g in opt.param_groups for p in g["params"]))
        return opt

    def micro_batch(self) -> MicroBatch:
        return self.child.micro_batch()

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, step: int) -> dict:
        rows = self.child.evaluate(step)
        self.model.train()
        return rows

    def state(self) -> dict:
        out = {**self.child.state(), "model": self.model.state_dict()}
        if self.head is not None:
            out["head"] = self.head.state_dict()
        return out

    def load_state(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        if self.head is not None and ck.get("head"):
            self.head.load_state_dict(ck["head"])
        self.child.load_state(ck)

    def dev_score(self):
        return self.child.dev_score()

    def summary(self) -> dict:
        return {**self.child.summary(), "sparsity": 0.0}
