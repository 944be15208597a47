"""The one interface every sparse weight matrix goes through.

``SparseLinear`` is an nn.Linear whose weight may carry a static mask. A masked layer stores only
its nonzeros: the trainable parameter is ``values`` (the weight at the mask's nonzeros, row-major),
so its gradient, the AdamW moments and weight decay never touch the zeros, and no dense weight
gradient exists. Two compute paths give the same function: ``dense`` unpacks the values into the
dense matrix and uses MKL/cuBLAS, ``sparse`` calls the sparse matmul core (engine.model.kernels) that
only touches the nonzeros. ``layer.weight`` still reads as the dense matrix, and state dicts hold
the dense ``weight`` (zeros included), so checkpoints, exports and fine-tuning see one format.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

_MASK_IDS = itertools.count(1)  # a fresh id per installed mask: caches keyed on it never go stale


class SparseLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("mask", None, persistent=False)  # bool [out, in] or None (dense)
        self.register_buffer("flat", None, persistent=False)  # int64 offsets of the nonzeros, row-major
        self.kernel = "dense"
        self._pattern = None  # sparse-core index structures, built once per mask
        self.mask_id = 0
        self._dense = None  # (key, dense weight) for the dense path, refreshed when the values change
        self.capture_dense_grad = False  # RigL's update steps: keep the whole dW the dense path forms
        self.dense_grad: torch.Tensor | None = None  # fp32 [out, in], summed over the step's micro-batches

    @property
    def is_sparse(self) -> bool:
        return self.mask is not None

    def __getattr__(self, name: str):
        # a masked layer has no dense weight Parameter: reading .weight unpacks the values (a copy)
        if name == "weight" and "values" in self._parameters:
            values = self._parameters["values"]
            dense = values.new_zeros(self.out_features * self.in_features)
            return dense.index_copy(0, self._buffers["flat"], values.detach()).view(self.out_features, self.in_features)
        return super().__getattr__(name)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Install (or drop, with None) a static mask. The weights off the mask are dropped; the
        ``values`` Parameter keeps its identity when the mask is re-installed (resume), so an
        optimizer built on it stays valid."""
        self._pattern = None
        self._dense = None
        self.mask_id = next(_MASK_IDS)
        dense = self.weight.detach()
        if mask is None:
            if "values" in self._parameters:
                del self._parameters["values"]
                self.weight = nn.Parameter(dense.clone())
            self.mask = self.flat = None
            self.kernel = "dense"
            return
        assert mask.shape == (self.out_features, self.in_features) and mask.dtype == torch.bool
        self.mask = mask.to(dense.device)
        self.flat = self.mask.reshape(-1).nonzero().squeeze(1)
        packed = dense.reshape(-1)[self.flat].clone()
        if "values" in self._parameters:
            self._parameters["values"].data = packed
        else:
            del self._parameters["weight"]
            self.values = nn.Parameter(packed)

    def set_kernel(self, kernel: str) -> None:
        if kernel == "sparse" and not self.is_sparse:
            kernel = "dense"
        self.kernel = kernel

    def release_unused(self) -> None:
        """Drop what only the path not taken needs: the dense copy when the layer runs on the sparse
        core, the core's index plans when it runs dense (a kernel trial builds both)."""
        if self.kernel == "sparse":
            self._dense = None
        else:
            self._pattern = None

    def pattern(self):
        if self._pattern is None:
            from engine.model.kernels import SparsePattern

            self._pattern = SparsePattern.from_mask(self.mask.cpu())
            if self.flat.device.type == "cpu" and torch.equal(self.flat, self._pattern.flat_t):
                # the same row-major offsets: keep one copy (8 bytes per nonzero)
                self.flat = self._pattern.flat_t
        return self._pattern

    def nonzero_count(self) -> int:
        """Connections this layer has: its mask's count when masked (a weight grown by dynamic sparsity
        is a connection even while its value is still exactly zero), else the dense weight's nonzeros."""
        if self.mask is not None:
            return int(self.mask.sum())
        w = self._parameters["weight"]
        if hasattr(w, "full_tensor"):  # an FSDP shard: every rank counts the whole matrix (a collective)
            w = w.full_tensor()
        return int(torch.count_nonzero(w))

    def uses_sparse_core(self, x: torch.Tensor) -> bool:
        # under CPU autocast to bf16 the core computes in bf16, as autocast's linear would; autocast to
        # another dtype (fp16) is left to the dense path, which autocast handles
        if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return False
        return self.mask is not None and self.kernel == "sparse" and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return F.linear(x, self.weight, self.bias)
        if self.uses_sparse_core(x):
            from engine.model.kernels import sparse_linear

            return sparse_linear(x, self.values, self.bias, self.pattern())
        return _PackedDenseLinear.apply(x, self.values, self.bias, self._dense_weight(), self.flat,
                                        self if self.capture_dense_grad else None)

    def add_dense_grad(self, full: torch.Tensor) -> None:
        full = full.float()
        self.dense_grad = full if self.dense_grad is None else self.dense_grad.add_(full)

    def _dense_weight(self) -> torch.Tensor:
        """The dense matrix for the dense path. Its buffer is kept between calls: the zeros never move,
        so each call only writes the nonzeros again (no zero fill, no fresh allocation). It is written
        on every call because optimizers update the values in place, fused AdamW without even
        bumping their version counter."""
        v = self.values
        key = (self.mask_id, v.device, v.dtype)
        if self._dense is None or self._dense[0] != key:
            self._dense = (key, v.new_zeros(self.out_features * self.in_features))
        buf = self._dense[1]
        with torch.no_grad():
            buf.index_copy_(0, self.flat, v)
        return buf.view(self.out_features, self.in_features)

    # state dicts hold the dense weight, so every reader of checkpoints sees an nn.Linear
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "values" in self._parameters:
            del destination[prefix + "values"]
            destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if "values" in self._parameters and key in state_dict:
            weight = state_dict.pop(key)
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the layer is {(self.out_features, self.in_features)}")
            else:
                state_dict[prefix + "values"] = weight.reshape(-1)[self.flat.to(weight.device)]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        extra = f", sparse={self.is_sparse}, kernel={self.kernel}" if self.is_sparse else ""
        return super().extra_repr() + extra


