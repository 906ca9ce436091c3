"""Paged MLA decode attention in absorbed form: torch reference, Triton entry point and dispatcher.

One query token per sequence attends over that sequence's cached latents, read through its block
table (pages of `block_size` tokens, see `layout` for a token's row):

    score[b, h, s] = (q_lat[b, h] . c[b, s] + q_rope[b, h] . k_rope[b, s]) * scale,  s < context_lens[b]
    o_lat[b, h]    = sum_s softmax_s(score[b, h]) * c[b, s]                          -> [B, H, r] fp32

The caller folds W_UK into q_lat beforehand and applies W_UV and o_proj afterwards. The reference is
the definition (fp32 throughout); `decode_kernel` is the Triton kernel that must match it. Writing the
cache, and prefill attention, are not done here.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.mla_decode.layout import LatentCacheLayout, unpack_tokens
from engram_kernels.quant.fp8_format import check_float

INDEX_DTYPES = (torch.int32, torch.int64)


def _check_index(t: torch.Tensor, name: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dim(s), got shape {tuple(t.shape)}")


def check_decode_args(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    layout: LatentCacheLayout,
    block_size: int,
) -> None:
    """Validate shapes, dtypes and devices, and that every used page id and length is in range."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    check_float(q_lat, "q_lat", min_dim=3)
    check_float(q_rope, "q_rope", min_dim=3)
    if q_lat.dim() != 3 or q_lat.shape[-1] != layout.kv_lora_rank:
        raise ValueError(f"q_lat must have shape [B, H, {layout.kv_lora_rank}], got {tuple(q_lat.shape)}")
    batch, heads = q_lat.shape[:2]
    if tuple(q_rope.shape) != (batch, heads, layout.rope_dim):
        raise ValueError(f"q_rope must have shape [{batch}, {heads}, {layout.rope_dim}], got {tuple(q_rope.shape)}")
    if not isinstance(cache, torch.Tensor) or cache.dtype != layout.storage_dtype:
        raise TypeError(f"cache must be a {layout.storage_dtype} tensor for fmt {layout.fmt!r}")
    if cache.dim() != 3 or cache.shape[1:] != (block_size, layout.row_width):
        want = f"[num_blocks, {block_size}, {layout.row_width}]"
        raise ValueError(f"cache must have shape {want}, got {tuple(cache.shape)}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous")
    _check_index(block_table, "block_table", 2)
    _check_index(context_lens, "context_lens", 1)
    if block_table.shape[0] != batch or context_lens.shape[0] != batch:
        raise ValueError(
            f"block_table [B, max_blocks] and context_lens [B] must have B = {batch}, "
            f"got {tuple(block_table.shape)} and {tuple(context_lens.shape)}"
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    devices = {t.device for t in (q_lat, q_rope, cache, block_table, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"q_lat, q_rope, cache, block_table and context_lens must share a device, got {devices}")
    if batch:
        _check_index_values(cache.shape[0], block_table, context_lens, block_size)


def _check_index_values(num_blocks: int, block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int):
    """1 <= context_lens[b] <= max_blocks * block_size; used page ids in [0, num_blocks). One host sync."""
    max_blocks = block_table.shape[1]
    used = torch.arange(max_blocks, device=block_table.device) * block_size < context_lens[:, None]  # [B, P]
    bad_page = used & ((block_table < 0) | (block_table >= num_blocks))
    min_len, max_len, any_bad_page = torch.stack(
        (context_lens.min(), context_lens.max(), bad_page.any().to(context_lens.dtype))
    ).tolist()
    if min_len < 1 or max_len > max_blocks * block_size:
        raise ValueError(
            f"context_lens must lie in [1, {max_blocks * block_size}] (max_blocks * block_size), "
            f"got min {min_len} max {max_len}"
        )
    if any_bad_page:
        raise ValueError(f"block_table: page ids used by context_lens must lie in [0, {num_blocks})")


def paged_mla_decode_ref(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    rope_dim: int,
    fmt: str = "bf16",
    block_size: int = 64,
) -> torch.Tensor:
    """Decode attention over paged latents, torch reference, fp32.

    q_lat [B, H, r]; q_rope [B, H, rope]; cache [num_blocks, block_size, row_width] (one layer);
    block_table int [B, max_blocks] page ids in logical order; context_lens int [B] -> o_lat [B, H, r] fp32.
    """
    layout = LatentCacheLayout(kv_lora_rank, rope_dim, fmt)
    check_decode_args(q_lat, q_rope, cache, block_table, context_lens, scale, layout, block_size)
    if q_lat.shape[0] == 0:
        return torch.zeros(q_lat.shape, dtype=torch.float32, device=q_lat.device)
    n_pages = -(-int(context_lens.max()) // block_size)
    pos = torch.arange(n_pages * block_size, device=cache.device)  # [S]
    valid = pos[None, :] < context_lens[:, None]  # [B, S]
    pages = block_table[:, :n_pages].long().repeat_interleave(block_size, dim=1)  # [B, S]
    rows = cache[torch.where(valid, pages, 0), pos % block_size]  # [B, S, row_width]
    latent, k_rope = unpack_tokens(layout, rows)  # [B, S, r], [B, S, rope]
    latent = latent.masked_fill(~valid[..., None], 0.0)  # slots past the end may hold anything
    k_rope = k_rope.masked_fill(~valid[..., None], 0.0)
    scores = torch.einsum("bhr,bsr->bhs", q_lat.float(), latent)
    scores = scores + torch.einsum("bhe,bse->bhs", q_rope.float(), k_rope)
    scores = (scores * scale).masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bsr->bhr", scores.softmax(dim=-1), latent)


def paged_mla_decode_triton(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
    rope_dim: int,
    fmt: str = "bf16",
    block_size: int = 64,
) -> torch.Tensor:
    """`paged_mla_decode_ref` semantics in a Triton kernel that dequantizes FP8 pages as it reads them."""
    layout = LatentCacheLayout(kv_lora_rank, rope_dim, fmt)
    check_decode_args(q_lat, q_rope, cache, block_table, context_lens, scale, layout, block_size)
    from engram_kernels.mla_decode.decode_kernel import launch_paged_mla_decode

    return launch_paged_mla_decode(q_lat, q_rope, cache, block_table, context_lens, float(scale), layout, block_size)


paged_mla_decode = dispatched(paged_mla_decode_ref, paged_mla_decode_triton)
