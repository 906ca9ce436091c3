"""CSA lightning-indexer decode scores and top-k: torch reference, Triton entry point and dispatcher.

One query token per sequence scores that sequence's compressed entries through their index keys
(spec §5.4), in fp32:

    score[b, t] = scale * sum_h weights[b, h] * relu(q[b, h] . keys[b, t])   for t <  visible_count[b]
    score[b, t] = -inf                                                        for t >= visible_count[b]

`weights` already hold the hI^-0.5 factor and `scale` is dI^-0.5. Key rows at or past visible_count[b]
are never read, so they may hold anything. `indexer_topk` selects with torch.topk on these scores (ties
are broken by torch.topk's implementation-defined order) and marks unused slots -1. Building q, weights
and keys (projections, RoPE, the compressor's pooling) is the model layer's job.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.v4_decode.checks import (
    check_device,
    check_float32,
    check_float_dims,
    check_index,
    check_ranges,
    check_scale,
    check_shape,
)


def check_indexer_args(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible_count: torch.Tensor, scale: float
) -> None:
    """Validate shapes, dtypes and devices, and that 0 <= visible_count[b] <= T."""
    check_float_dims(q, "q", 3, "[B, hI, dI]")
    batch, heads, dim = q.shape
    check_float32(weights, "weights")
    check_shape(weights, "weights", (batch, heads), "[B, hI]")
    check_float_dims(keys, "keys", 3, "[B, T, dI]")
    check_shape(keys, "keys", (batch, keys.shape[1], dim), "[B, T, dI]")
    check_index(visible_count, "visible_count")
    check_shape(visible_count, "visible_count", (batch,), "[B]")
    check_scale(scale)
    check_device(q=q, weights=weights, keys=keys, visible_count=visible_count)
    check_ranges((visible_count, "visible_count", 0, keys.shape[1]))


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def indexer_scores_ref(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible_count: torch.Tensor, scale: float
) -> torch.Tensor:
    """Indexer scores, torch reference, fp32.

    q [B, hI, dI]; weights [B, hI] fp32; keys [B, T, dI]; visible_count int [B] -> scores [B, T] fp32.
    """
    check_indexer_args(q, weights, keys, visible_count, scale)
    dots = torch.einsum("bhi,bti->bth", q.float(), keys.float())  # [B, T, hI]
    scores = torch.einsum("bth,bh->bt", dots.relu(), weights) * scale  # [B, T]
    visible = torch.arange(keys.shape[1], device=keys.device)[None, :] < visible_count[:, None]  # [B, T]
    return scores.masked_fill(~visible, float("-inf"))


def indexer_scores_triton(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible_count: torch.Tensor, scale: float
) -> torch.Tensor:
    """`indexer_scores_ref` semantics in a Triton kernel (one program per sequence and block of entries)."""
    check_indexer_args(q, weights, keys, visible_count, scale)
    from engram_kernels.v4_decode.indexer_kernel import launch_indexer_scores

    return launch_indexer_scores(q, weights, keys, visible_count, float(scale))


indexer_scores = dispatched(indexer_scores_ref, indexer_scores_triton)


def select_topk(scores: torch.Tensor, visible_count: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries per row by torch.topk. scores [B, T] fp32 (-inf where invisible);
    visible_count int [B] -> int64 [B, k], best first; a slot is -1 where fewer than k entries are visible."""
    _check_k(k)
    batch, total = scores.shape
    _, picked = scores.topk(min(k, total), dim=-1)  # [B, min(k, T)], sorted, invisible entries last
    picked = picked.masked_fill(picked >= visible_count[:, None], -1)
    if picked.shape[1] < k:
        picked = torch.cat((picked, picked.new_full((batch, k - picked.shape[1]), -1)), dim=1)
    return picked


def indexer_topk_ref(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible_count: torch.Tensor, k: int, scale: float
) -> torch.Tensor:
    """`select_topk` of `indexer_scores_ref`: -> int64 [B, k] entry indices, -1 in unused slots."""
    _check_k(k)
    return select_topk(indexer_scores_ref(q, weights, keys, visible_count, scale), visible_count, k)


def indexer_topk_triton(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible_count: torch.Tensor, k: int, scale: float
) -> torch.Tensor:
    """`select_topk` of `indexer_scores_triton`: -> int64 [B, k] entry indices, -1 in unused slots."""
    _check_k(k)
    return select_topk(indexer_scores_triton(q, weights, keys, visible_count, scale), visible_count, k)


indexer_topk = dispatched(indexer_topk_ref, indexer_topk_triton)
