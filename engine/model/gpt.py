"""The decoder of every model family, readable top to bottom.

GPT-2/3 style by default: pre-LayerNorm blocks, learned positions, GELU MLP, tied input/output
embeddings, init std 0.02 with residual projections scaled by 1/sqrt(2 * n_layer), attention through
scaled_dot_product_attention. The llama family swaps in named variations (engine.model.family):
RMSNorm, rotary positions, a SwiGLU MLP, grouped-query attention (fewer key/value heads, each serving
n_head / n_kv_head query heads), q/k/v biases (qwen2) and an untied head; biogpt keeps GPT-2's blocks
with a position table offset by two rows and token embeddings scaled by sqrt(d_model).
Every attention and MLP matrix is SparseLinear: it may carry a static mask (sparse pre-training) or
none (dense fine-tuning). Embeddings, norms, biases and the LM head are dense.
Greedy generation runs the same blocks with a key/value cache (``hidden(idx, cache=KVCache(n_layer))``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.core.config import ModelConfig
from engine.model.family import Variations, variations
from engine.model.head_loss import lm_head_loss
from engine.model.rms_norm import RMSNorm
from engine.model.rotary import Scaling, rotary_angles, rotate
from engine.model.sparse_linear import SparseGroup, SparseLinear


class BlockCache:
    """One block's attention keys and values of the positions seen so far."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # [B, h, positions, C/h]
        self.v: torch.Tensor | None = None

    @property
    def positions(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new positions' keys and values [B, h, T, C/h]; returns all of them [B, h, past+T, C/h]."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)                  # [B, h, past+T, C/h]
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Keys and values of every block for the positions a model has run so far (``GPT.hidden(...,
    cache=)``), so that each further token of a greedy generation costs one position, not the sequence."""

    def __init__(self, n_layer: int) -> None:
        self.blocks = [BlockCache() for _ in range(n_layer)]

    @property
    def positions(self) -> int:
        return self.blocks[0].positions if self.blocks else 0


def make_norm(cfg: ModelConfig, var: Variations) -> nn.Module:
    if var.norm == "rms":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=var.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, var: Variations):
        super().__init__()
        self.n_head, self.n_kv = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.d_model // cfg.n_head
        self.rotary_theta = cfg.rope_theta if var.positions == "rotary" else None
        self.rotary_scaling = Scaling.of(cfg) if var.positions == "rotary" else None
        self.dropout = cfg.dropout
        kv_width = self.n_kv * self.head_dim  # narrower than d_model under grouped-query attention
        self.q = SparseLinear(cfg.d_model, cfg.d_model, bias=var.qkv_bias)
        self.k = SparseLinear(cfg.d_model, kv_width, bias=var.qkv_bias)
        self.v = SparseLinear(cfg.d_model, kv_width, bias=var.qkv_bias)
        self.out = SparseLinear(cfg.d_model, cfg.d_model, bias=var.bias)
        self.out.residual = True
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.qkv = SparseGroup()  # q, k, v in one product on the sparse core

    def forward(self, x: torch.Tensor, cache: BlockCache | None = None) -> torch.Tensor:
        """Causal self-attention over x [B, T, C]; with ``cache``, x holds the positions after the cached
        ones, which it attends to as well (and the cache takes x's keys and values)."""
        B, T, C = x.shape
        hd = self.head_dim
        q, k, v = self.qkv((self.q, self.k, self.v), x)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)     # [B, h, T, hd]
        k = k.view(B, T, self.n_kv, hd).transpose(1, 2)       # [B, kv, T, hd]
        v = v.view(B, T, self.n_kv, hd).transpose(1, 2)
        past = cache.positions if cache is not None else 0
        if self.rotary_theta is not None:
            cos, sin = rotary_angles(torch.arange(past, past + T, device=x.device), hd, self.rotary_theta,
                                     self.rotary_scaling)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        causal, mask = True, None
        if cache is not None:
            k, v = cache.extend(k, v)                          # [B, kv, past+T, hd]
            if past:
                # position past+i sees every cached position and the new ones up to itself
                causal = False
                mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)  # [T, past+T]
        if self.n_kv != self.n_head:  # key/value head j serves query heads j*g .. j*g+g-1
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # [B, h, past+T, hd]
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, h, T, C/h]
        y = y.transpose(1, 2).contiguous().view(B, T, C)      # [B, T, C]
        return self.resid_drop(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, var: Variations):
        super().__init__()
        self.fc = SparseLinear(cfg.d_model, cfg.inner, bias=var.bias)
        self.proj = SparseLinear(cfg.inner, cfg.d_model, bias=var.bias)
        self.proj.residual = True
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"  # original GPT-2: tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc(x), approximate=self.approximate)  # [B, T, C] -> [B, T, 4C]
        return self.drop(self.proj(x))  # [B, T, 4C] -> [B, T, C]


