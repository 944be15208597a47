"""What each ``model.family`` is, as the named variations engine.model.gpt builds from.

One model definition, not one per family: a family only picks a norm, a kind of positions, an MLP and
where the biases go. gpt2: LayerNorm, learned positions, GELU MLP, biases everywhere (``model.bias``).
llama: RMSNorm, rotary positions, SwiGLU MLP, no biases. qwen2: llama with biases on q, k and v.
biogpt: gpt2 with biases always, an MLP of any width (``model.d_ff``), a position table that starts two
rows in (fairseq kept rows 0 and 1 for padding, so position p reads row p + 2) and, with
``model.scale_embedding``, token embeddings multiplied by sqrt(d_model) before the positions are added.
Grouped-query attention (``model.n_kv_head``) and an untied head are fields, not families.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.config import ModelConfig

# BioGPT's position table has two rows before position 0 (BioGptLearnedPositionalEmbedding's offset)
BIOGPT_POSITION_OFFSET = 2


@dataclass(frozen=True)
class Variations:
    norm: str          # "layer" (LayerNorm) or "rms" (RMSNorm)
    positions: str     # "learned" (a table added to the tokens) or "rotary" (q and k rotated per position)
    mlp: str           # "gelu" (fc, proj) or "swiglu" (gate, up, down)
    qkv_bias: bool     # biases on the q, k, v projections
    bias: bool         # biases on the attention output, the MLP and the norms
    position_offset: int = 0       # rows of the learned position table before position 0
    scale_embedding: bool = False  # token embeddings × sqrt(d_model)


def variations(cfg: ModelConfig) -> Variations:
    if cfg.family == "gpt2":
        return Variations("layer", "learned", "gelu", cfg.bias, cfg.bias)
    if cfg.family == "biogpt":
        return Variations("layer", "learned", "gelu", True, True, BIOGPT_POSITION_OFFSET, cfg.scale_embedding)
    return Variations("rms", "rotary", "swiglu", cfg.family == "qwen2", False)
