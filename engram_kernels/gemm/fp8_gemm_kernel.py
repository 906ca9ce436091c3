"""Triton kernel for the block-scaled FP8 GEMM: out [M, N] = dequant(a_q) @ dequant(w_q)^T.

Same contract as `fp8_gemm_ref` in `fp8_gemm` (the definition). Each program owns a
BLOCK_M x BLOCK_N output tile and walks K in 128-wide steps: one unscaled dot per step, then the
per-token activation scales and the tile's single weight scale are applied to that partial sum
before it joins the fp32 accumulator. On GPUs with FP8 tensor cores (sm_89+) the dot runs on e4m3
directly; elsewhere, and under TRITON_INTERPRET, both operands are upcast to fp32 (E4M3 values and
their products are exact in tf32/fp32, so the two paths agree up to summation order).
No autotuning: block sizes are fixed and chosen for correctness first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_kernels.gemm.fp8_operands import SCALE_BLOCK, check_fp8_gemm_operands

_BLOCK_N = 128  # must divide SCALE_BLOCK so each tile has one weight-scale row


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr,
    M, N, K,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8_DOT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    a_scale_ptrs = a_scale_ptr + rows * stride_asm  # [BLOCK_M]
    w_scale_row = w_scale_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kb * BLOCK_K + ks < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP8_DOT:
            partial = tl.dot(a, w)  # [BLOCK_M, BLOCK_N] fp32
        else:
            partial = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="tf32")
        a_scale = tl.load(a_scale_ptrs + kb * stride_ask, mask=row_ok, other=0.0)  # [BLOCK_M]
        w_scale = tl.load(w_scale_row + kb * stride_wsk)  # scalar
        acc += partial * a_scale[:, None] * w_scale
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _has_fp8_tensor_cores(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9)


def fp8_gemm_triton(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton `fp8_gemm_ref`: a_q e4m3 [M, K], a_scale [M, ceil(K/128)], w_q e4m3 [N, K],
    w_scale [ceil(N/128), ceil(K/128)] -> out [M, N] in `out_dtype`."""
    check_fp8_gemm_operands(a_q, a_scale, w_q, w_scale, out_dtype)
    (m, k), n = a_q.shape, w_q.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=out_dtype, device=a_q.device)
    out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    block_m = max(16, min(64, triton.next_power_of_2(m)))  # tl.dot needs >= 16
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, _BLOCK_N))
    _fp8_gemm_kernel[grid](
        a_q, a_scale, w_q, w_scale, out,
        m, n, k,
        *a_q.stride(), *a_scale.stride(),
        *w_q.stride(), *w_scale.stride(),
        *out.stride(),
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=SCALE_BLOCK, FP8_DOT=_has_fp8_tensor_cores(a_q),
    )  # fmt: skip
    return out
