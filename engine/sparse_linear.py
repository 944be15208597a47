"""The one interface every sparse weight matrix goes through.

``SparseLinear`` is an nn.Linear whose weight may carry a static mask. Two compute paths give the
same function: ``dense`` multiplies the masked dense weight (MKL/cuBLAS), ``sparse`` calls the
sparse matmul core (engine.kernels) that only touches the nonzeros. The weight stays a dense
Parameter either way, so checkpoints, the optimizer and fine-tuning see one format.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SparseLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", None, persistent=False)  # bool [out, in] or None (dense)
        self.kernel = "dense"
        self._pattern = None  # sparse-core index structures, built once per mask

    @property
    def is_sparse(self) -> bool:
        return self.mask is not None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Install (or drop, with None) a static mask and zero the masked weights."""
        self._pattern = None
        if mask is None:
            self.mask = None
            self.kernel = "dense"
            return
        assert mask.shape == self.weight.shape and mask.dtype == torch.bool
        self.mask = mask.to(self.weight.device)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def set_kernel(self, kernel: str) -> None:
        if kernel == "sparse" and not self.is_sparse:
            kernel = "dense"
        self.kernel = kernel

    def pattern(self):
        if self._pattern is None:
            from .kernels import SparsePattern

            self._pattern = SparsePattern.from_mask(self.mask.cpu())
        return self._pattern

    def mask_grad(self) -> None:
        """Zero gradient entries of masked weights, so AdamW moments and decay never move them."""
        # the sparse core already returns exact zeros off the mask: skip a pass over the weight
        if self.mask is not None and self.weight.grad is not None and self.kernel != "sparse":
            self.weight.grad.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "sparse" and self.mask is not None and x.device.type == "cpu" and not torch.is_autocast_enabled():
            from .kernels import sparse_linear

            return sparse_linear(x, self.weight, self.bias, self.pattern())
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = f", sparse={self.is_sparse}, kernel={self.kernel}" if self.is_sparse else ""
        return super().extra_repr() + extra