class SwiGLU(nn.Module):
    """The llama family's MLP: down(silu(gate(x)) * up(x)), three matrices where GELU's MLP has two."""

    def __init__(self, cfg: ModelConfig, var: Variations):
        super().__init__()
        self.gate = SparseLinear(cfg.d_model, cfg.inner, bias=var.bias)
        self.up = SparseLinear(cfg.d_model, cfg.inner, bias=var.bias)
        self.down = SparseLinear(cfg.inner, cfg.d_model, bias=var.bias)
        self.down.residual = True
        self.drop = nn.Dropout(cfg.dropout)
        self.pair = SparseGroup()  # gate and up in one product on the sparse core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.pair((self.gate, self.up), x)         # [B, T, F] each
        return self.drop(self.down(F.silu(gate) * up))        # [B, T, F] -> [B, T, C]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, var: Variations):
        super().__init__()
        self.ln1 = make_norm(cfg, var)
        self.attn = CausalSelfAttention(cfg, var)
        self.ln2 = make_norm(cfg, var)
        self.mlp = SwiGLU(cfg, var) if var.mlp == "swiglu" else MLP(cfg, var)

    def forward(self, x: torch.Tensor, cache: BlockCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)                # [B, T, C]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        var = variations(cfg)
        # the modules are made in the same order for every family: gpt2's random init draws stay as they were
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        # BioGPT's table has position_offset unused rows in front: kept, so its weights map one to one
        self.position_offset = var.position_offset
        self.wpe = nn.Embedding(cfg.max_positions + var.position_offset, cfg.d_model) if var.positions == "learned" else None
        # what the token embeddings are multiplied by (BioGPT's scale_embedding), 1 (none) otherwise
        self.embed_scale = math.sqrt(cfg.d_model) if var.scale_embedding else 1.0
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, var) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, var)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(m, "residual", False) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def sparse_layers(self) -> dict[str, SparseLinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, SparseLinear)}

    def embed(self, idx: torch.Tensor, prefix: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """Token + position embeddings from position ``start`` on; ``prefix`` [B, P, C] (soft prompt
        vectors) goes in front. Only the tokens are scaled (``embed_scale``): a prefix is already a vector
        of the scaled space, as transformers' ``inputs_embeds``."""
        tok = self.wte(idx)                                    # [B, T, C]
        if self.embed_scale != 1.0:  # gpt2 and llama skip the multiply: their runs stay bit for bit as they were
            tok = tok * self.embed_scale
        if prefix is not None:
            tok = torch.cat([prefix.to(tok.dtype), tok], dim=1)  # [B, P+T, C]
        end = start + tok.shape[1]
        if end > self.cfg.max_positions:
            raise ValueError(f"sequence of {end} tokens exceeds the model's maximum context {self.cfg.max_positions}")
        if self.wpe is None:  # rotary positions enter in attention
            return self.drop(tok)
        pos = torch.arange(start + self.position_offset, end + self.position_offset, device=idx.device)
        return self.drop(tok + self.wpe(pos))                  # [B, T, C]

    def hidden(self, idx: torch.Tensor, prefix: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states [B, P+T, C]. With ``cache`` (``KVCache(n_layer)``), idx continues the
        positions already in it (none on the first call) and the cache takes idx's keys and values."""
        x = self.embed(idx, prefix, cache.positions if cache is not None else 0)  # [B, P+T, C]
        for block, kv in zip(self.blocks, cache.blocks if cache is not None else [None] * len(self.blocks)):
            x = block(x, kv)
        return self.ln_f(x)                                    # [B, P+T, C]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, prefix: torch.Tensor | None = None):
        """Logits [B, T, V], or with targets [B, T] (-100 = ignore) ``(None, mean cross-entropy)``: the
        loss is taken without materialising the logits it need not keep (engine.model.head_loss)."""
        h = self.hidden(idx, prefix)                           # [B, T, C]
        if targets is None:
            return self.lm_head(h), None
        return None, lm_head_loss(h, self.lm_head.weight, targets)

    def num_params(self) -> int:
        """Parameters of the model as defined, zeros of masked matrices included (tied weights once)."""
        stored = sum(p.numel() for p in self.parameters())
        return stored + sum(m.out_features * m.in_features - m.values.numel()
                            for m in self.sparse_layers().values() if m.is_sparse)
