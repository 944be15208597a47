"""Dense fine-tuning and soft prompting: the second and third MediSwift stages.

Both start from a parent run's latest checkpoint and reuse (copy) its tokenizer. Fine-tuning drops
the parent's masks so every weight trains (SPDF); prompting freezes the model and trains only N
virtual-token embeddings in front of the input (plus nothing else). The loop follows pretrain.py:
session events, pause/stop, one metrics call per step, dev evaluation at ``train.eval_every`` and
at the end (stored with the majority and zero-shot baselines), atomic checkpoints and resume.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from engine.model.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from engine.core.config import ModelConfig, RunConfig
from engine.train.control import Control
from engine.data.corpus import load_corpus
from engine.core.errors import InputError
from engine.data.tokens import BlockLoader, check_enough_tokens, tokenize_corpus
from engine.tasks.scoring import Scorer, evaluate_examples, head_loss, head_targets, headline, majority_baseline
from engine.model.flops import FlopModel
from engine.model.gpt import GPT
from engine.train.optim import make_optimizer, make_scheduler
from engine.train.pretrain import rng_state, set_rng_state, summary_of
from engine.model.soft_prompt import PROMPT_FILE, SoftPrompt, init_ids, nearest_tokens, save_prompt
from engine.train.session import RunSession
from engine.train.loop import StageLoop
from engine.tasks import get_task
from engine.tasks.base import Encoder, ExampleLoader, Truncation, collate_lm, collate_prompts
from engine.data.vocab import TOKENIZER_FILE, load_tokenizer

PARENT_STAGES = ("pretrain", "finetune")
SHAPE_KEYS = ("n_layer", "n_head", "d_model", "dropout", "bias")
MIN_TOKENS = 16  # room left for text after the soft prompt


# -- before the run exists: check the parent and resolve the model shape ----------------------------


def _parent(db, cfg: RunConfig) -> tuple[dict, dict]:
    parent = db.get_run(cfg.parent)
    if parent is None:
        raise InputError(f"parent run not found: {cfg.parent}", key="parent")
    if parent["stage"] not in PARENT_STAGES:
        raise InputError(f"parent run {parent['id']} is a {parent['stage']} run; {cfg.stage} needs a pre-training "
                         f"or fine-tuning run (a model checkpoint) as parent", key="parent")
    ck = db.latest_checkpoint(parent["id"])
    if ck is None or not Path(ck["path"]).is_file():
        raise InputError(f"parent run {parent['id']} has no checkpoint to start from", key="parent")
    tok_path = Path(parent["run_dir"]) / TOKENIZER_FILE
    if not tok_path.is_file():
        raise InputError(f"parent run {parent['id']} has no tokenizer ({tok_path})", key="parent", path=str(tok_path))
    return parent, ck


def child_config(cfg: RunConfig, db, explicit: set[str] | None = None, resuming: bool = False) -> RunConfig:
    """Check a fine-tuning/prompting config against its parent; give it the parent's model shape.

    model.* keys are overwritten by the parent's; model.n_ctx may be set (``explicit``) up to the
    parent's n_positions, and otherwise is the parent's. Raises InputError (exit code 2).
    """
    parent, _ = _parent(db, cfg)
    if cfg.stage == "prompt" and cfg.task.head == "classifier":
        raise InputError("soft prompting trains on the LM form of the task; set task.head = 'lm'", key="task.head")
    tok = load_tokenizer(Path(parent["run_dir"]) / TOKENIZER_FILE)
    pv = parent["meta"].get("vocab_size")
    if pv is not None and pv != tok.get_vocab_size():
        raise InputError(f"tokenizer mismatch: parent run {parent['id']} was trained with {pv} tokens but its "
                         f"tokenizer.json has {tok.get_vocab_size()}", key="parent", path=parent["run_dir"])
    pm = ModelConfig(**parent["config"]["model"])
    if resuming:
        model = cfg.model
    else:
        explicit = explicit if explicit is not None else ({"model.n_ctx"} if cfg.model.n_ctx != ModelConfig().n_ctx else set())
        n_ctx = cfg.model.n_ctx if "model.n_ctx" in explicit else pm.n_ctx
        if n_ctx > pm.max_positions:
            raise InputError(f"model.n_ctx ({n_ctx}) exceeds the parent model's maximum context ({pm.max_positions} "
                             f"positions)", key="model.n_ctx")
        model = dataclasses.replace(pm, n_ctx=n_ctx, n_positions=pm.max_positions)
    if cfg.stage == "prompt" and model.n_ctx - cfg.prompt.n_tokens < MIN_TOKENS:
        raise InputError(f"prompt.n_tokens ({cfg.prompt.n_tokens}) leaves fewer than {MIN_TOKENS} of the "
                         f"{model.n_ctx} context positions for text", key="prompt.n_tokens")
    if cfg.stage == "prompt" and cfg.prompt.init == "text" and not cfg.prompt.init_text.strip():
        raise InputError("prompt.init is 'text' but prompt.init_text is empty", key="prompt.init_text")
    if cfg.task.name != "lm":
        get_task(cfg.task.name).train_dev(cfg.task, cfg.data.val_fraction, cfg.train.seed, lambda m: None)
    d = cfg.to_dict()
    d["model"] = dataclasses.asdict(model)
    from engine.core.config import from_dict

    return from_dict(d)


# -- the run -----------------------------------------------------------------------------------------


class FineTuner(StageLoop):
    def __init__(self, s: RunSession, control: Control, resume_ckpt: str | None = None):
        super().__init__(s, control, resume_ckpt)
        self.prompting = self.cfg.stage == "prompt"

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        s, cfg, tc = self.s, self.cfg, self.cfg.train
        self.start_runtime()
        resume = load_checkpoint(self.resume_ckpt) if self.resume_ckpt else None

        parent, ck_row = _parent(s.db, cfg)
        self.parent_ckpt = resume["parent_checkpoint"] if resume else ck_row["path"]
        if not Path(self.parent_ckpt).is_file():
            raise InputError(f"the parent checkpoint is gone: {self.parent_ckpt}", key="parent", path=self.parent_ckpt)
        pck = load_checkpoint(self.parent_ckpt)
        if pck.get("stage") not in PARENT_STAGES:
            raise InputError(f"{self.parent_ckpt} is a {pck.get('stage')} checkpoint, not a model", key="parent")
        self.tok = self._tokenizer(parent)
        self.vocab_size = self.tok.get_vocab_size()
        if self.vocab_size != pck["vocab_size"]:
            raise InputError(f"tokenizer mismatch: the tokenizer has {self.vocab_size} tokens, the parent checkpoint "
                             f"{self.parent_ckpt} was trained with {pck['vocab_size']}", key="parent",
                             path=str(self.s.run_dir / TOKENIZER_FILE))
        pm = ModelConfig(**pck["config"]["model"])
        if any(getattr(pm, k) != getattr(cfg.model, k) for k in SHAPE_KEYS) or pm.max_positions != cfg.model.max_positions:
            raise InputError(f"the run's model shape differs from the parent checkpoint's ({pm}); model.* settings of "
                             f"a {cfg.stage} run come from the parent", key="model")

        # the model: the parent's weights, masks dropped (fine-tuning) or frozen (prompting)
        self.model = GPT(cfg.model, self.vocab_size)
        self.model.load_state_dict(pck["model"])
        masked = {n: m for n, m in (pck.get("masks") or {}).items()}
        numel = sum(m.weight.numel() for m in self.model.sparse_layers().values())
        nnz = numel - sum(int((~m).sum()) for m in masked.values())
        self.model.to(self.device)
        self.head = None
        self.prompt = None
        if self.prompting:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()  # frozen: no dropout either, so the model is exactly the parent's function
            self.prompt = SoftPrompt(cfg.prompt.n_tokens, cfg.model.d_model).to(self.device)
            ids = init_ids(self.tok, cfg.prompt, tc.seed)
            with torch.no_grad():
                self.prompt.weight.copy_(self.model.wte.weight[torch.tensor(ids, device=self.device)])
            self.prompt_init_ids = ids
        else:
            self.model.train()
            if masked:
                s.info(f"dropped the parent's masks: {numel - nnz:,} of {numel:,} sparse-layer weights were zero "
                       f"and now train (dense fine-tuning)")
        self.task_mod = get_task(cfg.task.name) if cfg.task.name != "lm" else None
        if self.task_mod is not None and cfg.task.head == "classifier":
            self.head = nn.Linear(cfg.model.d_model, len(self.task_mod.CLASSES))
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            self.head.to(self.device)
        self.n_prefix = cfg.prompt.n_tokens if self.prompting else 0
        self.budget = cfg.model.n_ctx - self.n_prefix
        self.scorer = Scorer(self.model, self.prompt, self.head, self.device, tc.batch_size, self.autocast)

        self._data()

        # FLOPs: fine-tuning is dense (every weight trains). Prompting runs the frozen parent forward
        # (its nonzeros for the sparse counter) and backward only for activation gradients, down to
        # the prompt: ~2 x forward instead of 3 x, since no weight gradients are formed.
        self.fm = FlopModel(cfg.model.n_layer, cfg.model.d_model, cfg.model.n_ctx, self.vocab_size, numel,
                            nnz if self.prompting else numel)
        self.train_factor = 2.0 if self.prompting else 3.0

        if self.prompting:
            params = [self.prompt.weight]
            self.opt = torch.optim.AdamW(params, lr=cfg.prompt.lr, betas=(tc.beta1, tc.beta2), eps=1e-8,
                                         weight_decay=0.0, foreach=False)  # decay would shrink the prompt toward 0
        else:
            named = list(self.model.named_parameters()) + (list(self.head.named_parameters()) if self.head else [])
            self.opt = make_optimizer(named, tc)
        self.trainable = [p for g in self.opt.param_groups for p in g["params"]]
        self.sched = make_scheduler(self.opt, tc)
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.flops_dense = 0.0
        self.wall_offset = 0.0
        self.last_dev: dict = {}
        self.best: float | None = None
        self.baselines: dict = {}
        if resume is not None:
            self._load(resume)
        else:
            self.baselines = self._baselines()
            s.db.merge_meta(s.run_id, baselines=self.baselines)
        n_train = sum(p.numel() for p in self.trainable)
        s.db.merge_meta(s.run_id, vocab_size=self.vocab_size, parent_checkpoint=self.parent_ckpt,
                        trainable_params=n_train, params={"total": self.model.num_params(), "sparse_numel": numel,
                                                          "parent_nonzero": nnz}, task=self.data_info)
        s.info(f"{cfg.stage}: {self.model.num_params():,} model parameters, {n_train:,} trainable; task {cfg.task.name}; "
               f"context {cfg.model.n_ctx} tokens{f' ({self.n_prefix} of them the soft prompt)' if self.prompting else ''}; "
               f"device {self.device}")

    def _tokenizer(self, parent: dict):
        own = self.s.run_dir / TOKENIZER_FILE
        if not (self.resume_ckpt and own.is_file()):
            shutil.copyfile(Path(parent["run_dir"]) / TOKENIZER_FILE, own)
            self.s.db.add_artifact(self.s.run_id, "tokenizer", str(own), {"from_run": parent["id"]})
            self.s.info(f"reusing the tokenizer of parent run {parent['id']}")
        return load_tokenizer(own)

    def _data(self) -> None:
        s, cfg, tc = self.s, self.cfg, self.cfg.train
        if self.task_mod is None:
            corpus = load_corpus(cfg.data.corpus, cfg.data.text_field, cfg.data.max_documents)
            splits = tokenize_corpus(corpus, self.tok, cfg.data.val_fraction, tc.seed, s.run_dir.parent / ".cache",
                                     progress=lambda d, n: s.progress("tokenize", d, n))
            check_enough_tokens(splits, self.budget)
            self.loader = BlockLoader(splits.train, self.budget, tc.batch_size, tc.seed)
            self.val_batches = BlockLoader(splits.val, self.budget, tc.batch_size, tc.seed, shuffle=False).fixed_batches(tc.eval_batches)
            self.data_info = {"name": "lm", "train_tokens": int(len(splits.train)), "val_tokens": int(len(splits.val)),
                              "corpus": corpus.sources}
            s.info(f"lm: {len(splits.train):,} training tokens, {len(splits.val):,} validation tokens")
            return
        train, dev, info = self.task_mod.train_dev(cfg.task, cfg.data.val_fraction, tc.seed, s.warn)
        if cfg.task.max_examples:
            train, dev = train[:cfg.task.max_examples], dev[:cfg.task.max_examples]
        overlap = {e.id for e in train} & {e.id for e in dev}
        if overlap:
            s.warn(f"{len(overlap)} development examples are also training examples")
        self.enc = Encoder(self.tok, self.budget)
        trunc = Truncation()
        if self.head is not None:
            self.train_prompts = [self.enc.prompt(ex, 0, trunc) for ex in train]
        else:
            kept, self.train_enc = [], []
            for ex in train:
                try:
                    self.train_enc.append(self.enc.train(ex, trunc))
                    kept.append(ex)
                except InputError:
                    pass  # its answer alone overflows the window
            if len(kept) < len(train):
                s.warn(f"{len(train) - len(kept)} of {len(train)} training examples were skipped: their answer does "
                       f"not fit the {self.budget}-token window")
            if not kept:
                raise InputError(f"no training example fits the {self.budget}-token window; use a larger model.n_ctx", key="model.n_ctx")
            train = kept
        self.train, self.dev = train, dev
        msg = trunc.message(f"{cfg.task.name} training", len(train), self.budget)
        if msg:
            s.warn(msg)
        self.dev_trunc = Truncation()
        self.loader = ExampleLoader(len(train), tc.batch_size, tc.seed)
        self.data_info = {"name": cfg.task.name, **info, "n_train": len(train), "n_dev": len(dev),
                          "train_context_truncated": len(trunc.context)}
        s.info(f"{cfg.task.name}: {len(train)} training and {len(dev)} development examples"
               + (f" (fold {info['fold']} of {info['splits']})" if "fold" in info else ""))

    def _baselines(self) -> dict:
        """Majority class of the training labels, and the parent model scored the same way (zero-shot)."""
        out: dict = {}
        if self.task_mod is not None:
            out["majority"] = majority_baseline(self.task_mod, self.train, self.dev)
        if self.head is not None:
            out["zero_shot"] = {"skipped": "a new classification head has no zero-shot form"}
            return out
        # the parent as it was: no prompt, no head, no training
        plain = Scorer(self.model, None, None, self.device, self.cfg.train.batch_size, self.autocast)
        if self.task_mod is None:
            out["zero_shot"] = self._val_loss(plain)
        else:
            m = evaluate_examples(plain, Encoder(self.tok, self.cfg.model.n_ctx), self.task_mod, self.dev, self.cfg.task)
            m.pop("f1_per_class", None)
            out["zero_shot"] = m
        self.s.info("baselines on dev: " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {v:.4f}" for n, v in headline(self.cfg.task.name, m).items())
            for k, m in out.items() if "skipped" not in m))
        return out

    def _load(self, ck: dict) -> None:
        if self.prompting:
            self.prompt.weight.data.copy_(ck["prompt"])
        else:
            self.model.load_state_dict(ck["model"])
        if self.head is not None and ck.get("head"):
            self.head.load_state_dict(ck["head"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.loader.load_state(ck["data"])
        set_rng_state(ck["rng"])
        self.step, self.tokens = ck["step"], ck["tokens"]
        self.flops, self.flops_dense, self.wall_offset = ck["flops"], ck["flops_dense"], ck["wall_time"]
        self.best, self.last_dev = ck.get("best"), ck.get("last_dev") or {}
        self.baselines = ck.get("baselines") or {}
        self.s.db.truncate_metrics(self.s.run_id, self.step)
        self.s.info(f"resumed from {self.resume_ckpt} at step {self.step}")

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> str:
        s, tc = self.s, self.cfg.train
        s.start(tc.max_steps)
        self.setup()
        logger = s.metrics_logger(tc.max_steps)
        status = self.run_steps(logger)
        self.save(final=True)
        s.finish(status, self.step, self.summary())
        return status

    # -- the loop's hooks (StageLoop.run_steps) ----------------------------------------------------
    def evaluates_at(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 and step < self.cfg.train.max_steps

    def evaluate_now(self) -> dict:
        return self.evaluate(final=False)

    def final_metrics(self, status: str) -> dict:
        # the last dev evaluation also stores the baselines next to the run's score
        return self.evaluate(final=True) if self.step > 0 else {}

    def _batch_loss(self) -> tuple[torch.Tensor, int, int]:
        """Loss of one micro-batch, its (unpadded-shape) token count and its sequence length with prefix."""
        if self.task_mod is None:
            x, y = self.loader.next_batch()
            loss = self.scorer.lm_loss(x, y)
        elif self.head is not None:
            idx = self.loader.next_indices()
            x, last = collate_prompts([self.train_prompts[i] for i in idx], self.enc.pad)
            with self.autocast():
                logits = self.scorer.head_logits(x, last)
            loss = head_loss(self.task_mod, logits.float(), head_targets(self.task_mod, [self.train[i].label for i in idx]))
        else:
            idx = self.loader.next_indices()
            x, y = collate_lm([self.train_enc[i] for i in idx], self.enc.pad)
            loss = self.scorer.lm_loss(x, y)
        return loss, x.numel(), x.shape[1] + self.n_prefix

    def train_step(self) -> tuple[float, float, int]:
        tc = self.cfg.train
        self.opt.zero_grad(set_to_none=True)
        total, n_tok = 0.0, 0
        for _ in range(tc.grad_accum):
            loss, n, L = self._batch_loss()
            (loss / tc.grad_accum).backward()
            total += loss.item()
            n_tok += n
            # every position of the padded batch is computed, soft-prompt positions included
            fm = dataclasses.replace(self.fm, n_ctx=L)
            positions = n // (L - self.n_prefix) * L
            self.flops += self.train_factor * fm.forward_per_token(True) * positions
            self.flops_dense += self.train_factor * fm.forward_per_token(False) * positions
        if tc.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, tc.grad_clip))
        else:
            grad_norm = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.trainable if p.grad is not None)))
        self.opt.step()
        self.sched.step()
        return total / tc.grad_accum, grad_norm, n_tok

    @torch.no_grad()
    def _val_loss(self, scorer: Scorer) -> dict:
        was = self.model.training
        self.model.eval()
        losses = [float(scorer.lm_loss(x, y)) for x, y in self.val_batches]
        self.model.train(was and not self.prompting)
        val = float(np.mean(losses))
        return {"loss": val, "perplexity": math.exp(min(val, 50.0))}

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict:
        s, name = self.s, self.cfg.task.name
        if self.task_mod is None:
            m = self._val_loss(self.scorer)
            rows = {"val_loss": m["loss"], "val_perplexity": m["perplexity"]}
        else:
            first = not self.last_dev
            m = evaluate_examples(self.scorer, self.enc, self.task_mod, self.dev, self.cfg.task, self.dev_trunc)
            if first:
                msg = self.dev_trunc.message(f"{name} development", len(self.dev), self.budget)
                if msg:
                    s.warn(msg)
            rows = {f"dev_{k}": v for k, v in headline(name, m).items()}
        if not self.prompting:
            self.model.train()
        self.last_dev = m
        key = "loss" if self.task_mod is None else ("accuracy" if name == "pubmedqa" else "micro_f1")
        if self.best is None or (m[key] < self.best if key == "loss" else m[key] > self.best):
            self.best = m[key]
        s.events.emit("eval", run_id=s.run_id, step=self.step, split="dev", metrics=headline(name, m),
                      baselines={k: headline(name, v) for k, v in self.baselines.items() if "skipped" not in v})
        data_path = self.data_info.get("dev_file") or self.data_info.get("train_file", "")
        s.db.add_evaluation(s.run_id, self.step, name, "dev", m, self.baselines if final else None, data_path)
        if final:
            s.info(f"dev at step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(name, m).items())
                   + "".join(f"; {b}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(name, bm).items())
                             for b, bm in self.baselines.items() if "skipped" not in bm))
        s.db.update_run(s.run_id, summary=self.summary())
        return rows

    def summary(self) -> dict:
        last = self.s.db.db.execute(
            "SELECT value FROM metrics WHERE run_id = ? AND name = 'loss' ORDER BY step DESC LIMIT 1", [self.s.run_id]
        ).fetchone()
        name = self.cfg.task.name
        dev = {f"dev_{k}": v for k, v in headline(name, self.last_dev).items()} if self.last_dev else {}
        return summary_of({
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "flops_dense": self.flops_dense,
            "wall_time": self.wall() if hasattr(self, "_t_start") else self.wall_offset,
            "train_loss": last[0] if last else None, "val_loss": self.last_dev.get("loss"), "task": name,
            "best_dev": self.best, "vocab_size": self.vocab_size, "sparsity": 0.0 if not self.prompting else None, **dev,
        })

    def save(self, final: bool) -> None:
        path = self.s.run_dir / "checkpoints" / checkpoint_name(self.step)
        state = {
            "format": 1, "stage": self.cfg.stage, "config": self.cfg.to_dict(), "vocab_size": self.vocab_size,
            "masks": {}, "parent_checkpoint": self.parent_ckpt, "parent_run": self.cfg.parent,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "data": self.loader.state(),
            "rng": rng_state(), "step": self.step, "tokens": self.tokens, "flops": self.flops,
            "flops_dense": self.flops_dense, "wall_time": self.wall(), "best": self.best, "last_dev": self.last_dev,
            "baselines": self.baselines, "kernels": {}, "tokenizer": TOKENIZER_FILE,
        }
        if self.prompting:
            state["prompt"] = self.prompt.weight.detach().cpu().clone()  # the model itself stays the parent's file
        else:
            state["model"] = self.model.state_dict()
        if self.head is not None:
            state["head"] = self.head.state_dict()
        nbytes = save_checkpoint(state, path)
        self.s.db.add_checkpoint(self.s.run_id, self.step, self.tokens, str(path), nbytes, final)
        if self.prompting and final:
            self._save_prompt_artifact()
        self.s.db.update_run(self.s.run_id, summary=self.summary())
        self.s.events.emit("checkpoint", run_id=self.s.run_id, step=self.step, path=str(path), bytes=nbytes, final=final)

    def _save_prompt_artifact(self) -> None:
        w = self.prompt.weight.detach().cpu()
        wte = self.model.wte.weight.detach().cpu()
        nearest = nearest_tokens(w, wte, self.tok, k=5)
        meta = {"parent_run": self.cfg.parent, "parent_checkpoint": self.parent_ckpt, "n_tokens": int(w.shape[0]),
                "d_model": int(w.shape[1]), "vocab_size": self.vocab_size, "step": self.step, "task": self.cfg.task.name,
                "init": self.cfg.prompt.init, "init_tokens": [self.tok.decode([i]) for i in self.prompt_init_ids]}
        path = self.s.run_dir / PROMPT_FILE
        nbytes = save_prompt(path, w, meta)
        self.s.db.add_artifact(self.s.run_id, "prompt", str(path), {**meta, "bytes": nbytes, "nearest_tokens": nearest})
        self.s.db.merge_meta(self.s.run_id, prompt_nearest_tokens=[[t["token"] for t in row] for row in nearest])
        self.s.info(f"saved the soft prompt ({nbytes:,} bytes) to {path}; nearest tokens: "
                    + " | ".join(row[0]["token"] for row in nearest))


def run_finetune(s: RunSession, control: Control, resume_ckpt: str | None = None) -> str:
    try:
        return FineTuner(s, control, resume_ckpt).run()
    except (InputError, InputError, InputError) as e:
        raise InputError(str(e), key=getattr(e, "key", None), path=getattr(e, "path", None)) from None
