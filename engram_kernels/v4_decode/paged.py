"""V4 sparse decode attention read straight from MODEL1 FP8 pages: torch reference, Triton entry point and
dispatcher.

The math is `attention.sparse_decode_attention_ref`'s (valid sliding keys plus selected compressed
entries, one per-head sink whose probability is dropped, key = value, fp32 inside, output in q.dtype);
only where the keys come from differs. Every key is a token of a shared pool of MODEL1 pages
(`mla_decode.model1_layout`: per page, block_size tokens of nope e4m3 + rope bf16 bytes, then their e8m0
tile scales), found through two per-row page lists:

    sliding row j < window_count[b]   page window_pages[b, (window_first[b] + j) // block_size],
                                      slot (window_first[b] + j) % block_size
    entry e = entry_index[b, k] >= 0  page entry_pages[b, e // block_size], slot e % block_size

so a sliding window that wraps past the end of a page continues at the start of the next listed page.
Page-list slots that no valid row or selected entry lands in are never read (they may hold -1 or any
id), and neither are the pool's other tokens: their bytes may be anything, NaN codes included.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.mla_decode.model1_layout import Model1CacheLayout, dequantize_tokens, page_views
from engram_kernels.v4_decode.attention import sparse_decode_attention_ref
from engram_kernels.v4_decode.checks import (
    check_device,
    check_float32,
    check_float_dims,
    check_index,
    check_scale,
    check_shape,
)


def _check_pool(pool: torch.Tensor, layout: Model1CacheLayout) -> None:
    if not isinstance(layout, Model1CacheLayout):
        raise TypeError(f"layout must be a Model1CacheLayout, got {type(layout).__name__}")
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"pool must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dtype != torch.uint8:
        raise TypeError(f"pool must be uint8, got {pool.dtype}")
    if pool.dim() != 2 or pool.shape[1] != layout.page_bytes:
        raise ValueError(f"pool must have shape [num_pages, page_bytes] = [num_pages, {layout.page_bytes}], "
                         f"got {tuple(pool.shape)}")
    if pool.shape[0] and pool.stride(1) != 1:
        raise ValueError("pool must be contiguous within each page (pool.stride(1) == 1)")


def _check_index_dims(x: torch.Tensor, name: str, batch: int, spec: str, dims: int) -> None:
    check_index(x, name)
    if x.dim() != dims or x.shape[0] != batch:
        raise ValueError(f"{name} must have shape {spec} with B = {batch}, got {tuple(x.shape)}")


def _check_values(pool: torch.Tensor, window_pages: torch.Tensor, window_first: torch.Tensor,
                  window_count: torch.Tensor, entry_pages: torch.Tensor, entry_index: torch.Tensor,
                  block_size: int) -> None:
    """Ranges of the window positions and entry indices, and the page ids they use. One host sync."""
    num_pages = pool.shape[0]
    window_rows = window_pages.shape[1] * block_size
    entry_rows = entry_pages.shape[1] * block_size
    first, count = window_first.long(), window_count.long()
    end = first + count  # [B]: one past the row's last window position
    starts = torch.arange(window_pages.shape[1], device=pool.device) * block_size  # [Pw]
    used_window = (starts[None, :] < end[:, None]) & (count > 0)[:, None]  # [B, Pw]
    bad_window = used_window & ((window_pages < 0) | (window_pages >= num_pages))
    selected = entry_index >= 0  # [B, K]
    if entry_pages.shape[1] and entry_index.shape[1]:
        slot = entry_index.long().clamp(0, entry_rows - 1) // block_size  # clamped: ranges are checked below
        picked = entry_pages.gather(1, slot)  # [B, K]
        bad_entry = selected & ((picked < 0) | (picked >= num_pages))
    else:
        bad_entry = selected  # nothing to point into: any selection is out of range (and reported as such)
    stats = [first.min(), first.max(), count.min(), end.max()]
    if entry_index.numel():
        stats += [entry_index.min().long(), entry_index.max().long()]
    stats += [bad_window.any().long(), bad_entry.any().long()]
    values = torch.stack(stats).tolist()
    first_lo, first_hi, count_lo, end_hi = values[:4]
    if first_lo < 0 or first_hi > block_size - 1:
        raise ValueError(f"window_first values must lie in [0, {block_size - 1}] (block_size - 1), "
                         f"got min {first_lo} max {first_hi}")
    if count_lo < 0:
        raise ValueError(f"window_count values must be >= 0, got min {count_lo}")
    if end_hi > window_rows:
        raise ValueError(f"window_first + window_count must be <= {window_rows} (Pw * block_size), got {end_hi}")
    if entry_index.numel():
        index_lo, index_hi = values[4:6]
        if index_lo < -1 or index_hi > entry_rows - 1:
            raise ValueError(f"entry_index values must lie in [-1, {entry_rows - 1}] (Pe * block_size - 1), "
                             f"got min {index_lo} max {index_hi}")
    if values[-2]:
        raise ValueError(f"window_pages: page ids holding valid window rows must lie in [0, {num_pages})")
    if values[-1]:
        raise ValueError(f"entry_pages: page ids holding selected entries must lie in [0, {num_pages})")


def check_paged_attention_args(q: torch.Tensor, pool: torch.Tensor, window_pages: torch.Tensor,
        window_first: torch.Tensor, window_count: torch.Tensor, entry_pages: torch.Tensor,
        entry_index: torch.Tensor, sinks: torch.Tensor, scale: float, layout: Model1CacheLayout) -> None:
    """Validate types, shapes, dtypes and devices; that 0 <= window_first < block_size, window_count >= 0,
    window_first + window_count <= Pw * block_size and -1 <= entry_index < Pe * block_size; and that every
    page id a valid window row or a selected entry lives in lies in [0, num_pages)."""
    _check_pool(pool, layout)
    check_float_dims(q, "q", 3, "[B, H, D]")
    batch, heads, _ = q.shape
    check_shape(q, "q", (batch, heads, layout.head_dim), "[B, H, D = nope_dim + rope_dim]")
    _check_index_dims(window_pages, "window_pages", batch, "[B, Pw]", 2)
    check_index(window_first, "window_first")
    check_shape(window_first, "window_first", (batch,), "[B]")
    check_index(window_count, "window_count")
    check_shape(window_count, "window_count", (batch,), "[B]")
    _check_index_dims(entry_pages, "entry_pages", batch, "[B, Pe]", 2)
    _check_index_dims(entry_index, "entry_index", batch, "[B, K]", 2)
    check_float32(sinks, "sinks")
    check_shape(sinks, "sinks", (heads,), "[H]")
    check_scale(scale)
    check_device(q=q, pool=pool, window_pages=window_pages, window_first=window_first, window_count=window_count,
                 entry_pages=entry_pages, entry_index=entry_index, sinks=sinks)
    if batch:
        _check_values(pool, window_pages, window_first, window_count, entry_pages, entry_index, layout.block_size)


def _gather_tokens(pool: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor,
                   layout: Model1CacheLayout) -> torch.Tensor:
    """Dequantize the tokens (pages[i], slots[i]) where valid, zeros elsewhere: [B, N] each -> [B, N, D] fp32.
    Only the valid tokens' bytes are read."""
    data, scale_slots = page_views(pool, layout)  # [P, bs, token_data_bytes], [P, bs, 8]
    pages, slots = pages[valid].long(), slots[valid].long()
    out = torch.zeros(*valid.shape, layout.head_dim, dtype=torch.float32, device=pool.device)
    out[valid] = dequantize_tokens(data[pages, slots], scale_slots[pages, slots], layout)
    return out


