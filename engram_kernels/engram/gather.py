"""Engram table row gather with dequantization: hash ids -> table rows as floats.

A table is [R, D] rows. FP8 tables hold float8_e4m3fn values with one float8_e8m0fnu scale per
32 values ([R, D // 32]); a row value is e4m3 * scale. bf16/fp16/fp32 tables carry no scales.
This module only reads tables; building, quantizing and storing them is `model_worker.engram_tables`.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.quant.fp8_format import one_byte_float_to_float32

SCALE_BLOCK = 32  # values per e8m0 scale
PLAIN_TABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gather_args(
    table: torch.Tensor, scales: torch.Tensor | None, ids: torch.Tensor, out_dtype: torch.dtype
) -> None:
    """Validate gather arguments, including that every id is a row of `table`."""
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table: expected a [R, D] tensor, got {getattr(table, 'shape', type(table))}")
    if table.dtype == torch.float8_e4m3fn:
        rows, dim = table.shape
        if dim % SCALE_BLOCK:
            raise ValueError(f"table: fp8 row width must be a multiple of {SCALE_BLOCK}, got {dim}")
        if scales is None:
            raise ValueError("scales: required for a float8_e4m3fn table")
        if scales.dtype != torch.float8_e8m0fnu:
            raise TypeError(f"scales: expected float8_e8m0fnu, got {scales.dtype}")
        if tuple(scales.shape) != (rows, dim // SCALE_BLOCK):
            want = (rows, dim // SCALE_BLOCK)
            raise ValueError(f"scales: expected shape {want}, got {tuple(scales.shape)}")
        if scales.device != table.device:
            raise ValueError(f"scales: on {scales.device}, table on {table.device}")
    elif table.dtype in PLAIN_TABLE_DTYPES:
        if scales is not None:
            raise ValueError(f"scales: must be None for a {table.dtype} table")
    else:
        raise TypeError(f"table: expected float8_e4m3fn, bfloat16, float16 or float32, got {table.dtype}")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids: expected an int64 (or int32) tensor, got {getattr(ids, 'dtype', type(ids))}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {OUT_DTYPES}, got {out_dtype}")
    if ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))  # one host sync per call
        if low < 0 or high >= table.shape[0]:
            raise ValueError(f"ids: values must lie in [0, {table.shape[0]}), got min {low} max {high}")


def engram_gather_ref(
    table: torch.Tensor,
    scales: torch.Tensor | None,
    ids: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows table[ids], dequantized, torch reference.  ids [...] -> [..., D]"""
    check_gather_args(table, scales, ids, out_dtype)
    ids = ids.to(table.device)
    if scales is None:
        return table[ids].to(out_dtype)  # [..., D]
    rows = one_byte_float_to_float32(table[ids])  # [..., D]
    per_block = one_byte_float_to_float32(scales[ids])  # [..., D / 32]
    return (rows.unflatten(-1, (-1, SCALE_BLOCK)) * per_block[..., None]).flatten(-2).to(out_dtype)


def engram_gather_triton(
    table: torch.Tensor,
    scales: torch.Tensor | None,
    ids: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows table[ids], dequantized, Triton kernel; same contract as `engram_gather_ref`."""
    check_gather_args(table, scales, ids, out_dtype)
    if ids.device != table.device:
        raise ValueError(f"ids: on {ids.device}, table on {table.device}")
    from engram_kernels.engram.gather_kernel import launch_engram_gather

    return launch_engram_gather(table, scales, ids, out_dtype)


engram_gather = dispatched(engram_gather_ref, engram_gather_triton)
