"""Sparse matmul core: kernels for training a linear layer with a static unstructured mask.

Public API (used by the engine's SparseLinear module):

* ``SparsePattern.from_mask(mask)`` - index structures, built once per layer.
* ``sparse_linear(x, values, bias, pattern)`` - autograd op, ``x @ W.T + bias`` with W's nonzeros
  given as ``values`` (row-major, ``pattern.pack(W)``); gradients are values-shaped.
* ``kernel_available(precision="fp32")`` - numba kernels import and match a dense reference
  ("bf16": the bf16 kernels, bf16 activations and values with fp32 accumulation).
* ``bf16_path()`` - which bf16 path runs here (AVX512-BF16 dot product, or widening to fp32 FMAs).
* ``time_kernels(pattern, n_tokens, repeats=5, precision="fp32")`` - dense vs sparse ms for one
  training step.

``sparse_linear`` computes in bf16 for bf16 inputs and under ``torch.autocast("cpu", torch.bfloat16)``.

numba is imported lazily (first kernel use), so importing this package is cheap
and works without numba; without it ``sparse_linear`` computes densely.
"""
import os

# numba reads this once at import; the SDDMM reduction only vectorises with SLP on.
os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")

from engine.model.kernels.ops import (  # noqa: E402
    SparseLinearFunction, bf16_path, kernel_available, sparse_linear, time_kernels,
)
from engine.model.kernels.pattern import SparsePattern  # noqa: E402

__all__ = ["SparsePattern", "sparse_linear", "kernel_available", "time_kernels", "bf16_path",
           "SparseLinearFunction"]
