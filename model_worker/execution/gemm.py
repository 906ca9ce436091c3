"""Float GEMMs of the model on this host: `linear(x, weight, bias)` is F.linear, run on CPU by whichever
kernel this host measured fastest for the shape and row count: our C panel kernel from a panel-packed fp32
weight (`execution.panel_packs`), our C decode kernel (`engram_kernels.cpu_decode`), oneDNN with a packed weight
(`execution.packed_gemm`) or torch's own, in the product form `execution.cpu_gemm` chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram_kernels.cpu_decode import decode_gemm, decode_gemm_available, panel_gemm
from model_worker.execution import panel_packs
from model_worker.execution.cpu_gemm import choice_wins, cpu_gemm_preferences, row_bucket, wide_product, wide_wins
from model_worker.execution.packed_gemm import packed, packed_linear, packed_linear_add

_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _one_half_precision_row_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1] and weight.dtype in _HALF_DTYPES and x.dtype == weight.dtype and not x.is_cuda


WIDE_PRODUCT_MAX_ROWS = 512  # beyond this (prefill) torch's default form is as fast


def _wide_product_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows of x if `linear` should run it as (W @ x^T)^T on this host (`execution.cpu_gemm`), else 0."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.is_cuda or weight.dim() != 2:
        return 0
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows < 2 or rows > WIDE_PRODUCT_MAX_ROWS:
        return 0
    prefs = cpu_gemm_preferences()
    input_major = weight.stride(0) == 1 and weight.shape[0] > 1
    least = prefs.wide_min_rows_input_major if input_major else prefs.wide_min_rows_output_major
    if least is None or rows < least:
        return 0
    if input_major and prefs.tune_input_major_wide and not wide_wins(x, weight, rows):
        return 0
    return rows


def _packed_weight_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """weight's oneDNN-packed copy if `linear` should run x through it here (`execution.packed_gemm`), else None:
    the weight is packed, x has its dtype, no gradient is wanted, and on this host the packed kernel won for
    this weight shape, dtype and row count (`execution.cpu_gemm`)."""
    packed_weight = packed(weight)
    if packed_weight is None or x.dtype != weight.dtype or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    prefs = cpu_gemm_preferences()
    if not prefs.pack_weights:
        return None
    if prefs.tune_packed:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        key = ("packed", *weight.shape, weight.dtype, row_bucket(max(rows, 1)))
        if not choice_wins(key, lambda: (lambda: unpacked_linear(x, weight, bias),
                                          lambda: packed_linear(x, packed_weight, bias))):
            return None
    return packed_weight


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_kernel_takes(x: torch.Tensor, rows: int, weight: torch.Tensor) -> bool:
    """Whether the C decode kernels (`engram_kernels.cpu_decode`) may run `rows` rows of x against weight
    ([out, in], or a stack [G, out, in]) here: CPU operands, both fp32 or both bf16, output-major weights
    (unit stride along in), no gradient wanted, 1 to `native_max_rows` rows (`execution.cpu_gemm`), and the
    kernels built here."""
    if x.dtype != weight.dtype or weight.dtype not in _NATIVE_DTYPES or weight.stride(-1) != 1:
        return False
    if not 0 < rows <= cpu_gemm_preferences().native_max_rows or x.is_cuda or weight.is_cuda:
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return False
    return decode_gemm_available()


def _native_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Rows of x if `linear` should run it through the C decode kernel, else 0: the kernel takes the operands
    (`native_kernel_takes`) and on this host it won for this weight shape, dtype and row count
    (`execution.cpu_gemm`). One fp32 row is not timed per shape: the host measurement enabled the kernel on
    exactly that, with weights read from memory as in decode, while `choice_wins` repeats the same operands,
    which then come from the caches and favour other kernels (in a throwaway A/B at batch 1, timing it per
    shape made decode slower)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if weight.dim() != 2 or not native_kernel_takes(x, rows, weight):
        return 0
    if cpu_gemm_preferences().tune_native and (rows > 1 or weight.dtype != torch.float32):
        key = ("native", *weight.shape, weight.dtype, row_bucket(rows))
        if not choice_wins(key, lambda: (lambda: _library_linear(x, weight, bias),
                                         lambda: _native_linear(x, weight, bias))):
            return 0
    return rows


def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear through the C decode kernel. x [..., in] and weight [out, in] (output-major), both fp32 or
    both bf16 -> [..., out]."""
    return decode_gemm(_rows_2d(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


def panel_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """weight's panel-packed copy if `linear` should run x through our C panel kernel: the weight has one
    (`execution.panel_packs`, kept where this host measured the kernel faster), x is fp32 on the CPU and no
    gradient is wanted."""
    panel = panel_packs.panel(weight)
    if panel is None or x.dtype != torch.float32 or x.is_cuda or not cpu_gemm_preferences().panel_weights:
        return None
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return None
    return panel


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] as [rows, in] with unit stride along in (a view where it can be)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on CPU through our C panel kernel for fp32 weights packed for it (`panel_for`), else the C
    decode kernel for a few fp32 or bf16 rows where it wins here (`_native_rows`), else `_library_linear`.
    x [..., in]; weight [out, in] -> [..., out]."""
    panel = panel_for(x, weight)
    if panel is not None:
        return panel_gemm(_rows_2d(x), panel, weight.shape[0], bias).view(*x.shape[:-1], weight.shape[0])
    if _native_rows(x, weight, bias):
        return _native_linear(x, weight, bias)
    return _library_linear(x, weight, bias)


def _library_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through torch's kernels: the weight's oneDNN-packed copy when it has one and that wins here
    (`execution.packed_gemm`), else `unpacked_linear`."""
    packed_weight = _packed_weight_for(x, weight, bias)
    if packed_weight is not None:
        return packed_linear(x, packed_weight, bias)
    return unpacked_linear(x, weight, bias)


def unpacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with two CPU fast paths for decode-sized batches (same function, other kernel calls):

    - one bf16/fp16 row runs as a matrix-vector product: torch's GEMV reads 16-bit weights faster than
      its one-row GEMM (decode of a half-precision model at batch 1);
    - 2..512 fp32 rows (16..512 for an input-major weight, `execution.layout`) run as (W @ x^T)^T, the
      product with the weight as the tall left operand, on hosts where torch's CPU GEMM runs that faster
      than x @ W^T (`execution.cpu_gemm`; 1.15-3.5x on AMD EPYC, benchmarks/weight_layout.py). The result
      is then a transposed view.
    x [..., in]; weight [out, in] -> [..., out]."""
    rows = _wide_product_rows(x, weight)
    if rows:
        x2d = x.reshape(rows, x.shape[-1])
        out = wide_product(x2d, weight) if bias is None else torch.addmm(bias[:, None], weight, x2d.t())  # [out, rows]
        return out.t().view(*x.shape[:-1], weight.shape[0])
    if not _one_half_precision_row_on_cpu(x, weight):
        return F.linear(x, weight, bias)
    row = x.reshape(-1)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_accumulate(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float,
                      weight_t: torch.Tensor | None = None) -> torch.Tensor:
    """out + alpha * linear(x, weight) in one call: out [M, out_features], x [M, in] -> [M, out_features].
    weight_t: weight.t() if the caller keeps it (saves a dispatch per call)."""
    panel = panel_for(x, weight) if out.dtype == x.dtype and x.dim() == 2 else None
    if panel is not None:
        return panel_gemm(_rows_2d(x), panel, weight.shape[0], out, alpha)
    if out.dtype == x.dtype and x.dim() == 2 and _native_rows(x, weight, None):
        return decode_gemm(_rows_2d(x), weight, out, alpha)
    packed_weight = _packed_weight_for(x, weight, None)
    if packed_weight is not None and out.dtype == x.dtype:
        return packed_linear_add(out, x if alpha == 1 else x * alpha, packed_weight)
    if _one_half_precision_row_on_cpu(x, weight) and out.dtype == x.dtype:
        return torch.addmv(out.reshape(-1), weight, x.reshape(-1), alpha=alpha).view_as(out)
    return torch.addmm(out, x, weight.t() if weight_t is None else weight_t, alpha=alpha)
