"""Triton kernels for per-token FP8 block quantization and dequantization of activations.

Same contract as `quantize_fp8_block_ref` / `dequantize_fp8_block_ref` in `fp8_block` (the
definition): one program handles BLOCK_M rows by one block of the last dim. Leading dims are
flattened into rows. No dispatching and no 2-D weight tiles here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_kernels.quant.fp8_format import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    block_scale_shape,
    check_block,
    check_float,
    check_fp8_blocks,
    check_out_dtype,
    check_scale_fmt,
    num_blocks,
)

_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)


@triton.jit
def _quantize_fp8_block_kernel(
    x_ptr, q_ptr, scale_ptr, M, K, n_blocks, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, UE8M0: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]  # int64: M * K may pass 2**31
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK]
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_M]
    scale = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)
    if UE8M0:  # 2**ceil(log2(scale)) on the bits, as round_scale_up_pow2
        bits = scale.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
    q = tl.math.div_rn(x, scale[:, None])
    q = tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)
    tl.store(q_ptr + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + rows * n_blocks + kb, scale, mask=rows < M)


@triton.jit
def _dequantize_fp8_block_kernel(
    q_ptr, scale_ptr, out_ptr, M, K, n_blocks, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    kb = tl.program_id(1)
    cols = kb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]  # int64: M * K may pass 2**31
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK]
    scale = tl.load(scale_ptr + rows * n_blocks + kb, mask=rows < M, other=0.0)  # [BLOCK_M]
    x = q * scale[:, None]
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_per_program(m: int) -> int:
    return min(64, triton.next_power_of_2(max(m, 1)))


def quantize_fp8_block_triton(
    x: torch.Tensor, block: int = 128, scale_fmt: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quantize_fp8_block_ref`: x [..., K] -> (q e4m3 [..., K], scale fp32 [..., ceil(K/block)])."""
    check_float(x, "x")
    check_block(block)
    check_scale_fmt(scale_fmt)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m, nb = x2.shape[0], num_blocks(k, block)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(block_scale_shape(x.shape, block), dtype=torch.float32, device=x.device)
    if x2.numel() == 0:
        return q, scale
    block_m = _rows_per_program(m)
    grid = (triton.cdiv(m, block_m), nb)
    _quantize_fp8_block_kernel[grid](
        x2, q, scale, m, k, nb, BLOCK=block, BLOCK_M=block_m, UE8M0=scale_fmt == "ue8m0"
    )
    return q, scale


def dequantize_fp8_block_triton(
    q: torch.Tensor, scale: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Triton `dequantize_fp8_block_ref`: q [..., K] * scale [..., ceil(K/block)] -> [..., K] in `dtype`."""
    check_fp8_blocks(q, scale, block)
    check_out_dtype(dtype)
    k = q.shape[-1]
    q2 = q.reshape(-1, k).contiguous()  # [M, K]
    m, nb = q2.shape[0], num_blocks(k, block)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q2.numel() == 0:
        return out
    block_m = _rows_per_program(m)
    grid = (triton.cdiv(m, block_m), nb)
    _dequantize_fp8_block_kernel[grid](
        q2, scale.reshape(-1, nb).contiguous(), out, m, k, nb, BLOCK=block, BLOCK_M=block_m
    )
    return out
