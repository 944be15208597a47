"""Rotary positions (the llama family's): each head's q and k are rotated by angles that grow with the
position, so their dot product depends on the distance between positions only.

Feature pairs are (i, i + head/2) (the "rotate half" layout of the llama checkpoints, not adjacent
pairs); the angle of pair i at position p is p * f_i, with the frequency f_i = theta^(-2i / head). Angles
are computed in fp32.

Scaling (``model.rope_scaling``, transformers' ``rope_type``) stretches the frequencies so a model reaches
past the context it was pre-trained with; neither kind rescales the attention (transformers' attention
factor is 1 for both):

* ``linear``: every f_i divided by the factor (position p looks like p / factor);
* ``llama3`` (Llama 3.1, 3.2): a pair whose wavelength 2*pi / f_i is longer than original / low_freq_factor
  is divided by the factor, one shorter than original / high_freq_factor is kept, and one in between is
  blended, s * f_i + (1 - s) * f_i / factor with s = (original / wavelength - low) / (high - low) running
  from 0 at the long end to 1 at the short one (``original`` is the pre-training context).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Scaling:
    """A rotary scaling other than none (model.rope_* keys)."""

    kind: str                 # "linear" or "llama3"
    factor: float
    low_freq_factor: float    # llama3 only
    high_freq_factor: float   # llama3 only
    original_positions: int   # llama3 only: the pre-training context

    @classmethod
    def of(cls, cfg) -> Scaling | None:
        """The scaling a ModelConfig asks for; None without one (the frequencies exactly as before)."""
        if cfg.rope_scaling == "none":
            return None
        return cls(cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                   cfg.rope_original_max_positions or cfg.max_positions)


def inverse_frequencies(head_dim: int, theta: float, device, scaling: Scaling | None = None) -> torch.Tensor:
    """f_i [head_dim/2] (fp32), scaled as ``scaling`` says."""
    freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    if scaling is None:
        return freq
    if scaling.kind == "linear":
        return freq / scaling.factor
    if scaling.kind != "llama3":
        raise ValueError(f"unknown rotary scaling {scaling.kind!r}")
    original, low, high = scaling.original_positions, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / freq
    stretched = freq / scaling.factor
    share = (original / wavelength - low) / (high - low)  # of the unscaled frequency, between the two limits
    blended = (1 - share) * stretched + share * freq
    out = torch.where(wavelength > original / low, stretched, blended)
    return torch.where(wavelength < original / high, freq, out)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float,
                  scaling: Scaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of ``positions`` [T]."""
    inv_freq = inverse_frequencies(head_dim, theta, positions.device, scaling)
    angles = positions.float()[:, None] * inv_freq[None, :]          # [T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)                      # [T, head_dim]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, T, head_dim] rotated by the angles of its positions."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)     # each pair's 90-degree partner
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)
