"""The one training loop. It orchestrates the components every stage shares and asks the stage only
for what differs (its data, its loss, its evaluation, what it saves):

  runtime (threads, device, precision, seeds, process group)  ->  stage.build  ->  resume the stage's state
  -> Parallel (DDP / FSDP2 over the stage's trained modules; nothing on one process)  ->  optimizer + schedule
  -> resume the trainer state (Checkpointer)
  -> steps: control (stop / pause between steps, agreed by every rank), train_step, counters, metrics,
     Cadence (evaluation and checkpoints)  ->  last evaluation, final checkpoint, summary, run_finished.

A stage is any object with the methods of ``Stage`` below (engine/train/pretrain.py, finetune.py,
prompt.py); ``before_step()``, ``after_step(seconds)``, ``pending_metrics()``,
``on_final_checkpoint(step, best=(step, path))`` (``best`` only when an earlier evaluation was the best)
and ``dev_score()`` (the last evaluation's headline metric: what
early stopping and the best checkpoint go by, with train.epochs or train.early_stopping_patience)
are optional. It is handed the run's identity and a reporter
(engine.train.reporter), never the database.
In a process group every rank runs this loop; rank 0's reporter alone records and speaks.
"""
from __future__ import annotations

import math
import time
from typing import Protocol

import torch

from engine.core.hardware import cpu_info
from engine.data.tokens import SeededOrder
from engine.train.cadence import BestKeeper, Cadence
from engine.train.checkpointing import Checkpointer, restore_stage
from engine.train.counters import Counters
from engine.train.distributed import Parallel
from engine.train.identity import RunIdentity
from engine.train.optim import make_scheduler
from engine.train.plan import Resume
from engine.train.precision import Precision
from engine.train.reporter import Reporter
from engine.train.runtime import Runtime, bitwise_meta, start_runtime
from engine.train.step import MicroBatch, train_step


class Stage(Protocol):
    vocab_size: int

    def build(self, run: RunIdentity, report: Reporter, rt: Runtime, resume: dict | None) -> None:
        """Data, model and anything else the stage trains; ``resume`` is the checkpoint being resumed."""

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """What the optimizer trains, by name: the modules DDP or FSDP2 wrap."""

    def train_order(self) -> SeededOrder:
        """The training data's batch order (each rank keeps its shard of it)."""

    def make_optimizer(self) -> torch.optim.Optimizer: ...

    def micro_batch(self) -> MicroBatch:
        """Forward and loss of the next micro-batch, with its tokens and FLOPs."""

    def step_metrics(self) -> dict[str, float]:
        """Metrics logged with every training step's (loss, lr, grad_norm, ...)."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate now (and record it); returns the metric rows to log."""

    def state(self) -> dict:
        """What the stage saves in a checkpoint besides the shared trainer state."""

    def load_state(self, ck: dict) -> None: ...

    def summary(self) -> dict:
        """The stage's entries of the run summary."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm went NaN/inf (train.skip_nonfinite is off): the run fails at that step."""


def summary_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if v is not None}


