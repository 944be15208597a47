"""The optimizer step every stage, the benchmarks and the estimator share, so what is measured is
what trains: accumulate micro-batches, clip, step. Masked matrices train as their packed nonzeros
(SparseLinear.values), so there is no gradient to mask."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from engine.train.distributed import total_grad_norm


@dataclass
class MicroBatch:
    """One micro-batch's loss and what it cost: tokens trained on and FLOPs (sparse, dense-equivalent)."""
    loss: torch.Tensor
    tokens: int = 0
    flops: float = 0.0
    flops_dense: float = 0.0


@dataclass
class StepResult:
    loss: float        # mean over the micro-batches
    grad_norm: float   # before clipping
    tokens: int
    flops: float
    flops_dense: float
    finite: bool = True  # False: the loss or the gradient norm was NaN/inf and the optimizer step was skipped


def train_step(opt: torch.optim.Optimizer, micro_batch: Callable[[], MicroBatch], n_micro: int,
               grad_clip: float, scaler: torch.amp.GradScaler | None = None, group=None) -> StepResult:
    """``n_micro`` calls of ``micro_batch`` (forward + loss), each backward at 1/n_micro, then one
    optimizer step over the optimizer's own parameters (the gradient norm too). A non-finite loss or
    gradient norm skips the optimizer step, so the weights and moments stay as they were.

    With ``scaler`` (fp16) the loss is scaled for backward and the gradients unscaled before the norm;
    an overflowing gradient then only makes the scaler skip the step and lower its scale, as fp16
    training expects, and is not reported as non-finite (the loss still is).

    With a process ``group`` (engine.train.distributed) the loss is the mean over every rank's
    micro-batches and tokens and FLOPs are their sums, so all ranks take the same decision on a
    non-finite step and report the step of the whole group."""
    opt.zero_grad(set_to_none=True)
    total, tokens, flops, flops_dense = 0.0, 0, 0.0, 0.0
    for _ in range(n_micro):
        mb = micro_batch()
        loss = mb.loss / n_micro
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += mb.loss.item()
        tokens += mb.tokens
        flops += mb.flops
        flops_dense += mb.flops_dense
    world = 1
    if group is not None and group.distributed:
        world = group.world
        total, tokens, flops, flops_dense = group.sum([total, tokens, flops, flops_dense])
        tokens = int(tokens)
    n_micro *= world
    if scaler is not None:
        scaler.unscale_(opt)
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = total_grad_norm(params, grad_clip)
    if scaler is not None:
        finite = math.isfinite(total)
        if finite:
            scaler.step(opt)  # skips the update itself when the unscaled gradients overflowed
        scaler.update()
        if not finite:
            opt.zero_grad(set_to_none=True)
        return StepResult(total / n_micro, grad_norm, tokens, flops, flops_dense, finite)
    finite = math.isfinite(total) and math.isfinite(grad_norm)
    if finite:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    return StepResult(total / n_micro, grad_norm, tokens, flops, flops_dense, finite)


def lm_micro_batch(model, x: torch.Tensor, y: torch.Tensor, autocast, flops_per_token: tuple[float, float] = (0.0, 0.0)
                   ) -> MicroBatch:
    """A causal-LM micro-batch of the whole model (pre-training, the benchmarks, the estimator)."""
    with autocast():
        _, loss = model(x, y)
    n = x.numel()
    return MicroBatch(loss, n, flops_per_token[0] * n, flops_per_token[1] * n)
