"""mHC pre (collapse): the sublayer input is the pre-weighted sum of the n residual streams.

    collapsed[..., d] = sum_i pre[..., i] * x[..., i, d]      # accumulated in fp32, stored as x.dtype

`mhc_pre_ref` is the definition; `mhc_pre_triton` is a forward-only kernel (one program per token
and block of D). Computing `pre` belongs to `engram_kernels.mhc.split` (sublayers) or the model's head.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.mhc._checks import (
    FLOAT_DTYPES,
    require_dtype,
    require_same_device,
    require_shape,
    require_tensor,
)


def check_pre_args(x: torch.Tensor, pre: torch.Tensor) -> None:
    """Validate x [..., n, D] (fp32/bf16/fp16) and pre [..., n] (fp32)."""
    require_tensor("x", x)
    require_tensor("pre", pre)
    require_dtype("x", x, FLOAT_DTYPES)
    require_dtype("pre", pre, (torch.float32,))
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., n, D], got {tuple(x.shape)}")
    require_shape("pre", pre, x.shape[:-1])
    require_same_device(x=x, pre=pre)


def mhc_pre_ref(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Reference collapse. x [..., n, D], pre [..., n] fp32 -> [..., D] in x.dtype."""
    check_pre_args(x, pre)
    return (pre.unsqueeze(-1) * x.float()).sum(dim=-2).to(x.dtype)


def mhc_pre_triton(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Triton collapse (forward only); same contract as `mhc_pre_ref`."""
    check_pre_args(x, pre)
    from engram_kernels.mhc.pre_kernel import launch_mhc_pre

    return launch_mhc_pre(x, pre)


mhc_pre = dispatched(mhc_pre_ref, mhc_pre_triton)
