"""Triton kernel for `engram_kernels.mhc.split` (imported only when the kernel runs).

One program handles BLOCK_T tokens; the n x n comb matrices are held as a [BLOCK_T, N_PAD, N_PAD]
tile (N_PAD = next power of two >= n, padding masked to zero) through softmax and Sinkhorn.
Argument checking lives in `engram_kernels.mhc.split`; this module only launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 64


@triton.jit
def _mhc_split_kernel(
    mixes_ptr,  # [T, (2+N)*N] fp32
    scale_ptr,  # [3] fp32
    base_ptr,  # [(2+N)*N] fp32
    pre_ptr,  # [T, N] fp32 out
    post_ptr,  # [T, N] fp32 out
    comb_ptr,  # [T, N, N] fp32 out
    num_tokens,
    sinkhorn_iters,
    eps,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    width: tl.constexpr = (2 + N) * N
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    i = tl.arange(0, N_PAD)  # stream index; j (rows) and k (cols) of comb reuse it
    t_ok = t < num_tokens
    i_ok = i < N
    row = mixes_ptr + t[:, None] * width  # [BT, 1]
    vec_mask = t_ok[:, None] & i_ok[None, :]  # [BT, N_PAD]

    scale_pre = tl.load(scale_ptr)
    scale_post = tl.load(scale_ptr + 1)
    scale_comb = tl.load(scale_ptr + 2)

    pre_logit = tl.load(row + i[None, :], mask=vec_mask, other=0.0)
    pre_logit = pre_logit * scale_pre + tl.load(base_ptr + i, mask=i_ok, other=0.0)[None, :]
    pre = tl.sigmoid(pre_logit) + eps  # [BT, N_PAD]
    post_logit = tl.load(row + N + i[None, :], mask=vec_mask, other=0.0)
    post_logit = post_logit * scale_post + tl.load(base_ptr + N + i, mask=i_ok, other=0.0)[None, :]
    post = 2.0 * tl.sigmoid(post_logit)  # [BT, N_PAD]
    out_vec = t[:, None] * N + i[None, :]
    tl.store(pre_ptr + out_vec, pre, mask=vec_mask)
    tl.store(post_ptr + out_vec, post, mask=vec_mask)

    jk = i[:, None] * N + i[None, :]  # [N_PAD, N_PAD] offset of comb[j, k]
    jk_ok = i_ok[:, None] & i_ok[None, :]
    mat_mask = t_ok[:, None, None] & jk_ok[None, :, :]  # [BT, N_PAD, N_PAD]
    logit = tl.load(row[:, :, None] + 2 * N + jk[None, :, :], mask=mat_mask, other=0.0)
    logit = logit * scale_comb + tl.load(base_ptr + 2 * N + jk, mask=jk_ok, other=0.0)[None, :, :]
    # Padded columns must not take part in the row softmax; padded rows stay finite and are zeroed.
    logit = tl.where(i_ok[None, None, :], logit, float("-inf"))
    prob = tl.exp(logit - tl.max(logit, axis=2)[:, :, None])
    comb = prob / tl.sum(prob, axis=2)[:, :, None] + eps
    comb = tl.where(jk_ok[None, :, :], comb, 0.0)
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)  # columns
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + eps)  # rows
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + eps)  # columns
    tl.store(comb_ptr + t[:, None, None] * (N * N) + jk[None, :, :], comb, mask=mat_mask)


def launch_mhc_split(
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_mult: int,
    sinkhorn_iters: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [..., (2+n)*n] -> pre [..., n], post [..., n], comb [..., n, n] (all fp32)."""
    n = hc_mult
    lead = mixes.shape[:-1]
    flat = mixes.reshape(-1, mixes.shape[-1]).contiguous()  # [T, (2+n)*n]
    num_tokens = flat.shape[0]
    pre = torch.empty(num_tokens, n, dtype=torch.float32, device=mixes.device)
    post = torch.empty_like(pre)
    comb = torch.empty(num_tokens, n, n, dtype=torch.float32, device=mixes.device)
    if num_tokens > 0:
        grid = (triton.cdiv(num_tokens, BLOCK_T),)
        _mhc_split_kernel[grid](
            flat, scale.contiguous(), base.contiguous(), pre, post, comb,
            num_tokens, sinkhorn_iters, eps,
            N=n, N_PAD=triton.next_power_of_2(n), BLOCK_T=BLOCK_T,
        )  # fmt: skip
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)
