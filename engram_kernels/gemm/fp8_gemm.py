"""Block-scaled FP8 GEMM (DeepSeek-V3 style): torch reference and dispatcher.

out [M, N] = sum over 128-wide K blocks kb of (a_q[:, kb] @ w_q[:, kb]^T) * a_scale[:, kb] *
w_scale[n // 128, kb], accumulated in fp32. The reference below is the definition;
`fp8_gemm_kernel` is the Triton kernel that must match it. Quantizing activations is left to the
caller (see `fp8_linear`).
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.gemm.fp8_gemm_kernel import fp8_gemm_triton
from engram_kernels.gemm.fp8_operands import SCALE_BLOCK, check_fp8_gemm_operands


def fp8_gemm_ref(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a_q e4m3 [M, K], a_scale fp32 [M, ceil(K/128)], w_q e4m3 [N, K], w_scale fp32
    [ceil(N/128), ceil(K/128)] -> out [M, N] in `out_dtype`."""
    check_fp8_gemm_operands(a_q, a_scale, w_q, w_scale, out_dtype)
    (m, k), n = a_q.shape, w_q.shape[0]
    a, w = a_q.float(), w_q.float()  # CPU torch has no fp8 arithmetic
    w_scale_per_row = w_scale.repeat_interleave(SCALE_BLOCK, dim=0)[:n]  # [N, ceil(K/128)]
    out = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    for kb, start in enumerate(range(0, k, SCALE_BLOCK)):
        ks = slice(start, start + SCALE_BLOCK)
        partial = a[:, ks] @ w[:, ks].T  # [M, N]
        out += partial * a_scale[:, kb, None] * w_scale_per_row[None, :, kb]
    return out.to(out_dtype)


fp8_gemm = dispatched(fp8_gemm_ref, fp8_gemm_triton)
