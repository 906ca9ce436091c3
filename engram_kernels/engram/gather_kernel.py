"""Triton kernel for the Engram row gather; the definition is `engram_kernels.engram.gather.engram_gather_ref`.

One program copies a [BLOCK_N, BLOCK_D] tile: BLOCK_N looked-up rows, BLOCK_D columns, applying
the e8m0 scale of each 32-value block for FP8 tables. Arguments are validated by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_kernels.engram.gather import SCALE_BLOCK


@triton.jit
def _e8m0_to_fp32(e):
    """e8m0 byte (as int32) -> 2 ** (e - 127); 0 -> 2 ** -127 (subnormal), 255 -> NaN."""
    bits = tl.where(e == 0, 0x00400000, e << 23)
    scale = bits.to(tl.float32, bitcast=True)
    return tl.where(e == 255, float("nan"), scale)


@triton.jit
def _engram_gather_kernel(
    table_ptr, scales_ptr, ids_ptr, out_ptr,
    n_ids, D, stride_tr, stride_td, stride_sr, stride_sd,
    HAS_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    tile_ok = (n < n_ids)[:, None] & (d < D)[None, :]
    row = tl.load(ids_ptr + n, mask=n < n_ids, other=0).to(tl.int64)  # [BLOCK_N]
    values = tl.load(table_ptr + row[:, None] * stride_tr + d[None, :] * stride_td, mask=tile_ok)
    values = values.to(tl.float32)
    if HAS_SCALES:
        block = d // SCALE_BLOCK
        scale_ptrs = scales_ptr + row[:, None] * stride_sr + block[None, :] * stride_sd
        e = tl.load(scale_ptrs, mask=tile_ok, other=127)
        values = values * _e8m0_to_fp32(e.to(tl.int32))
    tl.store(out_ptr + n[:, None] * D + d[None, :], values.to(out_ptr.dtype.element_ty), mask=tile_ok)


def launch_engram_gather(
    table: torch.Tensor, scales: torch.Tensor | None, ids: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Run the kernel on validated arguments.  ids [...] -> [..., D] out_dtype"""
    dim = table.shape[1]
    flat_ids = ids.reshape(-1).contiguous()  # [N]
    out = torch.empty(flat_ids.numel(), dim, dtype=out_dtype, device=table.device)
    if out.numel() == 0:
        return out.view(*ids.shape, dim)
    scale_bytes = table if scales is None else scales.view(torch.uint8)  # Triton has no e8m0 dtype
    block_d = min(256, triton.next_power_of_2(dim))
    block_n = max(1, min(16, 4096 // block_d, triton.next_power_of_2(flat_ids.numel())))
    grid = (triton.cdiv(flat_ids.numel(), block_n), triton.cdiv(dim, block_d))
    _engram_gather_kernel[grid](
        table, scale_bytes, flat_ids, out,
        flat_ids.numel(), dim, table.stride(0), table.stride(1), scale_bytes.stride(0), scale_bytes.stride(1),
        HAS_SCALES=scales is not None, SCALE_BLOCK=SCALE_BLOCK, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out.view(*ids.shape, dim)
