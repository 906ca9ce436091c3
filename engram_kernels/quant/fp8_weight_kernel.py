"""Triton kernel that dequantizes a DeepSeek FP8 weight (block x block tiles, one fp32 scale each).

Same contract as `dequantize_fp8_weight_ref` in `fp8_weight` (the definition): one program per
tile, w[tile] = w_q[tile] * scale_inv[tile]. It does not quantize (weights arrive quantized).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_kernels.quant.fp8_format import check_fp8_weight, check_out_dtype


@triton.jit
def _dequantize_fp8_weight_kernel(w_q_ptr, scale_inv_ptr, out_ptr, N, K, n_blocks_k, BLOCK: tl.constexpr):
    tile_n = tl.program_id(0)
    tile_k = tl.program_id(1)
    rows = tile_n * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    cols = tile_k * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]  # int64: N * K may pass 2**31
    w_q = tl.load(w_q_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK, BLOCK]
    scale_inv = tl.load(scale_inv_ptr + tile_n * n_blocks_k + tile_k)
    tl.store(out_ptr + offs, (w_q * scale_inv).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_fp8_weight_triton(
    w_q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triton `dequantize_fp8_weight_ref`: w_q [N, K] e4m3, scale_inv [ceil(N/b), ceil(K/b)] -> [N, K]."""
    check_fp8_weight(w_q, scale_inv, block)
    check_out_dtype(dtype)
    n, k = w_q.shape
    out = torch.empty((n, k), dtype=dtype, device=w_q.device)
    if out.numel() == 0:
        return out
    grid = tuple(scale_inv.shape)
    _dequantize_fp8_weight_kernel[grid](
        w_q.contiguous(), scale_inv.contiguous(), out, n, k, scale_inv.shape[1], BLOCK=block
    )
    return out