class TrainLoop:
    def __init__(self, run: RunIdentity, report: Reporter, control, stage: Stage, precision: Precision | None = None,
                 resume: Resume | None = None):
        self.identity, self.report, self.control, self.stage = run, report, control, stage
        self.precision = precision  # as the plan decided it (None: the runtime decides)
        self.resume = resume
        self.cfg = run.cfg
        self.counters = Counters()
        self.skipped = 0  # steps whose optimizer update was skipped (non-finite, train.skip_nonfinite)
        self._grad_reported = False  # the gradient bytes of a DDP step are reported once
        self.best = BestKeeper()  # the best development evaluation (a fine-tuning recipe with epochs or early stopping)
        self.improved = False  # the evaluation of this step was the best so far
        self.stopped_early = False
        # the summary's train_loss: the loss last logged (by this run before the checkpoint, on a resume)
        self.last_loss = resume.train_loss if resume else None

    def run(self) -> str:
        """Train up to train.max_steps; returns "completed", or "stopped" when a stop was requested."""
        report, tc = self.report, self.cfg.train
        report.start(tc.max_steps)
        rt = self.rt = start_runtime(tc, self.precision)
        group = rt.group
        (report.warn if rt.precision.warning else report.info)(rt.precision.reason)
        report.meta(**rt.precision.as_meta(), cpu=cpu_info().as_meta(), world=group.as_meta())
        if group.distributed:
            report.info(f"process group: {group.world} processes ({group.strategy}, {group.backend}); global batch "
                        f"{group.world} x {tc.batch_size} x {tc.grad_accum} = {group.world * tc.batch_size * tc.grad_accum} sequences")
        self.scaler = rt.grad_scaler()
        resume = self.resume.opened() if self.resume else None
        self.stage.build(self.identity, report, rt, resume)
        if resume is not None:
            restore_stage(self.stage, resume, self.resume.checkpoint)  # before FSDP shards what it loads
        note = getattr(self.stage, "kernel_note", None)
        report.meta(bitwise=bitwise_meta(rt.device, note() if note else "", group.world))
        self.stage.train_order().shard(group.rank, group.world)
        self.par = Parallel(group, self.stage.trained_modules(), rt.device)
        self.opt = self.stage.make_optimizer()
        self.sched = make_scheduler(self.opt, tc)
        score = getattr(self.stage, "dev_score", None)
        self.best = BestKeeper(enabled=score is not None and bool(tc.epochs or tc.early_stopping_patience),
                               patience=tc.early_stopping_patience)
        self.ckpt = Checkpointer(self.identity, report, self.stage, self.opt, self.sched, self.counters, self.scaler,
                                 rt.precision.name, self.par, best=self.best)
        if resume is not None:
            self.ckpt.restore(resume, self.resume.checkpoint)
        if tc.epochs:
            report.meta(epochs={"epochs": tc.epochs, "steps_per_epoch": tc.eval_every, "max_steps": tc.max_steps})
        self.cadence = Cadence(tc.eval_every, tc.checkpoint_every, tc.max_steps)
        logger = report.metrics_logger(tc.max_steps)
        self.counters.start_clock()  # wall time counts training, not setup
        report.training()
        try:
            status = self._steps(logger)
            # a stopped run keeps the best evaluation's cadence (an evaluation every epoch): one more at the
            # stop step would count towards the best and the patience, and its resume would part from the
            # uninterrupted run
            if self.cadence.final_eval_due(self.counters.step) and not (status == "stopped" and self.best.enabled):
                logger.log(self._evaluate(), self.counters.point())
        finally:
            logger.close()  # trackers flush what they hold, a failed run's steps included
        self._save(final=True)
        report.finish(status, self.counters.step, self.summary())
        return status

    def _steps(self, logger) -> str:
        tc, c, stage, group = self.cfg.train, self.counters, self.stage, self.rt.group
        before, after = getattr(stage, "before_step", None), getattr(stage, "after_step", None)
        pending = getattr(stage, "pending_metrics", None)
        micro = self.par.micro(stage.micro_batch, tc.grad_accum)
        while c.step < tc.max_steps:
            stop, pause = group.any(self.control.stop_requested.is_set(), self.control.pause_requested.is_set())
            if stop:
                return "stopped"
            if pause:
                self._pause_wait()
                continue
            if before:
                before()
            group.step_seed(tc.seed, c.step)
            t = time.perf_counter()
            r = train_step(self.opt, micro, tc.grad_accum, tc.grad_clip, self.scaler, group)
            if not r.finite:
                self._non_finite(r, c.step + 1)
            self.sched.step()
            dt = time.perf_counter() - t
            if after:
                after(dt)
            c.add_step(r.tokens, r.flops, r.flops_dense)
            self._grad_exchange()
            metrics = {}
            if c.step % tc.log_every == 0 or c.step == tc.max_steps:
                metrics = {"loss": r.loss, "lr": self.sched.get_last_lr()[0],
                           "grad_norm": r.grad_norm, "tokens_per_s": r.tokens / dt, "step_time": dt, **stage.step_metrics()}
            if pending:
                metrics.update(pending())  # what happened at this step (a mask update), logged whatever log_every says
            if self.cadence.eval_due(c.step):
                metrics.update(self._evaluate())
            if metrics:
                logger.log(metrics, c.point())
                if "loss" in metrics:  # NaN is what the database cannot hold: no value
                    self.last_loss = None if math.isnan(metrics["loss"]) else float(metrics["loss"])
            # the best evaluation's step gets a checkpoint (the last step's is the final one)
            if self.cadence.checkpoint_due(c.step) or (self.improved and c.step < tc.max_steps):
                self._save(final=False)
            self.improved = False
            if (self.best.enabled and self.cadence.last_eval_step == c.step < tc.max_steps
                    and group.any(self.best.should_stop())[0]):
                self.stopped_early = True
                b = self.best
                since = f"on {b.best:.4f} (step {b.best_step})" if b.best is not None else "at all"
                self.report.info(f"early stopping at step {c.step}: the dev {b.metric or 'metric'} has not improved "
                                 f"{since} for {b.since_best} evaluations (train.early_stopping_patience)")
                return "completed"
        return "completed"

    def _non_finite(self, r, step: int) -> None:
        what = f"loss {r.loss}" if not math.isfinite(r.loss) else f"gradient norm {r.grad_norm}"
        if not self.cfg.train.skip_nonfinite:
            raise NonFiniteError(f"the {what} at step {step} is not finite; the run stops here and its last "
                                 "checkpoint is the last good state (lower train.lr, or set train.skip_nonfinite = true)")
        self.skipped += 1
        self.report.warn(f"step {step}: the {what} is not finite; the optimizer step was skipped ({self.skipped} so far)")

    def _grad_exchange(self) -> None:
        """The gradient bytes DDP exchanged in the first step, by part, once (meta and the log)."""
        g = self.par.take_grad_bytes()
        if g is None or self._grad_reported:
            return
        self._grad_reported = True
        counts = self.stage.trained_modules()
        dense_total = 4 * sum(p.numel() for m in counts.values() for p in m.parameters() if p.requires_grad)
        masked_dense = g["masked_dense_bytes"]
        dense_model = dense_total - g["masked_bytes"] + masked_dense  # the same model with its masked layers dense
        ratio_masked = g["masked_bytes"] / masked_dense if masked_dense else None
        ratio_model = g["bytes"] / dense_model if dense_model else None
        info = {"bytes_per_step": g["bytes"], "masked_layers_bytes": g["masked_bytes"],
                "masked_layers_dense_bytes": masked_dense, "masked_layers_ratio": ratio_masked,
                "model_dense_bytes": dense_model, "model_ratio": ratio_model}
        self.report.meta(grad_exchange=info)
        self.report.info(f"gradients exchanged per step: {g['bytes'] / 2**20:.2f} MiB"
                         + (f"; masked layers {ratio_masked:.3f}x of the same layers dense, whole model {ratio_model:.3f}x"
                            if ratio_masked is not None else ""))

    def _evaluate(self) -> dict:
        rows = self.par.run(lambda: self.stage.evaluate(self.counters.step))
        self.cadence.last_eval_step = self.counters.step
        if self.best.enabled:  # every rank decides alike (a checkpoint is everyone's work under FSDP)
            better = self.best.observe(self.counters.step, self.stage.dev_score())
            self.improved = self.rt.group.any(better)[0]
        self.report.summary(self.summary())
        return rows

    def _save(self, final: bool) -> None:
        path, nbytes = self.ckpt.save(final)
        if not self.identity.writer:
            return
        b = self.best
        if b.enabled and b.best_step == self.counters.step:  # (the checkpointer noted its path)
            self.report.meta(best_checkpoint={**b.record(), "path": path})
        on_final = getattr(self.stage, "on_final_checkpoint", None)
        if final and on_final:
            # an earlier evaluation was the best: what the stage publishes comes from its checkpoint
            earlier = b.enabled and b.best_path is not None and b.best_step != self.counters.step
            on_final(self.counters.step, **({"best": (b.best_step, b.best_path)} if earlier else {}))
        self.report.summary(self.summary())
        self.report.announce_checkpoint(self.counters.step, path, nbytes, final)

    def summary(self) -> dict:
        c = self.counters
        return summary_of({"step": c.step, "tokens": c.tokens, "flops": c.flops, "flops_dense": c.flops_dense,
                           "wall_time": c.wall(), "train_loss": self.last_loss,
                           "best_step": self.best.best_step, "stopped_early": self.stopped_early or None,
                           **self.stage.summary()})

    def _pause_wait(self) -> None:
        t = time.monotonic()
        self.report.status("paused")
        self.report.info(f"paused at step {self.counters.step}")
        control, group = self.control, self.rt.group
        while True:
            control.wake.wait(0.5)
            control.wake.clear()
            # every rank asks every half second: they leave the pause together
            pause, stop = group.any(control.pause_requested.is_set(), control.stop_requested.is_set())
            if not pause or stop:
                break
        if stop:
            control.request_stop(control.stop_reason or "stop")
        self.counters.add_pause(time.monotonic() - t)
        self.report.status("running")
        self.report.info("resumed" if not self.control.stop_requested.is_set() else "stopping")
