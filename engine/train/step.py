"""One optimizer step: accumulate micro-batches, clip, step. Shared by the training loops and the
benchmarks, so what is measured is what trains. Masked matrices train as their packed nonzeros
(SparseLinear.values), so there is no gradient to mask."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch


def train_step(model, opt: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               n_batches: int, grad_clip: float, autocast=nullcontext) -> tuple[float, float]:
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in batches:
        with autocast():
            _, loss = model(x, y)
        (loss / n_batches).backward()
        total += loss.item()
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))
    opt.step()
    return total / n_batches, grad_norm
