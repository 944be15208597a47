"""AdamW with decay on matrices only, and a linear warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from engine.core.config import TrainConfig


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, lr: float | None = None) -> torch.optim.AdamW:
    seen: set[int] = set()
    decay, no_decay = [], []
    for name, p in params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        # a masked matrix trains as its packed nonzeros (SparseLinear.values): still a matrix
        (decay if p.dim() >= 2 or name.endswith(".values") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel over all tensors (the per-tensor loop cost a large share of a CPU step);
    # it is deterministic, so a resumed run still repeats the uninterrupted one exactly
    # (FSDP's sharded parameters, DTensors, take the multi-tensor path instead)
    fused = all(p.device.type in ("cpu", "cuda") and not hasattr(p, "device_mesh") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warm-up, then cosine down to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