class _PackedDenseLinear(torch.autograd.Function):
    """``x @ W.T + b`` with W the packed layer's dense matrix; the weight's gradient comes back as
    the gradient of its values (the dense product's gradient read at the mask)."""

    @staticmethod
    def forward(ctx, x, values, bias, weight, flat, sink=None):
        # the layer's buffer is held by reference, not saved: a second forward of the layer before
        # this backward rewrites it with the same values, which a saved tensor's version check would
        # reject (the values only change at the optimizer step, after every backward of the step)
        ctx.save_for_backward(x, flat)
        ctx.weight = weight
        ctx.has_bias = bias is not None
        ctx.v_dtype = values.dtype
        ctx.sink = sink  # a layer that keeps the dense dW (RigL), or None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, flat = ctx.saved_tensors
        weight = ctx.weight
        need_x, need_v, need_b = ctx.needs_input_grad[:3]
        gx = gv = gb = None
        # products in the gradient's dtype (bf16 under autocast, CPU or CUDA); autograd casts gx back to x's
        if need_x:
            gx = gy @ weight.to(gy.dtype)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if need_v or ctx.sink is not None:
            full = gy2.T @ x.reshape(-1, x.shape[-1]).to(gy.dtype)  # dW, every entry (the mask's zeros too)
            if ctx.sink is not None:
                ctx.sink.add_dense_grad(full)
            if need_v:
                gv = full.reshape(-1)[flat].to(ctx.v_dtype)
        if need_b and ctx.has_bias:
            gb = gy2.sum(0)
        return gx, gv, gb, None, None, None


class SparseGroup:
    """Masked layers that read the same input (attention's q, k and v) as one sparse product over
    their stacked masks: the input is tiled once and one larger multiplication, which the kernels run
    more efficiently than three small ones, yields all outputs. The values and gradients stay each
    layer's own. Layers not on the sparse core run one by one."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._pattern = None

    def release(self) -> None:
        """Drop the stacked index plans (its layers left the sparse core)."""
        self._key = self._pattern = None

    def __call__(self, layers: tuple[SparseLinear, ...], x: torch.Tensor) -> list[torch.Tensor]:
        if not all(m.uses_sparse_core(x) for m in layers):
            return [m(x) for m in layers]
        key = tuple(m.mask_id for m in layers)
        if key != self._key:
            from engine.model.kernels import SparsePattern

            # stacking rows keeps row-major order: the stacked values are the layers' values end to end
            self._pattern = SparsePattern.from_mask(torch.cat([m.mask.cpu() for m in layers]))
            self._key = key
        from engine.model.kernels import sparse_linear

        biases = [m.bias for m in layers]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        if bias is None and any(b is not None for b in biases):
            return [m(x) for m in layers]
        y = sparse_linear(x, torch.cat([m.values for m in layers]), bias, self._pattern)
        return list(y.split([m.out_features for m in layers], dim=-1))
