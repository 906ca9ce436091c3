"""The operand contract of the block-scaled FP8 GEMM, checked once for the reference and the kernel.

Activations a_q e4m3 [M, K] carry one fp32 scale per token per 128 channels, a_scale [M, ceil(K/128)];
weights w_q e4m3 [N, K] carry one fp32 scale per 128 x 128 tile, w_scale [ceil(N/128), ceil(K/128)].
Nothing here computes; the math is in `fp8_gemm`.
"""

from __future__ import annotations

import torch

from engram_kernels.quant.fp8_format import check_fp8, check_out_dtype, check_scale, num_blocks

SCALE_BLOCK = 128
"""Channels per activation scale and rows/columns per weight tile."""


def check_fp8_gemm_operands(
    a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> None:
    """Raise TypeError/ValueError naming the argument unless the operands fit the contract above."""
    check_fp8(a_q, "a_q", dim=2)
    check_fp8(w_q, "w_q", dim=2)
    (m, k), (n, k_w) = a_q.shape, w_q.shape
    if k != k_w:
        raise ValueError(f"w_q must have K={k} columns like a_q, got shape {tuple(w_q.shape)}")
    check_scale(a_scale, "a_scale", (m, num_blocks(k, SCALE_BLOCK)))
    check_scale(w_scale, "w_scale", (num_blocks(n, SCALE_BLOCK), num_blocks(k, SCALE_BLOCK)))
    check_out_dtype(out_dtype, "out_dtype")
    devices = {t.device for t in (a_q, a_scale, w_q, w_scale)}
    if len(devices) > 1:
        names = sorted(map(str, devices))
        raise ValueError(f"a_q, a_scale, w_q and w_scale must be on one device, got {names}")
