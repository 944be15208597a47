"""What fine-tuning and soft prompting share: both start from a parent run's model.

``child_config`` checks a child config against its parent before the run exists and gives it the
parent's model shape (a pre-training continuing an imported model takes it too); the task's files
are checked by engine.train.plan.check_task_data. ``ChildRun`` is the component both stages
compose: it loads the parent's weights (the checkpoint recorded at the start, when resuming), or
with ``train.init = "random"`` fresh weights of the parent's shape, reuses its tokenizer, builds the
task feed, counts FLOPs, scores the dev data with the baselines beside it and keeps the best score.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from engine.core import registry
from engine.core.config import INITS, ModelConfig, RunConfig, from_dict
from engine.core.errors import InputError
from engine.data.vocab import TOKENIZER_FILE, load_tokenizer
from engine.model.checkpoint import current_path, load_checkpoint
from engine.model.flops import FlopModel
from engine.model.gpt import GPT
from engine.model.runs import RunRef
from engine.tasks.scoring import Scorer, headline
from engine.train.identity import RunIdentity
from engine.train.reporter import Reporter
from engine.train.step import MicroBatch
from engine.train.task_feeds import make_feed

SHAPE_KEYS = ("n_layer", "n_head", "d_model", "dropout", "bias", "activation", "family", "n_kv_head", "d_ff",
              "rope_theta", "norm_eps", "tie_embeddings", "scale_embedding", "rope_scaling", "rope_factor",
              "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions")
MIN_TOKENS = 16  # room left for text after the soft prompt


def child_config(cfg: RunConfig, parent: RunRef, explicit: set[str] | None = None, resuming: bool = False) -> RunConfig:
    """Check a fine-tuning/prompting config against its parent (engine.model.runs.check_parent); give
    it the parent's model shape.

    model.* keys are overwritten by the parent's; model.n_ctx may be set (``explicit``) up to the
    parent's n_positions, and otherwise is the parent's. Raises InputError (exit code 2).
    """
    prompting = cfg.stage == registry.PROMPT
    tok = parent.tokenizer_object()
    pv = parent.run["meta"].get("vocab_size")
    if pv is not None and pv != tok.get_vocab_size():
        raise InputError(f"tokenizer mismatch: parent run {parent.id} was trained with {pv} tokens but its "
                         f"tokenizer.json has {tok.get_vocab_size()}", key="parent", path=str(parent.tokenizer))
    pm = parent.model_config
    if resuming:
        model = cfg.model
    else:
        explicit = explicit if explicit is not None else ({"model.n_ctx"} if cfg.model.n_ctx != ModelConfig().n_ctx else set())
        n_ctx = cfg.model.n_ctx if "model.n_ctx" in explicit else pm.n_ctx
        if n_ctx > pm.max_positions:
            raise InputError(f"model.n_ctx ({n_ctx}) exceeds the parent model's maximum context ({pm.max_positions} "
                             f"positions)", key="model.n_ctx")
        model = dataclasses.replace(pm, n_ctx=n_ctx, n_positions=pm.max_positions)
    if prompting and model.n_ctx - cfg.prompt.n_tokens < MIN_TOKENS:
        raise InputError(f"prompt.n_tokens ({cfg.prompt.n_tokens}) leaves fewer than {MIN_TOKENS} of the "
                         f"{model.n_ctx} context positions for text", key="prompt.n_tokens")
    if prompting and cfg.prompt.init == "text" and not cfg.prompt.init_text.strip():
        raise InputError("prompt.init is 'text' but prompt.init_text is empty", key="prompt.init_text")
    d = cfg.to_dict()
    d["model"] = dataclasses.asdict(model)
    if "tokenizer" in registry.stage(cfg.stage).sections:  # continuing an imported model: its vocabulary too
        d["tokenizer"]["vocab_size"] = tok.get_vocab_size()
    return from_dict(d)


class ChildRun:
    """The parent model, the task feed, FLOPs and dev evaluation of a fine-tuning or prompting run."""

    def __init__(self, run: RunIdentity, report: Reporter, rt, resume: dict | None):
        cfg = run.cfg
        self.run, self.report, self.rt, self.cfg = run, report, rt, cfg
        parent = run.parent
        self.parent_run = parent.id
        self.parent_ckpt = str(current_path(resume["parent_checkpoint"])) if resume else str(parent.checkpoint)
        if not Path(self.parent_ckpt).is_file():
            raise InputError(f"the parent checkpoint is gone: {self.parent_ckpt}", key="parent", path=self.parent_ckpt)
        pck = load_checkpoint(self.parent_ckpt)
        if pck.get("stage") not in registry.MODEL_STAGES:
            raise InputError(f"{self.parent_ckpt} is a {pck.get('stage')} checkpoint, not a model", key="parent")
        self.tok = rt.group.writer_first(lambda: self._tokenizer(parent.tokenizer, parent.id, resume is not None))
        self.vocab_size = self.tok.get_vocab_size()
        if self.vocab_size != pck["vocab_size"]:
            raise InputError(f"tokenizer mismatch: the tokenizer has {self.vocab_size} tokens, the parent checkpoint "
                             f"{self.parent_ckpt} was trained with {pck['vocab_size']}", key="parent",
                             path=str(run.run_dir / TOKENIZER_FILE))
        pm = ModelConfig(**pck["config"]["model"])
        if any(getattr(pm, k) != getattr(cfg.model, k) for k in SHAPE_KEYS) or pm.max_positions != cfg.model.max_positions:
            raise InputError(f"the run's model shape differs from the parent checkpoint's ({pm}); model.* settings of "
                             f"a {cfg.stage} run come from the parent", key="model")
        # the parent's weights, dense: its masks are not installed (fine-tuning trains every weight);
        # train.init = "random": the weights GPT draws from the seeded generator (the control run)
        self.model = GPT(cfg.model, self.vocab_size)
        self.random_init = cfg.train.init == INITS[1]
        masks = {} if self.random_init else (pck.get("masks") or {})
        if self.random_init:
            report.info(f"train.init = {cfg.train.init!r}: the parent's shape and tokenizer with fresh weights (seed "
                        f"{cfg.train.seed}); nothing of run {parent.id}'s training is used")
        else:
            self.model.load_state_dict(pck["model"])
        self.sparse_numel = sum(m.weight.numel() for m in self.model.sparse_layers().values())
        self.parent_nonzero = self.sparse_numel - sum(int((~m).sum()) for m in masks.values())
        self.parent_masked = bool(masks)
        self.model.to(rt.device)
        self.best: float | None = None
        self.last_dev: dict = {}
        self.baselines: dict = {}

    def _tokenizer(self, parent_tok: Path, parent_id: str, resuming: bool):
        own = self.run.run_dir / TOKENIZER_FILE
        if not ((resuming or not self.run.writer) and own.is_file()):
            shutil.copyfile(parent_tok, own)
            self.report.artifact("tokenizer", str(own), {"from_run": parent_id})
            self.report.info(f"reusing the tokenizer of parent run {parent_id}")
        return load_tokenizer(own)

    def start(self, prompt, head, train_factor: float, sparse_forward: bool, resume: dict | None,
              head_flops: bool = False) -> None:
        """Once the stage has its prompt/head: the scorer, the data, the FLOP model, the baselines.

        ``head_flops`` (soft prompting with a classification head): the step forms no vocabulary logits,
        so the parent's forward is counted without the LM head, and the head's own pooling and
        projection are counted apart (``_head_flops``), with its weight gradients."""
        cfg, tc = self.cfg, self.cfg.train
        self.n_prefix = prompt.weight.shape[0] if prompt is not None else 0
        self.scorer = Scorer(self.model, prompt, head, self.rt.device, tc.batch_size, self.rt.autocast)
        self.feed = make_feed(self.run, self.report, self.tok, cfg.model.n_ctx - self.n_prefix)
        # FLOPs: ``train_factor`` x forward (3 when weight gradients are formed, 2 when only activation
        # gradients flow back to a prompt); ``sparse_forward``: the forward of a frozen sparse parent
        # touches only its nonzeros (the sparse counter)
        self.flop_head = head if head_flops else None
        self.fm = FlopModel(cfg.model.n_layer, cfg.model.d_model, cfg.model.n_ctx,
                            0 if self.flop_head is not None else self.vocab_size, self.sparse_numel,
                            self.parent_nonzero if sparse_forward else self.sparse_numel)
        self.train_factor = train_factor
        if resume is None and self.run.writer:  # the baselines are rank 0's to record
            plain = Scorer(self.model, None, None, self.rt.device, tc.batch_size, self.rt.autocast)
            self.baselines = self.feed.baselines(plain, cfg)
            self.report.meta(baselines=self.baselines)
            self.report.info("baselines on dev: " + "; ".join(
                f"{k}: " + ", ".join(f"{n} {v:.4f}" for n, v in headline(self.feed.name, m).items())
                for k, m in self.baselines.items() if "skipped" not in m))

    def micro_batch(self) -> MicroBatch:
        b = self.feed.next(self.scorer)
        # every position of the padded batch is computed, soft-prompt positions included
        fm = dataclasses.replace(self.fm, n_ctx=b.seq_len)
        rows = b.tokens // (b.seq_len - self.n_prefix)
        positions = rows * b.seq_len
        head = self._head_flops(rows, b.tokens)
        return MicroBatch(b.loss, b.tokens, self.train_factor * fm.forward_per_token(True) * positions + head,
                          self.train_factor * fm.forward_per_token(False) * positions + head)

    def _head_flops(self, windows: int, text_positions: int) -> float:
        """A classification head's training FLOPs (counted with ``head_flops``): forward, then its weight
        and activation gradients (3 x forward). Its forward pools every text position of a window (the
        masked sum, 2 x d_model each; attention pooling also scores each position, 2 x d_model) and
        projects each window's vector to the classes (2 x d_model x classes)."""
        head = self.flop_head
        if head is None:
            return 0.0
        d = self.cfg.model.d_model
        per_position = 2 * d * (2 if hasattr(head, "attn") else 1)
        return 3.0 * (per_position * text_positions + 2 * d * head.proj.out_features * windows)

    def evaluate(self, step: int) -> dict:
        report, name = self.report, self.feed.name
        m = self.feed.evaluate(self.scorer)
        self.last_dev = m
        if self.best is None or (m[self.feed.key] < self.best if self.feed.lower_is_better else m[self.feed.key] > self.best):
            self.best = m[self.feed.key]
        scored = {k: headline(name, v) for k, v in self.baselines.items() if "skipped" not in v}
        data_path = self.feed.info.get("dev_file") or self.feed.info.get("train_file", "")
        report.evaluation(step, name, "dev", m, shown=headline(name, m), baselines=self.baselines, shown_baselines=scored,
                          data_path=data_path)
        report.info(f"dev at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(name, m).items())
                    + "".join(f"; {b}: " + ", ".join(f"{k} {v:.4f}" for k, v in bm.items()) for b, bm in scored.items()))
        return self.feed.rows(m)

    def dev_score(self) -> tuple[str, float, bool] | None:
        """The last development evaluation's headline metric: (name, value, lower is better)."""
        if not self.last_dev or self.last_dev.get(self.feed.key) is None:
            return None
        return self.feed.key, float(self.last_dev[self.feed.key]), self.feed.lower_is_better

    def meta(self, trainable: int) -> None:
        cfg, report = self.cfg, self.report
        report.meta(vocab_size=self.vocab_size, parent_checkpoint=self.parent_ckpt, trainable_params=trainable,
                    **({"init": cfg.train.init} if self.random_init else {}),
                    params={"total": self.model.num_params(), "sparse_numel": self.sparse_numel,
                            "parent_nonzero": self.parent_nonzero}, task=self.feed.info)
        report.info(f"{cfg.stage}: {self.model.num_params():,} model parameters, {trainable:,} trainable; task {cfg.task.name}; "
                    f"context {cfg.model.n_ctx} tokens{f' ({self.n_prefix} of them the soft prompt)' if self.n_prefix else ''}; "
                    f"device {self.rt.device}")

    def state(self) -> dict:
        return {"masks": {}, "kernels": {}, "parent_checkpoint": self.parent_ckpt, "parent_run": self.parent_run,
                "data": self.feed.loader.state(), "best": self.best, "last_dev": self.last_dev, "baselines": self.baselines}

    def load_state(self, ck: dict) -> None:
        self.feed.loader.load_state(ck["data"])
        self.best, self.last_dev = ck.get("best"), ck.get("last_dev") or {}
        self.baselines = ck.get("baselines") or {}

    def summary(self) -> dict:
        name = self.feed.name
        dev = {f"dev_{k}": v for k, v in headline(name, self.last_dev).items()} if self.last_dev else {}
        return {"val_loss": self.last_dev.get("loss"), "task": name, "best_dev": self.best, "vocab_size": self.vocab_size, **dev}
