"""Rotary position embeddings with optional YaRN scaling, in DeepSeek's two layouts.

`interleaved=True` rotates adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's own code, a complex
multiply); `interleaved=False` rotates the two halves (x_i, x_{i+d/2}) (HF `rotate_half`). Both give the
same attention scores for a consistently permuted weight, but they are different functions of the
weights, so the layout must match the checkpoint. YaRN follows the formulas in MODEL_SPEC.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model_worker.config import ModelConfig, RopeScaling


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, rope: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] blended between interpolation and extrapolation, and the cos/sin
    attention factor."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = base**exponents
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rope.factor * pos_freqs)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    if rope.attention_factor is not None:
        factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        factor = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        factor = _yarn_mscale(rope.factor)
    return inv_freq, float(factor)


def softmax_scale(config: ModelConfig) -> float:
    """(nope + rope)^-0.5, times mscale^2 under YaRN with mscale_all_dim."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope_scaling
    if rope.rope_type == "yarn" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for positions and rotates q/k rope parts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.qk_rope_head_dim
        if config.rope_scaling.rope_type == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(dim, config.rope_theta, config.rope_scaling)
        else:
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        # V2 always uses DeepSeek's interleaved (complex) layout; V3 follows rope_interleave.
        self.interleaved = config.rope_interleave or config.model_type == "deepseek_v2"
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [dim/2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int -> (cos, sin) tables [B, T, dim] fp32 for `rotate` (attention factor applied).

        Full width, laid out like the rotated vector: each frequency's cos appears at both members of its
        pair, and sin carries the rotation's sign (-sin at a pair's first member, +sin at its second), so
        rotating is two multiplies and an add. Build once per step; every layer reuses them."""
        angles = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [B, T, dim/2]
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        if self.interleaved:  # pairs (x0, x1), (x2, x3), ...
            return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # halves (x_i, x_{i+dim/2})

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, H, dim] or [..., T, dim]; cos/sin [..., T, dim] from `cos_sin`. Output keeps x's layout
        and dtype.

        x * cos + partner(x) * sin, where partner swaps the members of each pair: for a pair (a, b) at angle t
        this is (a cos t - b sin t, b cos t + a sin t), the complex product (a + ib) e^(it)."""
        if x.dim() == cos.dim() + 1:  # a head axis
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        x32 = x if x.dtype == torch.float32 else x.float()
        if self.interleaved:
            partner = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        else:
            partner = x32.roll(x32.shape[-1] // 2, dims=-1)
        out = torch.addcmul(x32 * cos, partner, sin)
        return out if out.dtype == x.dtype else out.to(x.dtype)
