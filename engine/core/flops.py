"""Training FLOPs, the paper's way (MediSwift and SPDF count them so):

forward per token ≈ 2·N_sparse·(1−s) + 2·N_dense_matmul + 4·L·n_ctx·d + 2·d·V, training ≈ 3 × forward.

N_sparse, the weights of the attention and MLP matrices, depends on the family: per block
gpt2 and biogpt have 4·d² (q, k, v, out) + 2·d·d_ff (fc, proj; d_ff is 4·d in gpt2); llama and qwen2
have 2·d² (q, out) + 2·d·d_kv (k, v of n_kv_head heads, grouped-query attention) + 3·d·d_ff (SwiGLU's
gate, up, down). The attention term stays 4·L·n_ctx·d: every query head still scores and mixes all
positions, however few the key heads.

``sparse`` counts only the nonzero weights (what hardware that skips zeros must do); ``dense`` is the
same model with every weight present (the dense-equivalent). Wall-clock is measured separately.
Plain arithmetic (no torch), so the studio's estimates and schedule preview use the same formula.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopModel:
    n_layer: int
    d_model: int
    n_ctx: int
    vocab_size: int
    sparse_numel: int        # weights in sparse-eligible matrices (attention q/k/v/out, MLP)
    sparse_nonzero: int      # of which nonzero
    dense_matmul: int = 0    # other matmul weights besides the LM head (none in our GPT)

    def forward_per_token(self, sparse: bool = True) -> float:
        return self._forward(self.sparse_nonzero if sparse else self.sparse_numel)

    def _forward(self, n_sparse: int) -> float:
        attention = 4 * self.n_layer * self.n_ctx * self.d_model
        lm_head = 2 * self.d_model * self.vocab_size
        return 2.0 * n_sparse + 2.0 * self.dense_matmul + attention + lm_head

    def train_per_token(self, sparse: bool = True) -> float:
        return 3.0 * self.forward_per_token(sparse)

    def train_per_token_at(self, nonzero: int) -> float:
        """``train_per_token(True)`` of this model with ``nonzero`` weights in the masked matrices (a
        dynamic method's step), without building another FlopModel."""
        return 3.0 * self._forward(nonzero)

    def saving(self) -> float:
        """Dense-equivalent / sparse training FLOPs (the paper's '2–2.5x')."""
        return self.train_per_token(False) / self.train_per_token(True)


def sparse_numel_for(n_layer: int, d_model: int) -> int:
    """q, k, v, out (d×d each) + MLP fc (d×4d) + proj (4d×d) per block."""
    return n_layer * 12 * d_model * d_model


def sparse_numel_of(m) -> int:
    """N_sparse of a model config of any family (engine.core.config.ModelConfig)."""
    d, ff, d_kv = m.d_model, m.d_ff or 4 * m.d_model, (m.n_kv_head or m.n_head) * (m.d_model // m.n_head)
    if m.family in ("gpt2", "biogpt"):  # the same blocks: BioGPT differs in its embeddings only
        return m.n_layer * (4 * d * d + 2 * d * ff)
    return m.n_layer * (2 * d * d + 2 * d * d_kv + 3 * d * ff)


def flop_model_for_model(m, vocab_size: int, level: float, n_ctx: int | None = None) -> FlopModel:
    """The FLOP model of a model config of any family at an overall sparsity ``level``."""
    numel = sparse_numel_of(m)
    return FlopModel(m.n_layer, m.d_model, n_ctx or m.n_ctx, vocab_size, numel, numel - int(round(level * numel)))


def flop_model_for_config(n_layer: int, d_model: int, n_ctx: int, vocab_size: int, level: float) -> FlopModel:
    numel = sparse_numel_for(n_layer, d_model)
    return FlopModel(n_layer, d_model, n_ctx, vocab_size, numel, numel - int(round(level * numel)))
