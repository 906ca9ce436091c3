"""PagedLatentCache: slot writes and per-sequence gathers round-trip, FP8 rows follow FlashMLA's V3.2
byte layout (checked by decoding the raw bytes with `struct`, independently of the cache code), and
the bytes per token measured on the real tensors equal the layout's figures (656 / 1152 for V3)."""

from __future__ import annotations

import struct

import pytest
import torch

from model_worker.engine.kv_cache import PagedLatentCache

BLOCK = 64


def _tokens(n: int, rank: int, rope: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent [n, rank] and k_rope [n, rope], values exactly representable in bf16, magnitudes varying per token."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp2(torch.randint(-5, 6, (n, 1), generator=g).float())
    latent = (torch.randn(n, rank, generator=g) * size).bfloat16().float()
    k_rope = torch.randn(n, rope, generator=g).bfloat16().float()
    return latent, k_rope


def _shuffled_pages(num_blocks: int, n_pages: int, seed: int) -> list[int]:
    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:n_pages].tolist()


def _slots(pages: list[int], length: int) -> torch.Tensor:
    return (torch.tensor(pages)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]


def _decode_fp8_row(row: bytes, rank: int, rope: int) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Raw 656-style row -> (e4m3 values as float32 [rank], tile scales, k_rope float32 [rope])."""
    tile = min(128, rank)
    codes = torch.frombuffer(bytearray(row[:rank]), dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    scales = list(struct.unpack(f"<{rank // tile}f", row[rank : rank + 4 * (rank // tile)]))
    rope_bits = struct.unpack(f"<{rope}H", row[rank + 4 * (rank // tile) :])
    k_rope = torch.tensor([struct.unpack("<f", struct.pack("<I", bits << 16))[0] for bits in rope_bits])
    return values, scales, k_rope


@pytest.mark.parametrize("fmt", ["bf16", "fp32"])
def test_plain_write_then_gather_round_trips_exactly_through_shuffled_pages(fmt):
    cache = PagedLatentCache(num_layers=2, num_blocks=9, kv_lora_rank=64, rope_dim=16, fmt=fmt)
    latent, k_rope = _tokens(150, 64, 16, seed=0)
    if fmt == "fp32":  # fp32 rows keep any fp32 value, not only bf16-representable ones
        latent, k_rope = latent + 1e-4 * torch.rand_like(latent), k_rope + 1e-4 * torch.rand_like(k_rope)
    pages = _shuffled_pages(9, 3, seed=1)
    cache.write(1, _slots(pages, 150), latent, k_rope)
    got_latent, got_rope = cache.gather(1, pages, 150)
    assert got_latent.dtype == torch.float32 and got_rope.dtype == torch.float32
    assert torch.equal(got_latent, latent) and torch.equal(got_rope, k_rope)
    assert not cache.layer_storage(0).any()  # another layer's storage is untouched
    prefix_latent, _ = cache.gather(1, torch.tensor(pages[:2], dtype=torch.int32), 100)
    assert torch.equal(prefix_latent, latent[:100])


def test_write_stores_each_token_at_its_own_slot_in_any_order():
    cache = PagedLatentCache(num_layers=1, num_blocks=3, kv_lora_rank=32, rope_dim=8, fmt="bf16")
    latent, k_rope = _tokens(40, 32, 8, seed=2)
    slots = torch.randperm(cache.num_slots, generator=torch.Generator().manual_seed(3))[:40]
    cache.write(0, slots, latent, k_rope)
    flat = cache.layer_storage(0).view(cache.num_slots, -1).float()  # [slots, 40]
    assert torch.equal(flat[slots], torch.cat((latent, k_rope), dim=-1))
    untouched = torch.ones(cache.num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert not flat[untouched].any()


@pytest.mark.parametrize("rank,rope", [(512, 64), (64, 16), (48, 8)])
def test_fp8_rows_hold_e4m3_tiles_then_fp32_scales_then_bf16_rope(rank, rope):
    cache = PagedLatentCache(num_layers=1, num_blocks=2, kv_lora_rank=rank, rope_dim=rope, fmt="fp8")
    latent, k_rope = _tokens(5, rank, rope, seed=4)
    latent[0] = 0.0  # an all-zero token gets the floor scale 1e-4 / 448
    slots = torch.tensor([70, 3, 127, 64, 0])
    cache.write(0, slots, latent, k_rope)
    storage = cache.layer_storage(0)
    assert storage.dtype == torch.uint8 and storage.shape == (2, BLOCK, cache.bytes_per_token(rank, rope, "fp8"))
    flat = storage.view(cache.num_slots, -1)
    tile = min(128, rank)
    got_latent, got_rope = cache.gather(0, [0, 1], 128)
    for i, slot in enumerate(slots.tolist()):
        values, scales, row_rope = _decode_fp8_row(flat[slot].numpy().tobytes(), rank, rope)
        tiles = latent[i].view(-1, tile).double()
        want_scales = [torch.tensor(max(t.abs().max().item(), 1e-4) / 448.0, dtype=torch.float32).item() for t in tiles]
        assert scales == want_scales
        dequant = values * torch.tensor(scales).repeat_interleave(tile)
        assert torch.equal(got_latent[slot], dequant)  # gather = e4m3 * scale, nothing else
        assert torch.equal(row_rope, k_rope[i]) and torch.equal(got_rope[slot], k_rope[i])  # rope is exact
        assert values.abs().max() <= 448.0


@pytest.mark.parametrize("rank,rope", [(512, 64), (96, 32)])
def test_fp8_round_trip_is_within_e4m3_rounding(rank, rope):
    cache = PagedLatentCache(num_layers=1, num_blocks=4, kv_lora_rank=rank, rope_dim=rope, fmt="fp8")
    latent, k_rope = _tokens(200, rank, rope, seed=5)
    pages = _shuffled_pages(4, 4, seed=6)
    cache.write(0, _slots(pages, 200), latent, k_rope)
    got, got_rope = cache.gather(0, pages, 200)
    tile = min(128, rank)
    scale = latent.view(200, -1, tile).abs().amax(-1).clamp_min(1e-4) / 448  # [200, tiles]
    # e4m3: 3 mantissa bits -> half-ulp 2^-4 relative for normals; absolute 2^-10 * scale below 2^-6
    bound = torch.maximum(latent.abs() * 2.0**-4, scale.repeat_interleave(tile, -1) * 2.0**-10)
    assert ((got - latent).abs() <= bound * 1.0001).all()
    assert torch.equal(got_rope, k_rope)


@pytest.mark.parametrize(
    "rank,rope,fmt,expected",
    [(512, 64, "fp8", 656), (512, 64, "bf16", 1152), (64, 16, "fp8", 64 + 4 + 32), (256, 32, "fp8", 256 + 8 + 64),
     (48, 8, "bf16", 112), (512, 64, "fp32", 2304)],
)
def test_bytes_per_token_follows_the_layout_rule(rank, rope, fmt, expected):
    assert PagedLatentCache.bytes_per_token(rank, rope, fmt) == expected


@pytest.mark.parametrize("fmt,expected", [("fp8", 656), ("bf16", 1152)])
def test_measured_bytes_per_token_per_layer_equals_the_v3_layout_figure(fmt, expected):
    cache = PagedLatentCache(num_layers=3, num_blocks=2, kv_lora_rank=512, rope_dim=64, fmt=fmt)
    real_bytes = sum(cache.layer_storage(i).untyped_storage().nbytes() for i in range(3))
    assert real_bytes == expected * 3 * 2 * BLOCK
    assert cache.measured_bytes_per_token_per_layer == expected


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(fmt="fp16"), ValueError, "fmt"),
        (dict(kv_lora_rank=200, fmt="fp8"), ValueError, "kv_lora_rank"),
        (dict(rope_dim=7, fmt="fp8"), ValueError, "rope_dim"),
        (dict(num_blocks=0), ValueError, "num_blocks"),
        (dict(block_size=-1), ValueError, "block_size"),
    ],
)
def test_bad_construction_raises_naming_the_argument(kwargs, error, match):
    args = dict(num_layers=1, num_blocks=2, kv_lora_rank=64, rope_dim=16) | kwargs
    with pytest.raises(error, match=match):
        PagedLatentCache(**args)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda c, lat, rope: c.write(0, torch.tensor([0, 128]), lat, rope), ValueError, "slot_mapping"),
        (lambda c, lat, rope: c.write(0, torch.tensor([0.0, 1.0]), lat, rope), TypeError, "slot_mapping"),
        (lambda c, lat, rope: c.write(0, torch.tensor([0, 1, 2]), lat, rope), ValueError, "slot_mapping"),
        (lambda c, lat, rope: c.write(0, torch.tensor([0, 1]), lat[:, :8], rope), ValueError, "latent"),
        (lambda c, lat, rope: c.write(0, torch.tensor([0, 1]), lat, rope.int()), TypeError, "k_rope"),
        (lambda c, lat, rope: c.write(2, torch.tensor([0, 1]), lat, rope), ValueError, "layer"),
        (lambda c, lat, rope: c.gather(0, [0], 65), ValueError, "length"),
        (lambda c, lat, rope: c.gather(0, [5], 3), ValueError, "block_table"),
    ],
)
def test_bad_write_or_gather_raises_naming_the_argument(call, error, match):
    cache = PagedLatentCache(num_layers=1, num_blocks=2, kv_lora_rank=32, rope_dim=8, fmt="fp8")
    latent, k_rope = _tokens(2, 32, 8, seed=7)
    with pytest.raises(error, match=match):
        call(cache, latent, k_rope)