def gather_paged_rows(pool: torch.Tensor, window_pages: torch.Tensor, window_first: torch.Tensor,
        window_count: torch.Tensor, entry_pages: torch.Tensor, entry_index: torch.Tensor,
        layout: Model1CacheLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantize what a batch attends to from validated arguments: (sliding fp32 [B, W, D] with W =
    max(window_count), row j of sequence b its window row j, zeros past window_count[b]; entries fp32
    [B, K, D], slot k the entry entry_index[b, k] selects, zeros in unused slots; entry slots int64
    [B, K]: k where slot k is used, else -1), the arguments `sparse_decode_attention_ref` takes."""
    batch, block_size = window_pages.shape[0], layout.block_size
    width = int(window_count.max()) if batch else 0
    rows = torch.arange(width, device=pool.device)  # [W]
    in_window = rows[None, :] < window_count[:, None]  # [B, W]
    pos = window_first.long()[:, None] + rows[None, :]  # [B, W], positions in the row's page list
    page_slot = (pos // block_size).clamp(max=max(window_pages.shape[1] - 1, 0))
    pages = window_pages.gather(1, page_slot) if window_pages.shape[1] else page_slot
    sliding = _gather_tokens(pool, pages, pos % block_size, in_window, layout)

    used = entry_index >= 0  # [B, K]
    index = entry_index.long().clamp(min=0)
    page_slot = (index // block_size).clamp(max=max(entry_pages.shape[1] - 1, 0))
    pages = entry_pages.gather(1, page_slot) if entry_pages.shape[1] else page_slot
    entries = _gather_tokens(pool, pages, index % block_size, used, layout)
    slots = torch.arange(entry_index.shape[1], device=pool.device).expand_as(used)
    return sliding, entries, torch.where(used, slots, -1)


def sparse_decode_attention_paged_ref(q: torch.Tensor, pool: torch.Tensor, window_pages: torch.Tensor,
        window_first: torch.Tensor, window_count: torch.Tensor, entry_pages: torch.Tensor,
        entry_index: torch.Tensor, sinks: torch.Tensor, scale: float, layout: Model1CacheLayout) -> torch.Tensor:
    """Sparse decode attention over MODEL1 FP8 pages, torch reference: dequantize the rows each sequence
    reads (`gather_paged_rows`), then `sparse_decode_attention_ref`.

    q [B, H, D = nope_dim + rope_dim]; pool uint8 [num_pages, page_bytes]; window_pages int [B, Pw] (-1 pads);
    window_first int [B] in [0, block_size); window_count int [B]; entry_pages int [B, Pe] (-1 pads);
    entry_index int [B, K] (-1 = unused); sinks [H] fp32 -> out [B, H, D] in q.dtype.
    """
    check_paged_attention_args(q, pool, window_pages, window_first, window_count, entry_pages, entry_index, sinks,
                               scale, layout)
    sliding, entries, slots = gather_paged_rows(pool, window_pages, window_first, window_count, entry_pages,
                                                entry_index, layout)
    return sparse_decode_attention_ref(q, sliding, window_count, entries, slots, sinks, scale)


def sparse_decode_attention_paged_triton(q: torch.Tensor, pool: torch.Tensor, window_pages: torch.Tensor,
        window_first: torch.Tensor, window_count: torch.Tensor, entry_pages: torch.Tensor,
        entry_index: torch.Tensor, sinks: torch.Tensor, scale: float, layout: Model1CacheLayout) -> torch.Tensor:
    """`sparse_decode_attention_paged_ref` semantics in a Triton kernel that dequantizes the FP8 rows in
    registers as it walks them (online softmax, sink folded in first)."""
    check_paged_attention_args(q, pool, window_pages, window_first, window_count, entry_pages, entry_index, sinks,
                               scale, layout)
    from engram_kernels.v4_decode.paged_kernel import launch_sparse_decode_attention_paged

    return launch_sparse_decode_attention_paged(q, pool, window_pages, window_first, window_count, entry_pages,
                                                entry_index, sinks, float(scale), layout)


sparse_decode_attention_paged = dispatched(sparse_decode_attention_paged_ref, sparse_decode_attention_paged_triton)
