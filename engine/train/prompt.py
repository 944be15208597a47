"""Soft prompting (Lester et al. 2021): the parent model frozen (eval mode: no dropout, exactly the
parent's function), N virtual-token embeddings in front of the input trained alone; the learned
prompt is saved as ``prompt.safetensors`` next to the checkpoints, with its nearest vocabulary tokens."""
from __future__ import annotations

import torch

from engine.model.checkpoint import load_checkpoint
from engine.model.soft_prompt import PROMPT_FILE, TENSOR, SoftPrompt, init_ids, nearest_tokens, save_prompt
from engine.store.rundb import PROMPT_ARTIFACT
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
            self.prompt.weight.copy_(self.model.wte.weight[torch.tensor(self.init_ids, device=rt.device)])
        # the frozen parent runs forward on its nonzeros and backward only for activation gradients,
        # down to the prompt: ~2 x forward instead of 3 x, since no weight gradients are formed
        self.child.start(self.prompt, None, train_factor=2.0, sparse_forward=True, resume=resume)

    def trained_modules(self) -> dict:
        return {"prompt": self.prompt}

    def train_order(self):
        return self.child.feed.loader

    def make_optimizer(self) -> torch.optim.Optimizer:
        tc = self.cfg.train
        self.child.meta(self.prompt.weight.numel())
        # no weight decay: it would shrink the prompt toward 0
        return torch.optim.AdamW([self.prompt.weight], lr=self.cfg.prompt.lr, betas=(tc.beta1, tc.beta2), eps=1e-8,
                                 weight_decay=0.0, foreach=False)

    def micro_batch(self) -> MicroBatch:
        return self.child.micro_batch()

    def step_metrics(self) -> dict:
        return {}

    def evaluate(self, step: int) -> dict:
        return self.child.evaluate(step)

    def state(self) -> dict:
        # the model itself stays the parent's file
        return {**self.child.state(), TENSOR: self.prompt.weight.detach().cpu().clone()}

    def load_state(self, ck: dict) -> None:
        self.prompt.weight.data.copy_(ck[TENSOR])
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
                "init": cfg.prompt.init, "init_tokens": [tok.decode([i]) for i in self.init_ids]}
        path = self.run.run_dir / PROMPT_FILE
        nbytes = save_prompt(path, w, meta)
        report.artifact(PROMPT_ARTIFACT, str(path), {**meta, "bytes": nbytes, "nearest_tokens": nearest})
        report.meta(prompt_nearest_tokens=[[t["token"] for t in row] for row in nearest])
        report.info(f"saved the soft prompt ({nbytes:,} bytes) to {path}; nearest tokens: " + " | ".join(row[0]["token"] for row in nearest))
