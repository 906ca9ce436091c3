"""Triton kernel for `engram_kernels.mhc.post` (imported only when the kernel runs).

Grid (tokens, D blocks); each program loads the [N_PAD, BLOCK_D] tile of input streams once and
forms all n output streams as comb^T @ x via a [N_PAD(j), N_PAD(k), BLOCK_D] broadcast.
Argument checking lives in `engram_kernels.mhc.post`; this module only launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 512


@triton.jit
def _mhc_post_kernel(
    f_ptr,  # [T, D] sublayer output
    x_ptr,  # [T, N, D] residual streams
    post_ptr,  # [T, N] fp32
    comb_ptr,  # [T, N, N] fp32
    y_ptr,  # [T, N, D] out, x.dtype
    D,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    i = tl.arange(0, N_PAD)  # j for inputs, k for outputs
    i_ok = i < N
    d_ok = d < D
    tile_mask = i_ok[:, None] & d_ok[None, :]  # [N_PAD, BD]
    tile = t * N * D + i[:, None] * D + d[None, :]
    x = tl.load(x_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)  # [N_PAD(j), BD]
    f = tl.load(f_ptr + t * D + d, mask=d_ok, other=0.0).to(tl.float32)  # [BD]
    comb = tl.load(
        comb_ptr + t * N * N + i[:, None] * N + i[None, :], mask=i_ok[:, None] & i_ok[None, :], other=0.0
    )  # [N_PAD(j), N_PAD(k)]
    post = tl.load(post_ptr + t * N + i, mask=i_ok, other=0.0)  # [N_PAD(k)]
    mixed = tl.sum(comb[:, :, None] * x[:, None, :], axis=0)  # [N_PAD(k), BD]
    y = post[:, None] * f[None, :] + mixed
    tl.store(y_ptr + tile, y.to(y_ptr.dtype.element_ty), mask=tile_mask)


def launch_mhc_post(
    f_out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """f_out [..., D], x [..., n, D], post [..., n], comb [..., n, n] -> y [..., n, D] in x.dtype."""
    n, dim = x.shape[-2:]
    xs = x.reshape(-1, n, dim).contiguous()  # [T, n, D]
    y = torch.empty_like(xs)
    if y.numel() > 0:
        block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
        grid = (xs.shape[0], triton.cdiv(dim, block_d))
        _mhc_post_kernel[grid](
            f_out.reshape(-1, dim).contiguous(), xs,
            post.reshape(-1, n).contiguous(), comb.reshape(-1, n, n).contiguous(), y,
            dim, N=n, N_PAD=triton.next_power_of_2(n), BLOCK_D=block_d,
        )  # fmt: skip
    return y.view(x.shape)
