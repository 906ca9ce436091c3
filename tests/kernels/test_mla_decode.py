"""Paged MLA decode attention: the reference against dense softmax attention over each sequence's
context, and the Triton kernel (run by the interpreter on CPU) and the gathered torch form against the
reference, for bf16 and FP8 (FlashMLA V3.2 layout) pages, ragged lengths and shuffled block tables."""

from __future__ import annotations

import pytest
import torch

from engram_kernels.mla_decode import (
    DecodeGather,
    LatentCacheLayout,
    pack_tokens,
    paged_mla_decode,
    paged_mla_decode_gathered,
    paged_mla_decode_ref,
    paged_mla_decode_triton,
    unpack_tokens,
)

BLOCK = 64
RAGGED_LENS = (1, 63, 64, 65, 200)


def _garbage_rows(layout: LatentCacheLayout, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows full of NaN (bf16 / fp32 NaN, e4m3 0x7F codes and NaN scales): what a stale slot may hold."""
    if layout.is_plain:
        return torch.full((*shape, layout.row_width), float("nan"), dtype=layout.storage_dtype)
    return torch.full((*shape, layout.row_width), 0x7F, dtype=torch.uint8)


def _paged_context(layout, lens, num_blocks, seed):
    """Random contexts written to shuffled pages of a cache whose other slots hold NaN garbage.

    Returns cache [num_blocks, BLOCK, row_width], block_table int32 [B, max_blocks] (unused entries
    -1), context_lens int32 [B], and each sequence's slot ids (logical order)."""
    g = torch.Generator().manual_seed(seed)
    cache = _garbage_rows(layout, (num_blocks, BLOCK))
    pages_needed = [-(-n // BLOCK) for n in lens]
    max_blocks = max(pages_needed) + 1
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_table = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    slots = []
    for b, (n, n_pages) in enumerate(zip(lens, pages_needed)):
        pages = [perm.pop() for _ in range(n_pages)]
        block_table[b, :n_pages] = torch.tensor(pages, dtype=torch.int32)
        seq_slots = (torch.tensor(pages)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
        latent = torch.randn(n, layout.kv_lora_rank, generator=g)
        k_rope = torch.randn(n, layout.rope_dim, generator=g)
        cache.view(-1, layout.row_width)[seq_slots] = pack_tokens(layout, latent, k_rope)
        slots.append(seq_slots)
    return cache, block_table, torch.tensor(lens, dtype=torch.int32), slots


def _queries(batch, heads, layout, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(batch, heads, layout.kv_lora_rank, generator=g).to(dtype)
    q_rope = torch.randn(batch, heads, layout.rope_dim, generator=g).to(dtype)
    return q_lat, q_rope


def _dense_attention(q_lat, q_rope, latent, k_rope, scale) -> torch.Tensor:
    """Plain softmax attention in float64 of H queries over L keys [c | k_rope], values c. -> [H, r]."""
    q = torch.cat((q_lat, q_rope), dim=-1).double()  # [H, r + rope]
    k = torch.cat((latent, k_rope), dim=-1).double()  # [L, r + rope]
    weights = torch.softmax(q @ k.T * scale, dim=-1)  # [H, L]
    return (weights @ latent.double()).float()


def _run(impl, q_lat, q_rope, cache, block_table, lens, layout, scale=0.125):
    return impl(q_lat, q_rope, cache, block_table, lens, scale, layout.kv_lora_rank, layout.rope_dim,
                fmt=layout.fmt, block_size=BLOCK)


@pytest.mark.parametrize("fmt", ["bf16", "fp32", "fp8"])
def test_reference_equals_dense_attention_over_each_sequence_context(fmt):
    layout = LatentCacheLayout(64, 16, fmt)
    cache, block_table, lens, slots = _paged_context(layout, RAGGED_LENS, num_blocks=12, seed=1)
    q_lat, q_rope = _queries(len(RAGGED_LENS), 3, layout, seed=2)
    got = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout, scale=0.2)
    assert got.dtype == torch.float32 and got.shape == q_lat.shape
    assert torch.isfinite(got).all()  # NaN garbage in slots past each context never leaks in
    for b, seq_slots in enumerate(slots):
        latent, k_rope = unpack_tokens(layout, cache.view(-1, layout.row_width)[seq_slots])
        want = _dense_attention(q_lat[b], q_rope[b], latent, k_rope, 0.2)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)


def test_reference_with_one_token_context_returns_that_latent():
    """softmax over a single key is 1: the output is exactly that token's latent, whatever q is."""
    layout = LatentCacheLayout(64, 16, "bf16")
    cache, block_table, lens, slots = _paged_context(layout, (1,), num_blocks=3, seed=3)
    q_lat, q_rope = _queries(1, 4, layout, seed=4)
    got = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout)
    latent, _ = unpack_tokens(layout, cache.view(-1, layout.row_width)[slots[0]])
    assert torch.equal(got[0], latent.expand(4, -1))


def _gathered(q_lat, q_rope, cache, block_table, lens, scale, rank, rope, fmt, block_size):
    """paged_mla_decode_gathered behind the reference's signature (page walk built here, as per step)."""
    gather = DecodeGather.build(block_table, lens, block_size, int(lens.max()), int(lens.min()))
    return paged_mla_decode_gathered(q_lat, q_rope, cache, gather, scale, LatentCacheLayout(rank, rope, fmt))


IMPLEMENTATIONS = pytest.mark.parametrize("impl", [paged_mla_decode_triton, _gathered], ids=["triton", "gathered"])


@IMPLEMENTATIONS
@pytest.mark.parametrize("fmt", ["bf16", "fp32", "fp8"])
@pytest.mark.parametrize("rank,rope,heads", [(64, 16, 5), (128, 32, 3), (96, 8, 2)])
def test_matches_reference_on_ragged_lengths_and_shuffled_pages(impl, fmt, rank, rope, heads):
    """Ragged contexts (1, page-1, page, page+1, several pages) in shuffled pages."""
    layout = LatentCacheLayout(rank, rope, fmt)
    cache, block_table, lens, _ = _paged_context(layout, RAGGED_LENS, num_blocks=13, seed=rank + rope)
    for seed in (5, 15):
        q_lat, q_rope = _queries(len(RAGGED_LENS), heads, layout, seed=seed)
        want = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout)
        got = _run(impl, q_lat, q_rope, cache, block_table, lens, layout)
        assert got.dtype == torch.float32 and got.shape == q_lat.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@IMPLEMENTATIONS
@pytest.mark.parametrize("fmt", ["bf16", "fp32", "fp8"])
@pytest.mark.parametrize("lens", [(70, 70, 70), (1,), (64, 64)])
def test_matches_reference_when_every_context_has_the_same_length(impl, fmt, lens):
    """Equal lengths (a lone sequence, lockstep batches) take the gathered form's unmasked path."""
    layout = LatentCacheLayout(64, 16, fmt)
    cache, block_table, lens, _ = _paged_context(layout, lens, num_blocks=8, seed=len(lens))
    q_lat, q_rope = _queries(len(lens), 4, layout, seed=9)
    want = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout)
    torch.testing.assert_close(_run(impl, q_lat, q_rope, cache, block_table, lens, layout), want,
                               rtol=1e-5, atol=1e-5)


