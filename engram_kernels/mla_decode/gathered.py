"""Paged MLA decode attention in batched torch ops, for hosts without the Triton kernel (CPU).

Same function as `decode.paged_mla_decode_ref`, organised for an engine step: the page walk (which
cache slot holds each context position of each sequence) depends only on the block tables, so
`DecodeGather.build` does it once per step and every layer reuses it. A layer then costs one gather of
its cache rows and two batched matrix products:

    rows   = cache[slots]                           [B, S, row_width]   (S = longest context)
    kv     = dequantize(rows) = [c | k_rope]        [B, S, r + rope] fp32
    scores = scale * [q_lat | q_rope] @ kv^T + bias [B, H, S]           (bias -inf past each context)
    o_lat  = softmax(scores) @ c                    [B, H, r]

Positions past a sequence's context read that sequence's first slot (real, finite data) and are
masked by the bias, so stale slots, whatever they hold, are never read. Arguments are not validated
here: the engine builds them; `paged_mla_decode` validates for other callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram_kernels.mla_decode.layout import LatentCacheLayout, unpack_tokens


@dataclass(frozen=True)
class DecodeGather:
    """slots int64 [B, S]: flat cache slot of each position; bias fp32 [B, 1, S]: 0 inside, -inf past the end
    ([B, 1, 1] zeros when every context is S long, so nothing needs masking)."""

    slots: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def build(cls, block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int, max_len: int,
              min_len: int | None = None) -> DecodeGather:
        """block_table int [B, max_blocks]; context_lens int [B] (each >= 1); max_len = max(context_lens);
        min_len = min(context_lens) if the caller knows it (equal lengths skip the masking)."""
        pos = torch.arange(max_len, device=block_table.device)  # [S]
        slots = block_table.long()[:, pos // block_size].mul_(block_size).add_(pos % block_size)  # [B, S]
        if min_len == max_len:
            return cls(slots, torch.zeros(slots.shape[0], 1, 1, device=pos.device))
        inside = pos[None, :] < context_lens[:, None].long()  # [B, S]
        slots = torch.where(inside, slots, slots[:, :1])
        bias = torch.zeros(inside.shape, dtype=torch.float32, device=pos.device).masked_fill_(~inside, float("-inf"))
        return cls(slots, bias[:, None, :])


def paged_mla_decode_gathered(q_lat: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                              gather: DecodeGather, scale: float, layout: LatentCacheLayout) -> torch.Tensor:
    """q_lat [B, H, r]; q_rope [B, H, rope]; cache [num_blocks, block_size, row_width] (one layer)
    -> o_lat [B, H, r] fp32."""
    rows = cache.view(-1, cache.shape[-1])[gather.slots]  # [B, S, row_width]
    if layout.is_plain:
        kv = rows.float()  # a bf16 / fp32 row is [c | k_rope]
    else:
        kv = torch.cat(unpack_tokens(layout, rows), dim=-1)
    q = torch.cat((q_lat, q_rope), dim=-1)  # [B, H, r + rope]
    q = q if q.dtype == torch.float32 else q.float()
    scores = torch.baddbmm(gather.bias, q, kv.transpose(1, 2), alpha=scale)  # [B, H, S]
    return torch.bmm(scores.softmax(dim=-1), kv[..., : layout.kv_lora_rank])
