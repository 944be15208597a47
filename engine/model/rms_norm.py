"""RMSNorm (the llama family's norm): x / sqrt(mean(x^2) + eps) * weight, no mean subtracted, no bias.

The statistics are taken in fp32 whatever the input's dtype (bf16 under autocast), then cast back
before the weight is applied: what the llama checkpoints were trained with."""
from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
