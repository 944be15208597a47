"""A classification head over the whole input: pooled hidden states, then a linear layer.

The head reads every token, not one: the final hidden states of a window's non-padding tokens are
pooled into one vector, by their mean (``pooling = "mean"``) or by learned attention weights
(``"attention"``: a score per token, a softmax over the window's tokens, the weighted sum). A document
longer than the model's window is read as several overlapping windows (engine.tasks.base); each
window is pooled on its own and the example's vector is the plain mean of its windows' vectors, so
every token of the document counts and nothing is cut. A linear layer maps that vector to one logit
per class.

Multi-label tasks predict a label where its logit exceeds the label's decision threshold: the
``thresholds`` buffer (in logit space; 0 is a probability of 0.5), tuned on the development data
(engine.tasks.scoring.tune_thresholds) and saved in the head's state dict, so whatever loads the
run's head (``mediswift eval``, the export) predicts with the thresholds the run chose.
Single-label tasks take the argmax and leave the thresholds alone.

Checkpoints of earlier versions hold a plain ``nn.Linear`` over the last prompt token's hidden state
(keys ``weight`` and ``bias``); ``head_from_state`` loads them as a head with ``pooling = "last"``,
which predicts exactly as they did.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.core.config import POOLINGS

MEAN, ATTENTION = POOLINGS
LAST = "last"  # the pooling of heads saved before pooled heads existed: the last token of one window


class ClassifierHead(nn.Module):
    def __init__(self, d_model: int, n_classes: int, pooling: str = MEAN):
        super().__init__()
        self.pooling = pooling
        if pooling == ATTENTION:
            self.attn = nn.Linear(d_model, 1)  # a score per token
        self.proj = nn.Linear(d_model, n_classes)
        self.register_buffer("thresholds", torch.zeros(n_classes))  # logit cut points (multi-label)

    def pool(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per window [N, C] from hidden states [N, T, C] whose first ``lengths`` [N] positions
        are the window's tokens (the rest is padding, which the causal model kept out of them)."""
        N, T, _ = h.shape
        lengths = lengths.to(h.device)
        if self.pooling == LAST:
            return h[torch.arange(N, device=h.device), lengths - 1]
        keep = torch.arange(T, device=h.device)[None, :] < lengths[:, None]       # [N, T]
        if self.pooling == ATTENTION:
            score = self.attn(h).squeeze(-1).masked_fill(~keep, float("-inf"))   # [N, T]
            return (torch.softmax(score, dim=-1).unsqueeze(-1) * h).sum(1)        # [N, C]
        return (h * keep.unsqueeze(-1)).sum(1) / lengths[:, None].to(h.dtype)      # [N, C]

    def forward(self, h: torch.Tensor, lengths: torch.Tensor, group: torch.Tensor | None = None,
                n: int | None = None) -> torch.Tensor:
        """Logits [n, K]: window ``i`` [N] belongs to example ``group[i]``; an example's vector is the mean
        of its windows' pooled vectors. Without ``group`` every window is an example of its own."""
        pooled = self.pool(h, lengths)                                            # [N, C]
        if group is not None:
            group = group.to(h.device)
            n = int(group.max()) + 1 if n is None else n
            total = pooled.new_zeros(n, pooled.shape[1]).index_add_(0, group, pooled)            # [n, C]
            count = torch.bincount(group, minlength=n).to(pooled.dtype).clamp(min=1)            # [n]
            pooled = total / count[:, None]
        return self.proj(pooled)                                                  # [n, K]

    def set_thresholds(self, thresholds) -> None:
        self.thresholds.copy_(torch.as_tensor(thresholds, dtype=self.thresholds.dtype))


def new_head(d_model: int, n_classes: int, pooling: str = MEAN) -> ClassifierHead:
    """A fresh head: small normal weights (std 0.02), zero biases, every threshold at 0 (probability 0.5)."""
    head = ClassifierHead(d_model, n_classes, pooling)
    for layer in (head.proj, getattr(head, "attn", None)):
        if layer is not None:
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return head


def head_from_state(state: dict) -> ClassifierHead:
    """The head a checkpoint saved: pooled (``proj.*``, with ``attn.*`` for attention pooling, and the
    ``thresholds``), or an earlier version's plain linear layer over the last token (``weight``, ``bias``)."""
    if "proj.weight" in state:
        w = state["proj.weight"]
        head = ClassifierHead(w.shape[1], w.shape[0], ATTENTION if "attn.weight" in state else MEAN)
        head.load_state_dict(state)
        return head
    w = state["weight"]
    head = ClassifierHead(w.shape[1], w.shape[0], LAST)
    head.proj.load_state_dict({"weight": w, "bias": state["bias"]})
    return head
