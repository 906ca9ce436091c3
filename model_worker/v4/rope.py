"""V4's two RoPEs and how they rotate a head (docs/v4-model-spec.md, 3.2).

"main" (sliding-window layers): plain RoPE with rope_theta. "compress" (CSA/HCA layers, their compressed
entries and the indexer): compress_rope_theta, YaRN-scaled when the checkpoint says so. Both rotate the
trailing `rd` channels of a head as interleaved pairs (2i, 2i+1); `inverse` rotates back (position -p), as
the attention does to its output.
"""

from __future__ import annotations

import math

import torch

from model_worker.v4.config import V4Config


def inverse_frequencies(base: float, rd: int, yarn: dict | None = None) -> tuple[torch.Tensor, float]:
    """(theta_i for i < rd/2, fp32 [rd/2]; the attention scaling cos and sin are multiplied by)."""
    theta = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32, device="cpu") / rd))
    if not yarn or yarn.get("rope_type") != "yarn":
        return theta, 1.0
    original = yarn["original_max_position_embeddings"]
    factor = yarn.get("factor") or yarn["max_position_embeddings"] / original
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
        return rd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction(beta_fast)), 0), min(math.ceil(correction(beta_slow)), rd - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rd // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    return theta / factor * ramp + theta * (1 - ramp), float(yarn.get("attention_factor") or 1.0)


class V4Rope:
    """cos/sin tables of one RoPE kind for given positions, and the rotation itself."""

    def __init__(self, config: V4Config, kind: str):
        self.rd = config.qk_rope_head_dim
        if kind == "main":
            self.theta, self.scale = inverse_frequencies(config.rope_theta, self.rd)
        else:
            yarn = {**config.compress_rope, "max_position_embeddings": config.max_position_embeddings}
            self.theta, self.scale = inverse_frequencies(config.compress_rope_theta, self.rd, yarn)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int [P] -> (cos, sin) fp32 [P, rd/2]."""
        angles = positions.to(torch.float32)[:, None] * self.theta.to(positions.device)[None, :]
        return angles.cos() * self.scale, angles.sin() * self.scale

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [..., P, d] (d >= rd) with tables [P, rd/2] -> x with its trailing rd channels rotated (in fp32,
        back to x.dtype); inverse rotates by -position."""
        rd = self.rd
        rot = x[..., -rd:].float()
        a, b = rot[..., 0::2], rot[..., 1::2]
        sin = -sin if inverse else sin
        turned = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        return torch.cat((x[..., :-rd], turned.to(x.dtype)), dim=-1)
