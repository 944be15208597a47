"""Soft prompting (Lester et al. 2021): the parent model frozen (eval mode: no dropout, exactly the
parent's function), N virtual-token embeddings in front of the input trained alone; the learned
prompt is saved as ``prompt.safetensors`` next to the checkpoints, with its nearest vocabulary tokens.

With ``task.head = "classifier"`` on a labelled task, a new classification head (engine/model/classifier.py)
trains beside the prompt: the frozen parent reads [soft prompt + window] (long documents in overlapping
windows, as fine-tuning reads them), and the head pools the hidden states of the window's text tokens
only. The prompt's own positions are left out of the pooling: under causal attention they see
nothing but the prompt, so their hidden states are the same for every input — a constant that
carries nothing about the text and would only shift the mean by an amount depending on the window's
length. The prompt trains at ``prompt.lr`` (no weight decay), the head at ``train.lr`` (decay on its
matrices, as in fine-tuning); the head, its dev-tuned thresholds included, is saved in every
checkpoint (``head``), so eval, resume and the best-epoch checkpoint see it."""
from __future__ import annotations

import torch

from engine.core import registry
from engine.core.errors import InputError
from engine.model.checkpoint import load_checkpoint
from engine.model.classifier import new_head
from engine.model.soft_prompt import PROMPT_FILE, TENSOR, SoftPrompt, init_ids, nearest_tokens, save_prompt
from engine.store.rundb import PROMPT_ARTIFACT
from engine.tasks import get_task
from engine.train.child import ChildRun
from engine.train.identity import RunIdentity
from engine.train.reporter import Reporter
from engine.train.step import MicroBatch


class PromptStage:
    def build(self, run: RunIdentity, report: Reporter, rt, resume: dict | None) -> None:
        cfg = run.cfg
        self.run, self.report, self.cfg = run, report, cfg
        self.child = ChildRun(run, report, rt, resume)
        self.vocab_size = self.child.vocab_size
        self.model = self.child.model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.prompt = SoftPrompt(cfg.prompt.n_tokens, cfg.model.d_model).to(rt.device)
        self.init_ids = init_ids(self.child.tok, cfg.prompt, cfg.train.seed)
        with torch.no_grad():
            # the vectors those tokens enter the blocks as: BioGPT scales its token embeddings (x 1 elsewhere)
            rows = self.model.wte.weight[torch.tensor(self.init_ids, device=rt.device)]
            self.prompt.weight.copy_(rows * getattr(self.model, "embed_scale", 1.0))
        self.head = None
        if registry.task(cfg.task.name).labelled and cfg.task.head == "classifier":
            self.head = new_head(cfg.model.d_model, len(get_task(cfg.task.name).CLASSES), cfg.task.pooling).to(rt.device)
        # the frozen parent runs forward on its nonzeros and backward only for activation gradients,
        # down to the prompt: ~2 x forward instead of 3 x, since no weight gradients are formed; with a
        # head, no vocabulary logits are formed and the head's own FLOPs are counted apart
        self.child.start(self.prompt, self.head, train_factor=2.0, sparse_forward=True, resume=resume,
                         head_flops=self.head is not None)

    def trained_modules(self) -> dict:
        return {"prompt": self.prompt, **({"head": self.head} if self.head is not None else {})}

    def train_order(self):
        return self.child.feed.loader

    def make_optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        # no weight decay on the prompt: it would shrink the prompt toward 0
        groups = [{"params": [self.prompt.weight], "lr": self.cfg.prompt.lr, "weight_decay": 0.0}]
        if self.head is not None:  # the head as fine-tuning trains one: train.lr, decay on its matrices only
            params = list(self.head.parameters())
            groups += [g for g in ({"params": [p for p in params if p.dim() >= 2], "lr": tc.lr, "weight_decay": tc.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "lr": tc.lr, "weight_decay": 0.0})
                       if g["params"]]
        self.child.meta(sum(p.numel() for g in groups for p in g["params"]))
        if self.head is not None:
            self.report.info(f"training the soft prompt ({self.prompt.weight.numel():,} values, prompt.lr "
                             f"{self.cfg.prompt.lr:g}) and a classification head ({sum(p.numel() for p in params):,} "
                             f"parameters, {self.cfg.task.pooling} pooling over the text tokens, train.lr {tc.lr:g}); "
                             "the parent stays frozen")
        return torch.optim.AdamW(groups, lr=self.cfg.prompt.lr, betas=(tc.beta1, tc.beta2), eps=1e-8,
                                 weight_decay=0.0, foreach=False)

    def micro_batch(self) -> MicroBatch:
        return self.child.micro_batch()

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, step: int) -> dict:
        return self.child.evaluate(step)

    def state(self) -> dict:
        # the model itself stays the parent's file; the head (with its dev-tuned thresholds) is the run's own
        out = {**self.child.state(), TENSOR: self.prompt.weight.detach().cpu().clone()}
        if self.head is not None:
            out["head"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        return out

    def load_state(self, ck: dict) -> None:
        self.prompt.weight.data.copy_(ck[TENSOR])
        if self.head is not None:
            if not ck.get("head"):
                raise InputError("the checkpoint holds no classification head, but the run trains one "
                                 "(task.head = 'classifier')", key="task.head")
            self.head.load_state_dict(ck["head"])
        self.child.load_state(ck)

    def dev_score(self):
        return self.child.dev_score()

    def summary(self) -> dict:
        return self.child.summary()

    def on_final_checkpoint(self, step: int, best: tuple[int, str] | None = None) -> None:
        """The prompt artifact: the final prompt, or with ``best`` (step, checkpoint) the best
        evaluation's prompt (train.epochs, train.early_stopping_patience), which export-hf publishes."""
        cfg, report, tok, c = self.cfg, self.report, self.child.tok, self.child
        w = self.prompt.weight.detach().cpu()
        if best is not None:
            step, w = best[0], load_checkpoint(best[1])[TENSOR]
        nearest = nearest_tokens(w, self.model.wte.weight.detach().cpu(), tok, k=5)
        meta = {"parent_run": cfg.parent, "parent_checkpoint": c.parent_ckpt, "n_tokens": int(w.shape[0]),
                "d_model": int(w.shape[1]), "vocab_size": self.vocab_size, "step": step, "task": cfg.task.name,
                "init": cfg.prompt.init, "init_tokens": [tok.decode([i]) for i in self.init_ids],
                # the head trained with this prompt lives in the run's checkpoint of the same step
                **({"head": {"pooling": cfg.task.pooling, "classes": self.head.proj.out_features}}
                   if self.head is not None else {})}
        path = self.run.run_dir / PROMPT_FILE
        nbytes = save_prompt(path, w, meta)
        report.artifact(PROMPT_ARTIFACT, str(path), {**meta, "bytes": nbytes, "nearest_tokens": nearest})
        report.meta(prompt_nearest_tokens=[[t["token"] for t in row] for row in nearest])
        report.info(f"saved the soft prompt ({nbytes:,} bytes) to {path}; nearest tokens: " + " | ".join(row[0]["token"] for row in nearest))
