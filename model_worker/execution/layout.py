"""Memory layout of decode weights: which of a weight's two orders torch's CPU kernels read fastest.

A Linear weight is [out, in]. Stored row-major ("output-major", nn.Linear's default), one decode row
`x @ W^T` is a matrix-vector product of short dot products, one per output. Stored the other way round
("input-major": the same [out, in] tensor over [in, out] memory, i.e. `W.t().contiguous().t()`) the
product streams whole rows of length `out` (`y += x[k] * W^T[k, :]`). For fp32 on CPU the second order
is faster whenever out >= in: in benchmarks/weight_layout.py (quick run, AMD EPYC) the V3-shaped LM head
[32000, 768] reads 1.56x faster at one row, and with the product forms of `execution.cpu_gemm` a decode
step runs 1.26x faster than with torch's defaults at batch 1. Where out < in, output-major is faster for
a dense MLP's down projection [768, 2048] (input-major takes 1.2x as long). bf16 keeps nn.Linear's
order: its one-row path is torch's GEMV (`layers.linear`), which takes 1.6-2.6x as long input-major in the
same benchmark.
Values, shapes, names and `state_dict()` are the same either way; only strides differ, and GEMM kernels
take either order without a copy.
"""

from __future__ import annotations

import torch

from model_worker.execution.cpu_gemm import cpu_gemm_preferences


def prefers_input_major(weight: torch.Tensor) -> bool:
    """Whether a float weight [..., out, in] reads faster stored input-major: fp32 on CPU, out >= in, on a
    host where that order measured faster (`execution.cpu_gemm`)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.shape[-2] < weight.shape[-1]:
        return False
    return cpu_gemm_preferences().input_major_one_row


def is_input_major(weight: torch.Tensor) -> bool:
    """True when [..., out, in] lies in memory as [..., in, out] (and is not a plain contiguous tensor)."""
    return weight.dim() >= 2 and weight.transpose(-1, -2).is_contiguous() and not weight.is_contiguous()


def arranged(weight: torch.Tensor) -> torch.Tensor:
    """weight [..., out, in] with the same values, stored in its preferred order (itself when it already is).
    A weight that prefers output-major comes back contiguous."""
    if prefers_input_major(weight):
        return weight if is_input_major(weight) else weight.transpose(-1, -2).contiguous().transpose(-1, -2)
    return weight if weight.is_contiguous() else weight.contiguous()
