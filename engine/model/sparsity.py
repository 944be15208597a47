"""Static unstructured sparsity: choose masks at init, keep masked weights exactly zero, measure.

Per-layer levels are ``uniform`` (every sparse matrix at the target level) or ``erk``
(Erdős–Rényi-Kernel: density proportional to (n_in + n_out) / (n_in * n_out), scaled so the total
number of nonzeros matches the target; layers that would exceed density 1 stay dense and the rest
is redistributed). Within a matrix the zero positions are uniformly random, exactly
round(level * numel) of them.
"""
from __future__ import annotations

import torch

from engine.core.sparsity_schedule import layer_densities
from engine.model.gpt import GPT


def random_mask(shape: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    numel = shape[0] * shape[1]
    n_zero = int(round((1.0 - density) * numel))
    mask = torch.ones(numel, dtype=torch.bool)
    if n_zero:
        mask[torch.randperm(numel, generator=generator)[:n_zero]] = False
    return mask.view(shape)


def apply_sparsity(model: GPT, level: float, distribution: str, seed: int) -> dict[str, float]:
    """Draw and install masks on every SparseLinear; returns the per-layer target levels."""
    layers = model.sparse_layers()
    if level == 0.0:
        for m in layers.values():
            m.set_mask(None)
        return {name: 0.0 for name in layers}
    shapes = {name: (m.out_features, m.in_features) for name, m in layers.items()}
    densities = layer_densities(shapes, level, distribution)
    g = torch.Generator().manual_seed(seed + 7919)  # separate stream from weight init
    for name, m in layers.items():
        m.set_mask(random_mask(shapes[name], densities[name], g))
    return {name: 1.0 - d for name, d in densities.items()}


def packed_state_dict(model: torch.nn.Module) -> dict:
    """The model's state dict (keys as ``state_dict()``) with every masked matrix as its nonzeros and
    mask (engine.model.checkpoint.MaskedWeight) instead of the dense matrix: a checkpoint in
    proportion to the nonzeros, and no dense copy of the weights made to write one."""
    from engine.model.checkpoint import MaskedWeight
    from engine.model.sparse_linear import SparseLinear

    out = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        masked = isinstance(mod, SparseLinear) and mod.is_sparse
        for name, p in mod._parameters.items():
            if p is None:
                continue
            if masked and name == "values":
                out[prefix + "weight"] = MaskedWeight(p.detach(), mod.mask)
            else:
                out[prefix + name] = p.detach()
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[prefix + name] = b
    return out


def masks_state(model: GPT) -> dict[str, torch.Tensor]:
    return {name: m.mask.cpu() for name, m in model.sparse_layers().items() if m.mask is not None}


def load_masks(model: GPT, masks: dict[str, torch.Tensor]) -> None:
    for name, m in model.sparse_layers().items():
        m.set_mask(masks[name] if name in masks else None)


@torch.no_grad()
def measure_sparsity(model: GPT) -> dict:
    """Fraction of absent connections in each sparse-eligible matrix (off its mask; for an unmasked
    matrix its exact zeros), and in all of them together."""
    layers: dict[str, float] = {}
    zeros = total = 0
    for name, m in model.sparse_layers().items():
        n = m.out_features * m.in_features
        z = n - m.nonzero_count()
        layers[name] = z / n
        zeros += z
        total += n
    return {"total": zeros / total if total else 0.0, "layers": layers}


def sparse_param_counts(model: GPT) -> dict[str, int]:
    """Parameters in sparse-eligible matrices (numel and nonzero) and everything else."""
    sparse_numel = sum(m.out_features * m.in_features for m in model.sparse_layers().values())
    sparse_nnz = sum(int(m.mask.sum()) if m.mask is not None else m.out_features * m.in_features
                     for m in model.sparse_layers().values())
    total = model.num_params()
    return {"total": total, "sparse_numel": sparse_numel, "sparse_nonzero": sparse_nnz,
            "nonzero": total - sparse_numel + sparse_nnz}
