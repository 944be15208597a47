"""Training FLOPs of a built model: the formula (engine.core.flops) with the model's actual masks."""
from __future__ import annotations

from engine.core.flops import FlopModel, flop_model_for_config, flop_model_for_model, sparse_numel_for

__all__ = ["FlopModel", "flop_model_for", "flop_model_for_config", "flop_model_for_model", "sparse_numel_for"]


def flop_model_for(model, n_ctx: int | None = None) -> FlopModel:
    """From a built GPT, counting its actual masks."""
    from engine.model.sparsity import sparse_param_counts

    counts = sparse_param_counts(model)
    cfg = model.cfg
    return FlopModel(cfg.n_layer, cfg.d_model, n_ctx or cfg.n_ctx, model.vocab_size,
                     counts["sparse_numel"], counts["sparse_nonzero"])
