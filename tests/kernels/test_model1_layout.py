"""FlashMLA's MODEL1 FP8 page layout (`engram_kernels.mla_decode.model1_layout`), checked byte by byte against the
layout's description (FlashMLA tests/quant.py, MODEL1_FP8Sparse) computed here with plain Python math."""

from __future__ import annotations

import math

import pytest
import torch

from engram_kernels.mla_decode.model1_layout import Model1CacheLayout, dequantize_pages, quantize_pages, token_fields

V4 = Model1CacheLayout()


def test_v4_sizes_are_flashmla_model1s():
    assert (V4.token_data_bytes, V4.bytes_per_token, V4.num_tiles) == (576, 584, 7)
    assert V4.scales_offset == 64 * 576
    assert V4.page_bytes == math.ceil(64 * 584 / 576) * 576 == 37_440  # padded to a multiple of 576 bytes


def _expected_scale_exponent(values: list[float]) -> int:
    """ceil(log2(max(amax / 448, 1e-4))), the ue8m0 exponent, from Python floats."""
    return math.ceil(math.log2(max(max(abs(v) for v in values) / 448.0, 1e-4)))


@pytest.mark.parametrize("layout", [V4, Model1CacheLayout(nope_dim=128, rope_dim=16, tile=64, block_size=3)])
def test_every_field_of_every_token_is_where_the_layout_says(layout):
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, layout.block_size, layout.head_dim, generator=gen) * torch.logspace(-3, 2, layout.head_dim)
    kv[1, 0] = 0.0  # an all-zero token: the 1e-4 floor on the scale
    pages = quantize_pages(kv, layout)
    assert pages.dtype == torch.uint8 and tuple(pages.shape) == (2, layout.page_bytes)
    raw = pages.tolist()
    for p in range(2):
        for t in range(layout.block_size):
            data = bytes(raw[p][t * layout.token_data_bytes:(t + 1) * layout.token_data_bytes])
            slot = raw[p][layout.scales_offset + 8 * t: layout.scales_offset + 8 * (t + 1)]
            assert slot[layout.num_tiles:] == [0] * (8 - layout.num_tiles)  # the pad byte(s)
            for tile in range(layout.num_tiles):
                chunk = kv[p, t, tile * layout.tile:(tile + 1) * layout.tile]
                exponent = _expected_scale_exponent(chunk.tolist())
                assert slot[tile] == exponent + 127  # e8m0: a biased exponent byte
                want = (chunk.double() / 2.0 ** exponent).float().to(torch.float8_e4m3fn).view(torch.uint8)
                assert list(data[tile * layout.tile:(tile + 1) * layout.tile]) == want.tolist()
            rope = kv[p, t, layout.nope_dim:].to(torch.bfloat16).view(torch.uint8).tolist()
            assert list(data[layout.nope_dim:]) == rope  # bf16, little-endian, not quantized
        used = layout.scales_offset + 8 * layout.block_size
        assert raw[p][used:] == [0] * (layout.page_bytes - used)  # page padding


def test_round_trip_is_within_e4m3_precision_and_rope_is_bf16_exact():
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(3, V4.block_size, V4.head_dim, generator=gen) * 5
    back = dequantize_pages(quantize_pages(kv, V4), V4)
    rope = kv[..., V4.nope_dim:].to(torch.bfloat16).float()
    torch.testing.assert_close(back[..., V4.nope_dim:], rope, rtol=0, atol=0)
    nope, got = kv[..., :V4.nope_dim], back[..., :V4.nope_dim]
    tile_amax = nope.unflatten(-1, (7, 64)).abs().amax(-1, keepdim=True).expand(-1, -1, -1, 64).flatten(-2)
    # e4m3 keeps 3 mantissa bits (relative step 1/8, error <= 1/16); the power-of-two scale can leave a tile's
    # largest value at half of 448, so small values may fall to the subnormal step 2^-9 x scale.
    assert ((got - nope).abs() <= nope.abs() / 16 + tile_amax / 448 * 2 ** -8 + 1e-12).all()


def test_fields_read_back_as_typed_views():
    kv = torch.zeros(1, V4.block_size, V4.head_dim)
    kv[0, 5, :64] = 448.0 * 4  # tile 0 of token 5: scale exactly 4
    kv[0, 5, V4.nope_dim] = 1.5
    nope, rope, scales = token_fields(quantize_pages(kv, V4), V4)
    assert nope.dtype == torch.float8_e4m3fn and rope.dtype == torch.bfloat16 and scales.dtype == torch.float8_e8m0fnu
    assert scales[0, 5, 0].float() == 4.0 and nope[0, 5, 0].float() == 448.0 and rope[0, 5, 0].float() == 1.5
    assert scales[0, 5, 1].float() == 2.0 ** math.ceil(math.log2(1e-4))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="kv must be"):
        quantize_pages(torch.zeros(1, 63, 512), V4)
    with pytest.raises(ValueError, match="pages must be"):
        dequantize_pages(torch.zeros(1, 100, dtype=torch.uint8), V4)
    with pytest.raises(ValueError, match="multiple of tile"):
        Model1CacheLayout(nope_dim=100)
