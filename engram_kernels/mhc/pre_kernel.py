"""Triton kernel for `engram_kernels.mhc.pre` (imported only when the kernel runs).

Grid (tokens, D blocks); each program loads the [N_PAD, BLOCK_D] tile of all streams once.
Argument checking lives in `engram_kernels.mhc.pre`; this module only launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_D = 1024


@triton.jit
def _mhc_pre_kernel(
    x_ptr,  # [T, N, D]
    pre_ptr,  # [T, N] fp32
    out_ptr,  # [T, D] out, x.dtype
    D,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    i = tl.arange(0, N_PAD)
    i_ok = i < N
    d_ok = d < D
    x = tl.load(
        x_ptr + t * N * D + i[:, None] * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0
    ).to(tl.float32)  # [N_PAD, BD]
    w = tl.load(pre_ptr + t * N + i, mask=i_ok, other=0.0)  # [N_PAD]
    out = tl.sum(w[:, None] * x, axis=0)  # [BD]
    tl.store(out_ptr + t * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def launch_mhc_pre(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """x [..., n, D], pre [..., n] -> [..., D] in x.dtype."""
    n, dim = x.shape[-2:]
    xs = x.reshape(-1, n, dim).contiguous()  # [T, n, D]
    ws = pre.reshape(-1, n).contiguous()  # [T, n]
    out = torch.empty(xs.shape[0], dim, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
        grid = (xs.shape[0], triton.cdiv(dim, block_d))
        _mhc_pre_kernel[grid](xs, ws, out, dim, N=n, N_PAD=triton.next_power_of_2(n), BLOCK_D=block_d)
    return out.view(*x.shape[:-2], dim)
