"""What every training stage's loop shares: the step loop itself (stop and pause between steps, the
logging, evaluation and checkpoint cadence), the wall clock without pauses, the axes of a metrics
point, bf16 autocast on CUDA. A stage fills in the hooks below."""
from __future__ import annotations

import random
import time
from contextlib import nullcontext

import numpy as np
import torch

from engine.core.config import RunConfig
from engine.train.memory import keep_freed_memory
from engine.train.metrics import Point
from engine.core.errors import InputError


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device is 'cuda' but no CUDA device is available", key="train.device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class StageLoop:
    # set by the stage: session, config, control, device, scheduler, counters
    s: object
    cfg: RunConfig
    control: object
    device: torch.device
    sched: object
    step: int
    tokens: int
    flops: float
    flops_dense: float
    wall_offset: float

    def __init__(self, s, control, resume_ckpt: str | None = None):
        self.s = s
        self.cfg = s.cfg
        self.control = control
        self.resume_ckpt = resume_ckpt

    def start_runtime(self) -> None:
        """Threads, device and seeds from train.*, and malloc keeping freed buffers for the next step
        (engine.train.memory): the first thing every stage's setup does."""
        keep_freed_memory()
        tc = self.cfg.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        np.random.seed(tc.seed % 2**32)

    # -- hooks ----------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step: (loss, gradient norm, tokens it trained on)."""
        raise NotImplementedError

    def before_step(self) -> None:
        """Called before each step."""

    def after_step(self, seconds: float, tokens: int) -> None:
        """Called after each step with its wall time, before the step counter moves."""

    def step_metrics(self) -> dict:
        """Extra metrics logged with the training ones."""
        return {}

    def evaluates_at(self, step: int) -> bool:
        """Whether the loop evaluates (``evaluate_now``) right after this step."""
        raise NotImplementedError

    def evaluate_now(self) -> dict:
        raise NotImplementedError

    def final_metrics(self, status: str) -> dict:
        """Metrics to log once the loop has ended (completed or stopped), before the final checkpoint."""
        return {}

    def save(self, final: bool) -> None:
        raise NotImplementedError

    # -- the loop -----------------------------------------------------------------------------------------
    def run_steps(self, logger) -> str:
        """Train up to train.max_steps; returns "completed", or "stopped" when a stop was requested."""
        tc = self.cfg.train
        self._t_start = time.monotonic()
        self._paused = 0.0
        status = "completed"
        while self.step < tc.max_steps:
            if self.control.stop_requested.is_set():
                status = "stopped"
                break
            if self.control.pause_requested.is_set():
                self._pause_wait()
                continue
            self.before_step()
            t = time.perf_counter()
            loss, grad_norm, n_tok = self.train_step()
            dt = time.perf_counter() - t
            self.after_step(dt, n_tok)
            self.step += 1
            self.tokens += n_tok
            metrics = {}
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                metrics = {"loss": loss, "lr": self.sched.get_last_lr()[0], "grad_norm": grad_norm,
                           "tokens_per_s": n_tok / dt, "step_time": dt, **self.step_metrics()}
            if self.evaluates_at(self.step):
                metrics.update(self.evaluate_now())
            if metrics:
                logger.log(metrics, self.point())
            if self.step % tc.checkpoint_every == 0 and self.step < tc.max_steps:
                self.save(final=False)
        final = self.final_metrics(status)
        if final:
            logger.log(final, self.point())
        return status

    def wall(self) -> float:
        return self.wall_offset + (time.monotonic() - self._t_start) - self._paused

    def point(self) -> Point:
        return Point(self.step, self.tokens, self.wall(), self.flops, self.flops_dense)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _pause_wait(self) -> None:
        t = time.monotonic()
        self.s.status("paused")
        self.s.info(f"paused at step {self.step}")
        while self.control.pause_requested.is_set() and not self.control.stop_requested.is_set():
            self.control.wake.wait(0.5)
            self.control.wake.clear()
        self._paused += time.monotonic() - t
        self.s.status("running")
        self.s.info("resumed" if not self.control.stop_requested.is_set() else "stopping")
