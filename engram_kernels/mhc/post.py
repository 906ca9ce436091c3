"""mHC post (expand + mix): the residual update after a sublayer.

    y[..., k, d] = post[..., k] * f_out[..., d] + sum_j comb[..., j, k] * x[..., j, d]

i.e. y = post ⊗ f_out + comb^T @ x: comb is applied transposed (column k says how much of each
input stream j flows into output stream k); the direction matters since comb is not symmetric.
Accumulated in fp32, stored as x.dtype. `mhc_post_ref` is the definition; `mhc_post_triton` is a
forward-only kernel (one program per token and block of D).
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


def check_post_args(f_out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> None:
    """Validate f_out [..., D], x [..., n, D] (float), post [..., n] and comb [..., n, n] (fp32)."""
    for name, t in (("f_out", f_out), ("x", x), ("post", post), ("comb", comb)):
        require_tensor(name, t)
    require_dtype("f_out", f_out, FLOAT_DTYPES)
    require_dtype("x", x, FLOAT_DTYPES)
    require_dtype("post", post, (torch.float32,))
    require_dtype("comb", comb, (torch.float32,))
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., n, D], got {tuple(x.shape)}")
    n = x.shape[-2]
    require_shape("f_out", f_out, x.shape[:-2] + x.shape[-1:])
    require_shape("post", post, x.shape[:-1])
    require_shape("comb", comb, x.shape[:-1] + (n,))
    require_same_device(f_out=f_out, x=x, post=post, comb=comb)


def mhc_post_ref(
    f_out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """Reference update. f_out [..., D], x [..., n, D], post [..., n], comb [..., n, n] -> [..., n, D]."""
    check_post_args(f_out, x, post, comb)
    expanded = post.unsqueeze(-1) * f_out.float().unsqueeze(-2)  # [..., n, D]
    mixed = torch.matmul(comb.transpose(-1, -2), x.float())  # [..., n, D]
    return (expanded + mixed).to(x.dtype)


def mhc_post_triton(
    f_out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """Triton update (forward only); same contract as `mhc_post_ref`."""
    check_post_args(f_out, x, post, comb)
    from engram_kernels.mhc.post_kernel import launch_mhc_post

    return launch_mhc_post(f_out, x, post, comb)


mhc_post = dispatched(mhc_post_ref, mhc_post_triton)
