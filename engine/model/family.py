"""What each ``model.family`` is, as the named variations engine.model.gpt builds from.

One model definition, not one per family: a family only picks a norm, a kind of positions, an MLP and
where the biases go. gpt2: LayerNorm, learned positions, GELU MLP, biases everywhere (``model.bias``).
llama: RMSNorm, rotary positions, SwiGLU MLP, no biases. qwen2: llama with biases on q, k and v.
Grouped-query attention (``model.n_kv_head``) and an untied head are fields, not families.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.core.config import ModelConfig


@dataclass(frozen=True)
class Variations:
    norm: str          # "layer" (LayerNorm) or "rms" (RMSNorm)
    positions: str     # "learned" (a table added to the tokens) or "rotary" (q and k rotated per position)
    mlp: str           # "gelu" (fc, proj) or "swiglu" (gate, up, down)
    qkv_bias: bool     # biases on the q, k, v projections
    bias: bool         # biases on the attention output, the MLP and the norms


def variations(cfg: ModelConfig) -> Variations:
    if cfg.family == "gpt2":
        return Variations("layer", "learned", "gelu", cfg.bias, cfg.bias)
    return Variations("rms", "rotary", "swiglu", cfg.family == "qwen2", False)