@IMPLEMENTATIONS
@pytest.mark.parametrize("fmt", ["bf16", "fp32", "fp8"])
def test_matches_reference_for_v3_dims(impl, fmt):
    """kv_lora_rank 512, rope 64: FP8 rows are the 656-byte V3.2 layout with 4 scale tiles."""
    layout = LatentCacheLayout(512, 64, fmt)
    cache, block_table, lens, _ = _paged_context(layout, (5, 70), num_blocks=4, seed=6)
    for seed, heads, scale in ((7, 2, 0.125), (17, 3, 0.05)):
        q_lat, q_rope = _queries(2, heads, layout, seed=seed)
        want = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout, scale=scale)
        got = _run(impl, q_lat, q_rope, cache, block_table, lens, layout, scale=scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_triton_accepts_bf16_queries_like_the_reference():
    layout = LatentCacheLayout(64, 16, "fp8")
    cache, block_table, lens, _ = _paged_context(layout, (30, 100), num_blocks=5, seed=8)
    q_lat, q_rope = _queries(2, 4, layout, seed=9, dtype=torch.bfloat16)
    want = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout)
    got = _run(paged_mla_decode_triton, q_lat, q_rope, cache, block_table, lens, layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dispatcher_runs_the_reference_on_cpu_tensors():
    layout = LatentCacheLayout(64, 16, "bf16")
    cache, block_table, lens, _ = _paged_context(layout, (10, 70), num_blocks=4, seed=10)
    q_lat, q_rope = _queries(2, 2, layout, seed=11)
    want = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout)
    assert torch.equal(_run(paged_mla_decode, q_lat, q_rope, cache, block_table, lens, layout), want)


