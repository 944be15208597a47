"""AdamW with decay on matrices only (and, for fine-tuning, layer-wise learning-rate decay), and a
linear warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from engine.core.config import TrainConfig


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, lr: float | None = None,
                   depth: Callable[[str], int] | None = None, n_depths: int = 0) -> torch.optim.AdamW:
    """AdamW over ``params``; with ``depth`` (a parameter name -> 0 .. n_depths - 1, 0 the input side)
    and ``cfg.layer_decay`` below 1, each depth trains at lr x layer_decay^(n_depths - 1 - depth)."""
    seen: set[int] = set()
    layered = depth is not None and cfg.layer_decay != 1.0
    decay: dict[int, list] = {}
    no_decay: dict[int, list] = {}
    for name, p in params:
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        d = depth(name) if layered else 0
        # a masked matrix trains as its packed nonzeros (SparseLinear.values): still a matrix
        (decay if p.dim() >= 2 or name.endswith(".values") else no_decay).setdefault(d, []).append(p)
    peak = lr or cfg.lr
    groups = []
    for d in sorted(set(decay) | set(no_decay)):
        scale = cfg.layer_decay ** (n_depths - 1 - d) if layered else 1.0
        extra = {"lr": peak * scale, "lr_scale": scale, "depth": d} if layered else {}
        groups += [{"params": decay.get(d, []), "weight_decay": cfg.weight_decay, **extra},
                   {"params": no_decay.get(d, []), "weight_decay": 0.0, **extra}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel over all tensors (the per-tensor loop cost a large share of a CPU step);
    # it is deterministic, so a resumed run still repeats the uninterrupted one exactly
    # (FSDP's sharded parameters, DTensors, take the multi-tensor path instead)
    fused = all(p.device.type in ("cpu", "cuda") and not hasattr(p, "device_mesh") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=peak, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def gpt_depth(n_layer: int) -> Callable[[str], int]:
    """Depth of a GPT parameter for layer-wise decay: the embeddings (wte, wpe) 0, block i i + 1, the
    rest (final norm, LM head, a classification head) n_layer + 1; so n_layer + 2 depths."""
    def depth(name: str) -> int:
        m = _BLOCK.search(name)
        if m:
            return int(m.group(1)) + 1
        return 0 if name.split(".")[0] in ("wte", "wpe") else n_layer + 1
    return depth


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
