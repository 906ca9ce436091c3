"""FP8 linear layer: quantize activations per token per 128 channels, then the block-scaled FP8 GEMM.

y = x @ W^T (+ bias) for a DeepSeek FP8 weight (w_q e4m3 [N, K] + w_scale [ceil(N/128), ceil(K/128)]).
Any leading dims; the result comes back in x's dtype. It does not quantize weights (done offline, see
`engram_kernels.quant.fp8_weight`) and holds no state; a model's Linear module wraps it.
"""

from __future__ import annotations

import torch

from engram_kernels.gemm.fp8_gemm import fp8_gemm
from engram_kernels.gemm.fp8_operands import SCALE_BLOCK
from engram_kernels.quant.fp8_block import quantize_fp8_block
from engram_kernels.quant.fp8_format import check_float, check_fp8


def fp8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str = "fp32",
) -> torch.Tensor:
    """x [..., K] float, w_q e4m3 [N, K], w_scale fp32 [ceil(N/128), ceil(K/128)], bias [N] -> y [..., N]."""
    check_float(x, "x")
    check_fp8(w_q, "w_q", dim=2)
    n, k_w = w_q.shape
    if x.shape[-1] != k_w:
        raise ValueError(f"x must have K={k_w} features (w_q is [N, K]), got shape {tuple(x.shape)}")
    if bias is not None:
        check_float(bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    lead, k = x.shape[:-1], x.shape[-1]
    a_q, a_scale = quantize_fp8_block(x.reshape(-1, k), SCALE_BLOCK, scale_fmt)  # [M, K], [M, ceil(K/128)]
    y = fp8_gemm(a_q, a_scale, w_q, w_scale, torch.float32)  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)