def _bad_call(**overrides):
    layout = LatentCacheLayout(64, 16, "bf16")
    cache, block_table, lens, _ = _paged_context(layout, (10, 70), num_blocks=4, seed=12)
    q_lat, q_rope = _queries(2, 2, layout, seed=13)
    args = dict(q_lat=q_lat, q_rope=q_rope, cache=cache, block_table=block_table, context_lens=lens,
                scale=0.1, kv_lora_rank=64, rope_dim=16, fmt="bf16", block_size=BLOCK)
    args.update(overrides)
    return args


@pytest.mark.parametrize("impl", [paged_mla_decode_ref, paged_mla_decode_triton])
@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(context_lens=torch.tensor([0, 70], dtype=torch.int32)), ValueError, "context_lens"),
        (dict(context_lens=torch.tensor([10, 500], dtype=torch.int32)), ValueError, "context_lens"),
        (dict(block_table=torch.tensor([[0, -1, -1], [9, 1, -1]], dtype=torch.int32)), ValueError, "block_table"),
        (dict(block_table=torch.zeros(2, 3)), TypeError, "block_table"),
        (dict(q_rope=torch.zeros(2, 2, 8)), ValueError, "q_rope"),
        (dict(q_lat=torch.zeros(2, 2, 64, dtype=torch.int32)), TypeError, "q_lat"),
        (dict(cache=torch.zeros(4, BLOCK, 80, dtype=torch.uint8)), TypeError, "cache"),
        (dict(fmt="fp16"), ValueError, "fmt"),
        (dict(scale=0.0), ValueError, "scale"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(impl, overrides, error, match):
    with pytest.raises(error, match=match):
        impl(**_bad_call(**overrides))


def test_triton_rejects_a_page_size_it_cannot_tile():
    layout = LatentCacheLayout(64, 16, "bf16")
    cache = torch.zeros(2, 24, layout.row_width, dtype=torch.bfloat16)
    q_lat, q_rope = _queries(1, 1, layout, seed=14)
    with pytest.raises(ValueError, match="block_size"):
        paged_mla_decode_triton(q_lat, q_rope, cache, torch.zeros(1, 1, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), 0.1, 64, 16, block_size=24)


# ---- gathered (batched torch) form, the engine's CPU decode path ----------------------------------


@pytest.mark.parametrize("fmt", ["bf16", "fp32", "fp8"])
def test_gathered_never_reads_unused_pages_or_stale_slots(fmt):
    """block_table is -1 past each sequence's pages and every other slot holds NaN: the output is finite
    and equals the reference, also with the shortest context far below max_len."""
    layout = LatentCacheLayout(64, 16, fmt)
    lens_list = (1, 130, 2, 65)
    cache, block_table, lens, _ = _paged_context(layout, lens_list, num_blocks=9, seed=18)
    assert (block_table == -1).any()
    q_lat, q_rope = _queries(len(lens_list), 4, layout, seed=19)
    gather = DecodeGather.build(block_table, lens, BLOCK, int(lens.max()))
    assert ((gather.slots >= 0) & (gather.slots < cache.shape[0] * BLOCK)).all()
    got = paged_mla_decode_gathered(q_lat, q_rope, cache, gather, 0.125, layout)
    assert torch.isfinite(got).all()
    want = _run(paged_mla_decode_ref, q_lat, q_rope, cache, block_table, lens, layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gathered_reuses_one_page_walk_for_several_layers_and_bf16_queries():
    """One DecodeGather (built once per step) serves every layer's cache: each layer = the reference."""
    layout = LatentCacheLayout(64, 16, "fp8")
    cache, block_table, lens, slots = _paged_context(layout, (30, 100, 7), num_blocks=6, seed=20)
    other = cache.clone()  # a second layer: same pages, different latents
    g = torch.Generator().manual_seed(21)
    for seq_slots in slots:
        n = len(seq_slots)
        other.view(-1, layout.row_width)[seq_slots] = pack_tokens(
            layout, torch.randn(n, 64, generator=g), torch.randn(n, 16, generator=g))
    gather = DecodeGather.build(block_table, lens, BLOCK, int(lens.max()))
    q_lat, q_rope = _queries(3, 2, layout, seed=22, dtype=torch.bfloat16)
    outs = []
    for layer_cache in (cache, other):
        want = _run(paged_mla_decode_ref, q_lat, q_rope, layer_cache, block_table, lens, layout)
        got = paged_mla_decode_gathered(q_lat, q_rope, layer_cache, gather, 0.125, layout)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])  # the layers really differ
