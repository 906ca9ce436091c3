"""RotaryEmbedding.rotate against independent formulas: a complex multiply for the interleaved layout
(DeepSeek's own code) and HF's `rotate_half` for the split-halves layout, on every shape the model uses."""

from __future__ import annotations

import pytest
import torch

from model_worker.config import ModelConfig, RopeScaling
from model_worker.layers.rope import RotaryEmbedding

DIM = 16


def _rope(interleave: bool, yarn: bool = False) -> RotaryEmbedding:
    scaling = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0,
                          mscale_all_dim=0.0) if yarn else RopeScaling()
    return RotaryEmbedding(ModelConfig(qk_rope_head_dim=DIM, rope_interleave=interleave, rope_scaling=scaling))


def _angles(rope: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    return positions.double()[..., None] * rope.inv_freq.double()  # [..., dim/2]


def _complex_reference(x: torch.Tensor, angles: torch.Tensor, factor: float) -> torch.Tensor:
    """Pairs (x0, x1), (x2, x3), ... as complex numbers times factor * e^(i angle), in float64."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.full_like(angles, factor), angles)).flatten(-2)


def _rotate_half_reference(x: torch.Tensor, angles: torch.Tensor, factor: float) -> torch.Tensor:
    """HF: x * cos + rotate_half(x) * sin with cos/sin repeated over both halves, in float64."""
    cos, sin = (torch.cat((t, t), dim=-1) * factor for t in (angles.cos(), angles.sin()))
    first, second = x.double().chunk(2, dim=-1)
    return x.double() * cos + torch.cat((-second, first), dim=-1) * sin


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("yarn", [False, True])
def test_rotate_matches_the_layouts_formula(interleave, yarn):
    rope = _rope(interleave, yarn)
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 7, 300], [5, 4096, 2, 9]])  # [B=2, T=4]
    cos, sin = rope.cos_sin(positions)
    assert cos.shape == sin.shape == (2, 4, DIM)
    reference = _complex_reference if interleave else _rotate_half_reference
    angles = _angles(rope, positions)
    if yarn:
        assert rope.attention_factor != 1.0
    keys = torch.randn(2, 4, DIM, generator=gen)  # [B, T, dim]: k_rope
    torch.testing.assert_close(rope.rotate(keys, cos, sin).double(),
                               reference(keys, angles, rope.attention_factor), rtol=1e-5, atol=1e-5)
    queries = torch.randn(2, 4, 3, DIM, generator=gen)  # [B, T, H, dim]: q_rope
    want = reference(queries, angles[:, :, None], rope.attention_factor)
    torch.testing.assert_close(rope.rotate(queries, cos, sin).double(), want, rtol=1e-5, atol=1e-5)
    # The engine's flat step batch: [N, H, dim] with the tables of one row, [N, dim].
    torch.testing.assert_close(rope.rotate(queries[0], cos[0], sin[0]).double(), want[0], rtol=1e-5, atol=1e-5)


def test_rotate_keeps_bf16_and_a_strided_input():
    rope = _rope(interleave=True)
    positions = torch.arange(6)[None]
    cos, sin = rope.cos_sin(positions)
    wide = torch.randn(1, 6, 4, DIM + 8)
    x = wide[..., 8:]  # a non-contiguous slice, as q_rope is a slice of the q projection
    out = rope.rotate(x.bfloat16(), cos, sin)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    want = _complex_reference(x.bfloat16().float(), _angles(rope, positions)[:, :, None], 1.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rope.rotate(x, cos, sin), rope.rotate(x.contiguous(), cos, sin), rtol=0, atol=0)


def test_position_zero_is_the_identity_and_norms_are_kept():
    rope = _rope(interleave=False)
    cos, sin = rope.cos_sin(torch.tensor([[0, 123]]))
    x = torch.randn(1, 2, DIM)
    out = rope.rotate(x, cos, sin)
    torch.testing.assert_close(out[0, 0], x[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6)
