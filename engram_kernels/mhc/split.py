"""mHC split: turn per-token mixes into the pre, post and comb weights of one sublayer.

For n = hc_mult streams, `mixes` [..., (2+n)*n] is RMSNorm(flat streams) @ fn^T (computed by the
caller). Split it into three logits groups, add `base`, scale each group by its `scale` entry, then
    pre  = sigmoid(.) + eps                                   # [..., n]
    post = 2 * sigmoid(.)                                     # [..., n]
    comb = Sinkhorn(softmax(. viewed [n, n], dim=-1) + eps)   # [..., n, n], doubly stochastic
Sinkhorn: divide columns by their sum + eps, then (sinkhorn_iters - 1) times rows, then columns.
`mhc_split_ref` is the definition; `mhc_split_triton` is a forward-only kernel (one program per
block of tokens). Computing `mixes` and applying the weights belong to `model_worker.layers.mhc`,
`engram_kernels.mhc.pre` and `engram_kernels.mhc.post`.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.mhc._checks import (
    require_dtype,
    require_positive_int,
    require_same_device,
    require_shape,
    require_tensor,
)

MhcWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_split_args(
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_mult: int,
    sinkhorn_iters: int,
    eps: float,
) -> None:
    """Validate the arguments of the split ops (all tensors fp32, sizes consistent with hc_mult)."""
    n = require_positive_int("hc_mult", hc_mult)
    require_positive_int("sinkhorn_iters", sinkhorn_iters)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    width = (2 + n) * n
    for name, t in (("mixes", mixes), ("scale", scale), ("base", base)):
        require_tensor(name, t)
        require_dtype(name, t, (torch.float32,))
    if mixes.dim() < 1 or mixes.shape[-1] != width:
        raise ValueError(f"mixes must have shape [..., {width}] for hc_mult={n}, got {tuple(mixes.shape)}")
    require_shape("scale", scale, (3,))
    require_shape("base", base, (width,))
    require_same_device(mixes=mixes, scale=scale, base=base)


def mhc_split_ref(
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_mult: int,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> MhcWeights:
    """Reference split. mixes [..., (2+n)*n] fp32 -> pre [..., n], post [..., n], comb [..., n, n] fp32."""
    check_split_args(mixes, scale, base, hc_mult, sinkhorn_iters, eps)
    n = hc_mult
    pre_logit, post_logit, comb_logit = mixes.split([n, n, n * n], dim=-1)
    pre_base, post_base, comb_base = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_logit * scale[0] + pre_base) + eps  # [..., n]
    post = 2 * torch.sigmoid(post_logit * scale[1] + post_base)  # [..., n]
    comb_logit = comb_logit.unflatten(-1, (n, n)) * scale[2] + comb_base.view(n, n)  # [..., n, n]
    comb = torch.softmax(comb_logit, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def mhc_split_triton(
    mixes: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_mult: int,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> MhcWeights:
    """Triton split (forward only); same contract as `mhc_split_ref`."""
    check_split_args(mixes, scale, base, hc_mult, sinkhorn_iters, eps)
    from engram_kernels.mhc.split_kernel import launch_mhc_split

    return launch_mhc_split(mixes, scale, base, hc_mult, sinkhorn_iters, float(eps))


mhc_split = dispatched(mhc_split_ref, mhc_split_triton)
