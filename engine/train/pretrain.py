"""The vocabulary and sparse pre-training stages.

corpus → tokenizer (learned here, or the parent's) → cached token blocks → GPT with masks (static, or
changed on a schedule by engine/train/dynamic_sparsity.py) → the shared loop (engine/train/loop.py).
What this stage adds: the LM data, the masks, the kernel choice, validation loss and per-layer
sparsity, and masks + kernels in its checkpoints.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from engine.core import registry
from engine.core.config import RunConfig
from engine.data.corpus import load_corpus
from engine.data.tokens import BlockLoader, check_enough_tokens, tokenize_corpus
from engine.data.vocab import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_tokenizer
from engine.model.checkpoint import load_checkpoint
from engine.model.flops import flop_model_for
from engine.model.gpt import GPT
from engine.model.sparsity import load_masks, masks_state, measure_sparsity, packed_state_dict, sparse_param_counts
from engine.train.dynamic_sparsity import MaskSchedule
from engine.train.identity import RunIdentity, continues_import
from engine.train.kernel_choice import TIMED_NOTE, KernelTrial, choose_kernels, set_kernels
from engine.train.optim import make_optimizer
from engine.train.reporter import Reporter
from engine.train.step import MicroBatch, lm_micro_batch


def prepare_tokenizer(run: RunIdentity, report: Reporter, documents: list[str], resuming: bool):
    """Learn the vocabulary, or reuse the parent's (or this run's own when resuming). The other ranks
    of a process group read the one rank 0 saved."""
    own = run.run_dir / TOKENIZER_FILE
    if (resuming or not run.writer) and own.is_file():
        return load_tokenizer(own)
    cfg, parent = run.cfg, run.parent
    if parent is not None:
        tok = parent.tokenizer_object()
        report.info(f"reusing the tokenizer of parent run {parent.id} ({tok.get_vocab_size()} tokens)")
    else:
        t = time.monotonic()
        report.info(f"learning a byte-level BPE vocabulary of {cfg.tokenizer.vocab_size} tokens on {len(documents)} documents")
        tok = train_tokenizer(documents, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.lowercase,
                              progress=lambda d, n: report.progress("tokenizer", d, n))
        report.info(f"vocabulary learned in {time.monotonic() - t:.1f}s ({tok.get_vocab_size()} tokens)")
    path = save_tokenizer(tok, run.run_dir)
    report.artifact("tokenizer", str(path), {"vocab_size": tok.get_vocab_size()})
    return tok


def load_stage_corpus(cfg: RunConfig, report: Reporter):
    corpus = load_corpus(cfg.data.corpus, cfg.data.text_field, cfg.data.max_documents)
    report.info(f"corpus: {len(corpus.documents)} documents, {corpus.n_chars:,} characters from {'; '.join(corpus.sources)}")
    return corpus


def run_vocab(run: RunIdentity, report: Reporter) -> str:
    """The vocabulary stage: corpus → tokenizer, no training loop."""
    report.start(0)
    tok = prepare_tokenizer(run, report, load_stage_corpus(run.cfg, report).documents, resuming=False)
    report.finish("completed", 0, {"vocab_size": tok.get_vocab_size()})
    return "completed"


class PretrainStage:
    def build(self, run: RunIdentity, report: Reporter, rt, resume: dict | None) -> None:
        cfg, tc = run.cfg, run.cfg.train
        self.cfg, self.report, self.rt = cfg, report, rt
        t = time.monotonic()
        group = rt.group
        corpus = load_stage_corpus(cfg, report)
        self.tok = group.writer_first(lambda: prepare_tokenizer(run, report, corpus.documents, resume is not None))
        self.vocab_size = self.tok.get_vocab_size()
        splits = group.writer_first(lambda: tokenize_corpus(
            corpus, self.tok, cfg.data.val_fraction, tc.seed, run.run_dir.parent / ".cache",
            progress=lambda d, n: report.progress("tokenize", d, n)))
        report.info(f"tokens: {len(splits.train):,} train ({splits.n_train_docs} docs), {len(splits.val):,} validation "
                    f"({splits.n_val_docs} docs){' from cache' if splits.from_cache else ''}; data ready in {time.monotonic() - t:.1f}s")
        check_enough_tokens(splits, cfg.model.n_ctx)
        self.loader = BlockLoader(splits.train, cfg.model.n_ctx, tc.batch_size, tc.seed)
        self.val_batches = BlockLoader(splits.val, cfg.model.n_ctx, tc.batch_size, tc.seed, shuffle=False).fixed_batches(tc.eval_batches)
        epochs = tc.max_steps * tc.batch_size * tc.grad_accum * group.world / self.loader.n_blocks
        if epochs > 10:
            report.warn(f"the run covers the training data {epochs:.1f} times; expect overfitting (use a larger corpus or fewer steps)")

        self.model = GPT(cfg.model, self.vocab_size)
        parent = run.parent
        imported = continues_import(cfg, parent)
        if imported and resume is None:  # continued pre-training: the imported weights, then masks by magnitude
            self.model.load_state_dict(load_checkpoint(parent.checkpoint)["model"])
            report.info(f"continuing imported model {parent.id}: masks by magnitude to sparsity {cfg.sparsity.level} "
                        f"({cfg.sparsity.distribution}, {cfg.sparsity.method})")
        self.masks = MaskSchedule(report, self.model, cfg)
        self.masks.init_masks(tc.seed, from_weights=imported)
        self.step = 0  # completed steps (the checkpoint's, when resuming): the mask schedule's clock
        self.model.to(rt.device)
        self.model.train()
        self.best_val = math.inf
        self.last_val = None
        self.trial = None
        if resume is not None:
            load_masks(self.model, resume["masks"])  # before the FLOP model and kernels, which count them
        self._count_flops()
        self.step_flops = self.flops_per_token  # this step's (RigL's update steps count the dense gradient)
        self.kernels_timed = bool(resume and resume.get("kernels_timed"))
        if resume is not None and resume.get("kernels"):
            self.kernels = dict(resume["kernels"])
            set_kernels(self.model, {n: self.kernels.get(n, "dense") for n in self.model.sparse_layers()})
            if resume.get("kernel_trial"):  # checkpointed inside the trial: it goes on where it was
                self.trial = KernelTrial.resumed(report, self.model, resume["kernel_trial"],
                                                 group if group.distributed else None)
        else:
            info: dict = {}
            self.kernels = group.broadcast(choose_kernels(report, cfg, self.model, tc.batch_size * cfg.model.n_ctx,
                                                          rt.device, rt.precision.name, info=info))
            self.kernels_timed = bool(info.get("timed"))
            set_kernels(self.model, self.kernels)
            if cfg.sparsity.kernel == "auto" and "sparse" in self.kernels.values():
                self.trial = KernelTrial(report, self.model, self.kernels, group if group.distributed else None)
        counts = sparse_param_counts(self.model)
        self.sparsity = measure_sparsity(self.model)
        report.meta(params=counts, vocab_size=self.vocab_size, kernels=self.kernels,
                    flops_per_token={"dense": self.fm.train_per_token(False), "sparse": self.fm.train_per_token(True)},
                    train_tokens=int(len(splits.train)), val_tokens=int(len(splits.val)))
        report.info(f"model: {counts['total']:,} parameters, {counts['nonzero']:,} nonzero; sparsity {self.sparsity['total']:.3f}; "
                    f"training FLOPs per token {self.fm.train_per_token(True):.3g} sparse vs {self.fm.train_per_token(False):.3g} dense "
                    f"({self.fm.saving():.2f}x); device {rt.device}")

    def _count_flops(self) -> None:
        """FLOPs per token from the masks in force (a dynamic method changes them)."""
        self.fm = flop_model_for(self.model)
        self.flops_per_token = (self.fm.train_per_token(True), self.fm.train_per_token(False))

    def trained_modules(self) -> dict:
        return {"model": self.model}

    def train_order(self):
        return self.loader

    def make_optimizer(self) -> torch.optim.Optimizer:
        opt = make_optimizer(list(self.model.named_parameters()), self.cfg.train)
        self.masks.opt = opt  # a mask update re-packs the moments of the values it moves
        return opt

    # -- each step --------------------------------------------------------------------------------
    def before_step(self) -> None:
        if self.trial:
            self.trial.before_step()
        self.masks.before_step(self.step + 1)  # after the trial: RigL's dense step overrides its kernels
        extra = self.masks.extra_flops_per_token(self.step + 1)
        self.step_flops = (self.flops_per_token[0] + extra, self.flops_per_token[1])

    def after_step(self, seconds: float) -> None:
        self.step += 1
        if self.masks.after_step(self.step):
            self._count_flops()
            self.sparsity = self.masks.sparsity
        if self.trial:
            self.trial.after_step(seconds)
            self.kernels = self.trial.kernels
            if self.trial.done:
                self.trial = None

    def pending_metrics(self) -> dict:
        """Metrics of a mask update, logged at its step whatever train.log_every says."""
        return self.masks.take_metrics()

    def micro_batch(self) -> MicroBatch:
        x, y = self.loader.next_batch()
        dev = self.rt.device
        return lm_micro_batch(self.model, x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), self.rt.autocast,
                              self.step_flops)

    def step_metrics(self) -> dict:
        return {"sparsity": self.sparsity["total"]}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        dev = self.rt.device
        self.model.eval()
        losses = []
        for x, y in self.val_batches:
            with self.rt.autocast():
                _, loss = self.model(x.to(dev), y.to(dev))
            losses.append(loss.item())
        self.model.train()
        val = float(np.mean(losses))
        self.last_val = val
        self.best_val = min(self.best_val, val)
        self.sparsity = measure_sparsity(self.model)
        out = {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0)), "sparsity": self.sparsity["total"]}
        out.update({f"sparsity/{k}": v for k, v in self.sparsity["layers"].items()})
        self.report.evaluation(step, registry.LM, "val", {"loss": val, "perplexity": out["val_perplexity"]})
        return out

    # -- what it saves ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": packed_state_dict(self.model), "masks": masks_state(self.model), "data": self.loader.state(),
                "best_val": self.best_val, "kernels": self.kernels,
                "kernel_trial": self.trial.state() if self.trial else None, "kernels_timed": self.kernels_timed}

    def kernel_note(self) -> str:
        """Why the kernels make this run not bitwise repeatable from its config ('' when they do not)."""
        return TIMED_NOTE if self.kernels_timed else ""

    def load_state(self, ck: dict) -> None:
        # build() installed this checkpoint's masks already (the FLOP model and kernels count them)
        self.model.load_state_dict(ck["model"])
        self.model.to(self.rt.device)
        self.loader.load_state(ck["data"])
        self.best_val = ck.get("best_val", math.inf)
        self.step = int(ck.get("step", 0))

    def summary(self) -> dict:
        return {"val_loss": self.last_val, "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                "sparsity": self.sparsity["total"], "vocab_size": self.vocab_size}
