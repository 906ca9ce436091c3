"""Triton kernel for the lightning indexer's decode scores; the definition is `indexer.indexer_scores_ref`.

One program handles one sequence and BLOCK_T of its entries: it loads the sequence's index queries
[hI, dI] and head weights [hI] once, the entries' keys [BLOCK_T, dI] (rows at or past visible_count are
masked, never read), forms the dots [BLOCK_T, hI] in fp32 (`ieee`), and reduces relu(dots) * weights
over the heads. Arguments are validated by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _indexer_scores_kernel(
    q_ptr, weights_ptr, keys_ptr, count_ptr, out_ptr,
    T, scale,
    HI: tl.constexpr, DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_DI: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    h = tl.arange(0, BLOCK_HI)
    i = tl.arange(0, BLOCK_DI)
    h_ok = h < HI
    i_ok = i < DI
    visible = t < tl.load(count_ptr + b)  # visible_count <= T, so this also bounds t
    q = tl.load(q_ptr + (b * HI + h)[:, None] * DI + i[None, :], mask=h_ok[:, None] & i_ok[None, :], other=0.0)
    w = tl.load(weights_ptr + b * HI + h, mask=h_ok, other=0.0)  # [BLOCK_HI] fp32
    keys = tl.load(
        keys_ptr + (b * T + t)[:, None] * DI + i[None, :], mask=visible[:, None] & i_ok[None, :], other=0.0
    )
    dots = tl.dot(keys.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")  # [BLOCK_T, BLOCK_HI]
    scores = tl.sum(tl.maximum(dots, 0.0) * w[None, :], axis=1) * scale  # [BLOCK_T]
    scores = tl.where(visible, scores, float("-inf"))
    tl.store(out_ptr + b * T + t, scores, mask=t < T)


def launch_indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, visible_count: torch.Tensor, scale: float
) -> torch.Tensor:
    """Run the kernel on validated arguments. -> scores [B, T] fp32"""
    batch, heads, dim = q.shape
    total = keys.shape[1]
    out = torch.empty(batch, total, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    # The CPU interpreter pays per op, so it takes all entries at once; a GPU keeps the keys tile small.
    block_t = 32 if q.is_cuda else max(16, min(256, triton.next_power_of_2(total)))
    grid = (batch, triton.cdiv(total, block_t))
    _indexer_scores_kernel[grid](
        q.contiguous(), weights.contiguous(), keys.contiguous(), visible_count.contiguous(), out,
        total, scale,
        HI=heads, DI=dim, BLOCK_HI=max(16, triton.next_power_of_2(heads)),
        BLOCK_DI=max(16, triton.next_power_of_2(dim)), BLOCK_T=block_t,
        num_warps=4,
    )
    return out
