"""Rotary positions (the llama family's): each head's q and k are rotated by angles that grow with the
position, so their dot product depends on the distance between positions only.

Feature pairs are (i, i + head/2) (the "rotate half" layout of the llama checkpoints, not adjacent
pairs); the angle of pair i at position p is p * theta^(-2i / head). Angles are computed in fp32."""
from __future__ import annotations

import torch


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of ``positions`` [T]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]          # [T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)                      # [T, head_dim]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, T, head_dim] rotated by the angles of its positions."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)     # each pair's 90-degree partner
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)
