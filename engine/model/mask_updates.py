"""Changing a mask in packed storage: which connections leave and enter, and the layer and its
optimizer state carried over to the new mask.

Rules every method shares (engine.core.sparsity_schedule says when and how many):
- dropped connections are the smallest in magnitude among the active ones;
- grown connections come from those inactive *before* the update (never one just dropped), and
  start at exactly zero, with zero AdamW moments;
- kept connections keep their values and moments;
- ties break toward the lower row-major index, so an update is a function of its inputs alone.
"""
from __future__ import annotations

import torch

from engine.model.sparse_linear import SparseLinear


def _stable_order(score: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.argsort(-score if descending else score, stable=True)


def magnitude_prune(weight: torch.Tensor, mask: torch.Tensor | None, keep: int) -> torch.Tensor:
    """The mask keeping the ``keep`` largest-magnitude entries of ``weight`` among those ``mask``
    allows (all, for a dense matrix): GMP's pruning step, and the one-shot pruning of a dense model."""
    w = weight.detach().abs().reshape(-1).float()
    allowed = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.reshape(-1)
    if keep > int(allowed.sum()):
        raise ValueError(f"cannot keep {keep} weights of {int(allowed.sum())}: magnitude pruning only removes")
    score = torch.where(allowed, w, torch.full_like(w, -1.0))  # magnitudes are >= 0: disallowed never win
    new = torch.zeros_like(allowed)
    new[_stable_order(score, descending=True)[:keep]] = True
    return new.view(weight.shape)


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, n: int, grow_score: torch.Tensor) -> torch.Tensor:
    """``n`` active connections with the smallest |weight| leave; the ``n`` inactive ones with the
    largest ``grow_score`` enter (SET: random scores; RigL: |dense gradient|). The count of nonzeros
    stays exactly what it was."""
    active = mask.reshape(-1)
    n = min(n, int(active.sum()), int((~active).sum()))
    new = active.clone()
    if n <= 0:
        return new.view(mask.shape)
    w = weight.detach().abs().reshape(-1).float()
    drop = _stable_order(torch.where(active, w, torch.full_like(w, float("inf"))), descending=False)[:n]
    g = grow_score.detach().reshape(-1).float()
    grow = _stable_order(torch.where(active, torch.full_like(g, float("-inf")), g), descending=True)[:n]
    new[drop] = False
    new[grow] = True
    return new.view(mask.shape)


def install_mask(layer: SparseLinear, new_mask: torch.Tensor, opt: torch.optim.Optimizer | None) -> dict:
    """Put ``new_mask`` on ``layer``: its values re-packed in the new row-major order (grown ones
    zero), and the AdamW moments of its values moved with them (grown and dropped reset). Returns
    counts: nonzeros before and after, connections that left and entered."""
    old_mask = layer.mask.clone() if layer.mask is not None else None
    old_flat = layer.flat.clone() if layer.flat is not None else None
    values = layer._parameters.get("values")
    layer.set_mask(new_mask)  # the values Parameter keeps its identity, so the optimizer still holds it
    new_flat = layer.flat
    if opt is not None and values is not None and old_flat is not None:
        state = opt.state.get(values)
        if state:
            pos = torch.searchsorted(old_flat, new_flat).clamp(max=max(0, len(old_flat) - 1))
            kept = old_flat[pos] == new_flat if len(old_flat) else torch.zeros_like(new_flat, dtype=torch.bool)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    old = state[key]
                    moved = old.new_zeros(len(new_flat))
                    moved[kept] = old[pos[kept]]
                    state[key] = moved
    before = int(old_mask.sum()) if old_mask is not None else layer.out_features * layer.in_features
    left = int((old_mask & ~new_mask).sum()) if old_mask is not None else before - int(new_mask.sum())
    entered = int((new_mask & ~old_mask).sum()) if old_mask is not None else 0
    return {"before": before, "after": int(new_mask.sum()), "left": left, "entered": entered}
