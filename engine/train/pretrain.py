"""The vocabulary and sparse pre-training stages.

corpus → tokenizer (learned here, or the parent's) → cached token blocks → GPT with static masks →
AdamW loop with warm-up + cosine, clipping, accumulation, validation, atomic checkpoints, resume,
pause/stop between steps, and one metrics call per step fanned out to events and the database.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from engine.model.checkpoint import checkpoint_name, load_checkpoint, save_checkpoint
from engine.train.control import Control
from engine.data.corpus import load_corpus
from engine.core.errors import InputError
from engine.data.tokens import BlockLoader, check_enough_tokens, tokenize_corpus
from engine.model.flops import flop_model_for
from engine.model.gpt import GPT
from engine.train.optim import make_optimizer, make_scheduler
from engine.train.session import RunSession
from engine.train.loop import StageLoop
from engine.train.step import train_step
from engine.model.sparsity import apply_sparsity, load_masks, masks_state, measure_sparsity, sparse_param_counts
from engine.data.vocab import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_tokenizer


def parent_tokenizer_path(db, parent_id: str) -> Path:
    parent = db.get_run(parent_id)
    if parent is None:
        raise InputError(f"parent run not found: {parent_id}", key="parent")
    path = Path(parent["run_dir"]) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"parent run {parent_id} has no tokenizer ({path})", key="parent", path=str(path))
    return path


def prepare_tokenizer(s: RunSession, documents: list[str], resuming: bool):
    """Learn the vocabulary, or reuse the parent's (or this run's own when resuming)."""
    own = s.run_dir / TOKENIZER_FILE
    if resuming and own.is_file():
        return load_tokenizer(own)
    cfg = s.cfg
    if cfg.parent:
        tok = load_tokenizer(parent_tokenizer_path(s.db, cfg.parent))
        s.info(f"reusing the tokenizer of parent run {cfg.parent} ({tok.get_vocab_size()} tokens)")
    else:
        t = time.monotonic()
        s.info(f"learning a byte-level BPE vocabulary of {cfg.tokenizer.vocab_size} tokens on {len(documents)} documents")
        tok = train_tokenizer(documents, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency, cfg.tokenizer.lowercase,
                              progress=lambda d, n: s.progress("tokenizer", d, n))
        s.info(f"vocabulary learned in {time.monotonic() - t:.1f}s ({tok.get_vocab_size()} tokens)")
    path = save_tokenizer(tok, s.run_dir)
    s.db.add_artifact(s.run_id, "tokenizer", str(path), {"vocab_size": tok.get_vocab_size()})
    return tok


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def choose_kernels(s: RunSession, model: GPT, tokens_per_batch: int, device: torch.device) -> dict[str, str]:
    """Pick the matmul path per sparse layer: forced by sparsity.kernel, or timed once per shape (auto)."""
    layers = {n: m for n, m in model.sparse_layers().items() if m.is_sparse}
    want = s.cfg.sparsity.kernel
    if not layers:
        return {}
    if device.type != "cpu":
        choice = {n: "dense" for n in layers}  # GPU runs use cuBLAS on the masked weight
    else:
        try:
            from engine.model.kernels import kernel_available, time_kernels
            ok = kernel_available()
        except ImportError:
            ok = False
        if not ok:
            if want == "sparse":
                s.warn("the sparse matmul core is unavailable here; using the masked dense path")
            choice = {n: "dense" for n in layers}
        elif want in ("dense", "sparse"):
            choice = {n: want for n in layers}
        else:
            by_shape: dict[tuple, str] = {}
            timings = {}
            choice = {}
            for name, m in layers.items():
                key = (m.out_features, m.in_features)
                if key not in by_shape:
                    t = time_kernels(m.pattern(), tokens_per_batch)
                    by_shape[key] = "sparse" if t["sparse_ms"] < t["dense_ms"] else "dense"
                    timings["x".join(map(str, key))] = {**t, "kernel": by_shape[key]}
                choice[name] = by_shape[key]
            s.db.merge_meta(s.run_id, kernel_timings=timings)
            s.info("kernel choice per layer shape (out x in): " + ", ".join(
                f"{k}: {v['kernel']} (dense {v['dense_ms']:.1f} ms, sparse {v['sparse_ms']:.1f} ms)" for k, v in timings.items()))
    for name, m in layers.items():
        m.set_kernel(choice[name])
    return choice


def summary_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if v is not None}


class Pretrainer(StageLoop):
    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        s, cfg = self.s, self.cfg
        tc = cfg.train
        self.start_runtime()

        t = time.monotonic()
        corpus = load_corpus(cfg.data.corpus, cfg.data.text_field, cfg.data.max_documents)
        s.info(f"corpus: {len(corpus.documents)} documents, {corpus.n_chars:,} characters from {'; '.join(corpus.sources)}")
        self.tok = prepare_tokenizer(s, corpus.documents, self.resume_ckpt is not None)
        self.vocab_size = self.tok.get_vocab_size()
        if cfg.stage == "vocab":
            return
        cache_dir = s.run_dir.parent / ".cache"
        splits = tokenize_corpus(corpus, self.tok, cfg.data.val_fraction, tc.seed, cache_dir,
                                 progress=lambda d, n: s.progress("tokenize", d, n))
        s.info(f"tokens: {len(splits.train):,} train ({splits.n_train_docs} docs), {len(splits.val):,} validation "
               f"({splits.n_val_docs} docs){' from cache' if splits.from_cache else ''}; data ready in {time.monotonic() - t:.1f}s")
        check_enough_tokens(splits, cfg.model.n_ctx)
        self.train_loader = BlockLoader(splits.train, cfg.model.n_ctx, tc.batch_size, tc.seed)
        self.val_batches = BlockLoader(splits.val, cfg.model.n_ctx, tc.batch_size, tc.seed, shuffle=False).fixed_batches(tc.eval_batches)
        epochs = tc.max_steps * tc.batch_size * tc.grad_accum / self.train_loader.n_blocks
        if epochs > 10:
            s.warn(f"the run covers the training data {epochs:.1f} times; expect overfitting (use a larger corpus or fewer steps)")

        self.model = GPT(cfg.model, self.vocab_size)
        apply_sparsity(self.model, cfg.sparsity.level, cfg.sparsity.distribution, tc.seed)
        self.model.to(self.device)
        self.opt = make_optimizer(list(self.model.named_parameters()), tc)
        self.sched = make_scheduler(self.opt, tc)
        self.step = 0
        self.tokens = 0
        self.flops = 0.0
        self.flops_dense = 0.0
        self.wall_offset = 0.0
        self.best_val = math.inf
        self._trial = None  # kernel trial over the first steps (auto)
        self.last_val = None
        kernels = None
        if self.resume_ckpt:
            kernels = self._load(self.resume_ckpt)
        self.fm = flop_model_for(self.model)
        self.tokens_per_step = tc.batch_size * tc.grad_accum * cfg.model.n_ctx
        if kernels:
            for name, m in self.model.sparse_layers().items():
                m.set_kernel(kernels.get(name, "dense"))
            self.kernels = kernels
        else:
            self.kernels = choose_kernels(s, self.model, tc.batch_size * cfg.model.n_ctx, self.device)
            if cfg.sparsity.kernel == "auto" and "sparse" in self.kernels.values():
                # per-shape timings of isolated matmuls do not always predict a whole step (caches,
                # threads): the first real steps alternate the mix with all-dense and keep the faster
                self._trial = {"plan": ["dense", "mix"] * 3, "times": {"dense": [], "mix": []}, "mix": dict(self.kernels)}
        counts = sparse_param_counts(self.model)
        self.sparsity = measure_sparsity(self.model)
        s.db.merge_meta(s.run_id, params=counts, vocab_size=self.vocab_size, kernels=self.kernels,
                        flops_per_token={"dense": self.fm.train_per_token(False), "sparse": self.fm.train_per_token(True)},
                        train_tokens=int(len(splits.train)), val_tokens=int(len(splits.val)))
        s.info(f"model: {counts['total']:,} parameters, {counts['nonzero']:,} nonzero; sparsity {self.sparsity['total']:.3f}; "
               f"training FLOPs per token {self.fm.train_per_token(True):.3g} sparse vs {self.fm.train_per_token(False):.3g} dense "
               f"({self.fm.saving():.2f}x); device {self.device}")

    def _load(self, path: str) -> dict:
        ck = load_checkpoint(path)
        if ck.get("vocab_size") != self.vocab_size:
            raise InputError(f"checkpoint {path} was trained with {ck.get('vocab_size')} tokens, the tokenizer has {self.vocab_size}",
                             path=str(path))
        load_masks(self.model, ck["masks"])
        self.model.load_state_dict(ck["model"])
        self.model.to(self.device)
        self.opt.load_state_dict(ck["optimizer"])
        for group in self.opt.param_groups:
            for p in group["params"]:
                moment = self.opt.state.get(p, {}).get("exp_avg")
                if moment is not None and moment.shape != p.shape:
                    # checkpoints from before masked matrices were stored packed hold dense moments
                    raise InputError(f"checkpoint {path} holds optimizer state of shape {tuple(moment.shape)} for a "
                                     f"parameter of shape {tuple(p.shape)}: it was written by an older version and "
                                     "cannot be resumed; fine-tune or export from it, or start a new run", path=str(path))
        self.sched.load_state_dict(ck["scheduler"])
        self.train_loader.load_state(ck["data"])
        set_rng_state(ck["rng"])
        self.step, self.tokens = ck["step"], ck["tokens"]
        self.flops, self.flops_dense, self.wall_offset = ck["flops"], ck["flops_dense"], ck["wall_time"]
        self.best_val = ck.get("best_val", math.inf)
        self.s.db.truncate_metrics(self.s.run_id, self.step)
        self.s.info(f"resumed from {path} at step {self.step}")
        return ck.get("kernels") or {}

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> str:
        s, tc = self.s, self.cfg.train
        s.start(0 if self.cfg.stage == "vocab" else tc.max_steps)
        self.setup()
        if self.cfg.stage == "vocab":
            s.finish("completed", 0, {"vocab_size": self.vocab_size})
            return "completed"
        logger = s.metrics_logger(tc.max_steps)
        self.model.train()
        status = self.run_steps(logger)
        self.save(final=True)
        s.finish(status, self.step, self.summary())
        return status

    # -- the loop's hooks (StageLoop.run_steps) ----------------------------------------------------
    def before_step(self) -> None:
        self._in_trial = self._trial["plan"].pop(0) if self._trial and self._trial["plan"] else None
        if self._in_trial:
            self._set_kernels(self._trial["mix"] if self._in_trial == "mix" else {n: "dense" for n in self.kernels})

    def after_step(self, seconds: float, tokens: int) -> None:
        if self._in_trial:
            self._record_trial(self._in_trial, seconds)
        self.flops += self.fm.train_per_token(True) * tokens
        self.flops_dense += self.fm.train_per_token(False) * tokens

    def step_metrics(self) -> dict:
        return {"sparsity": self.sparsity["total"]}

    def evaluates_at(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 or step == self.cfg.train.max_steps

    def evaluate_now(self) -> dict:
        return self.evaluate()

    def final_metrics(self, status: str) -> dict:
        # a stopped run gets a last validation unless its last step had one
        if status == "stopped" and self.step > 0 and self.step % self.cfg.train.eval_every:
            return self.evaluate()
        return {}

    def _set_kernels(self, choice: dict[str, str]) -> None:
        for name, m in self.model.sparse_layers().items():
            if name in choice:
                m.set_kernel(choice[name])

    def _record_trial(self, variant: str, seconds: float) -> None:
        times = self._trial["times"]
        times[variant].append(seconds)
        if self._trial["plan"]:
            return
        dense, mix = min(times["dense"]), min(times["mix"])  # min: the first steps also pay warm-up costs
        self.kernels = self._trial["mix"] if mix < dense else {n: "dense" for n in self.kernels}
        self._set_kernels(self.kernels)
        self._trial = None
        self.s.db.merge_meta(self.s.run_id, kernels=self.kernels, kernel_trial={"dense_step_s": dense, "mix_step_s": mix})
        self.s.info(f"kernel trial over the first steps: per-shape choice {mix * 1000:.0f} ms/step, all dense "
                    f"{dense * 1000:.0f} ms/step; keeping {'the per-shape choice' if mix < dense else 'dense'}")

    def train_step(self) -> tuple[float, float, int]:
        tc = self.cfg.train

        def batches():
            for _ in range(tc.grad_accum):
                x, y = self.train_loader.next_batch()
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

        loss, grad_norm = train_step(self.model, self.opt, batches(), tc.grad_accum, tc.grad_clip, self.autocast)
        self.sched.step()
        return loss, grad_norm, self.tokens_per_step

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses = []
        for x, y in self.val_batches:
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            losses.append(loss.item())
        self.model.train()
        val = float(np.mean(losses))
        self.last_val = val
        self.best_val = min(self.best_val, val)
        self.sparsity = measure_sparsity(self.model)
        out = {"val_loss": val, "val_perplexity": math.exp(min(val, 50.0)), "sparsity": self.sparsity["total"]}
        out.update({f"sparsity/{k}": v for k, v in self.sparsity["layers"].items()})
        self.s.events.emit("eval", run_id=self.s.run_id, step=self.step, split="val",
                           metrics={"loss": val, "perplexity": out["val_perplexity"]})
        self.s.db.add_evaluation(self.s.run_id, self.step, "lm", "val", {"loss": val, "perplexity": out["val_perplexity"]})
        self.s.db.update_run(self.s.run_id, summary=self.summary())
        return out

    def summary(self) -> dict:
        last = self.s.db.db.execute(
            "SELECT value FROM metrics WHERE run_id = ? AND name = 'loss' ORDER BY step DESC LIMIT 1", [self.s.run_id]
        ).fetchone()
        return summary_of({
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "flops_dense": self.flops_dense,
            "wall_time": self.wall(), "train_loss": last[0] if last else None, "val_loss": self.last_val,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "sparsity": self.sparsity["total"], "vocab_size": self.vocab_size,
        })

    def save(self, final: bool) -> None:
        path = self.s.run_dir / "checkpoints" / checkpoint_name(self.step)
        state = {
            "format": 1, "stage": self.cfg.stage, "config": self.cfg.to_dict(), "vocab_size": self.vocab_size,
            "model": self.model.state_dict(), "masks": masks_state(self.model),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "data": self.train_loader.state(), "rng": rng_state(), "step": self.step, "tokens": self.tokens,
            "flops": self.flops, "flops_dense": self.flops_dense, "wall_time": self.wall(), "best_val": self.best_val,
            "kernels": self.kernels, "tokenizer": TOKENIZER_FILE,
        }
        nbytes = save_checkpoint(state, path)
        self.s.db.add_checkpoint(self.s.run_id, self.step, self.tokens, str(path), nbytes, final)
        self.s.db.update_run(self.s.run_id, summary=self.summary())
        self.s.events.emit("checkpoint", run_id=self.s.run_id, step=self.step, path=str(path), bytes=nbytes, final=final)


def run_pretrain(s: RunSession, control: Control, resume_ckpt: str | None = None) -> str:
    try:
        return Pretrainer(s, control, resume_ckpt).run()
    except (InputError, InputError) as e:
        raise InputError(str(e), key=getattr(e, "key", None), path=getattr(e, "path", None)) from None
