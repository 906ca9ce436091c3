"""mHC (manifold-constrained hyper-connections) layers: the n-stream residual around each sublayer.

The residual is x [B, T, n, D] (n = hc_mult). Around every sublayer (attention, FFN) a
`HyperConnection` collapses the streams into the sublayer input and, afterwards, expands the
sublayer output back into n streams mixed with a doubly-stochastic comb matrix:
    collapsed, post, comb = hc(x)               # collapsed [B, T, D]
    x = hc.expand(f(collapsed), x, post, comb)  # y_k = post_k * f + sum_j comb[j, k] * x_j
`HyperHead` is the final collapse before the model's last norm; `expand_to_streams` copies the
embedding output to all n streams. The mixes (unweighted RMSNorm of the flattened streams in fp32,
then @ fn^T) are computed here in torch; the split/collapse/expand math is `engram_kernels.mhc`.
Not here: the sublayers themselves, the final norm, and loading checkpoints (parameter names match
the checkpoint: fn/base/scale and hc_fn/hc_base/hc_scale, kept in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram_kernels.mhc import mhc_post, mhc_pre, mhc_split

INIT_STD = 0.02


def stream_mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [..., n, D] -> RMSNorm_unweighted(flatten(x)) @ fn^T in fp32, [..., fn.shape[0]]."""
    flat = x.flatten(-2).float()  # [..., n*D]
    flat = flat * torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + norm_eps)
    with torch.autocast(x.device.type, enabled=False):  # fp32 also inside a (training) autocast region
        return F.linear(flat, fn.float())


def expand_to_streams(h: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """Copy the embedding output h [B, T, D] to all streams: [B, T, n, D] (a new, contiguous tensor)."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if isinstance(hc_mult, bool) or not isinstance(hc_mult, int) or hc_mult < 1:
        raise ValueError(f"hc_mult must be an int >= 1, got {hc_mult!r}")
    if h.dim() < 1:
        raise ValueError(f"h must have shape [..., D], got {tuple(h.shape)}")
    return h.unsqueeze(-2).expand(*h.shape[:-1], hc_mult, h.shape[-1]).contiguous()


def _check_streams(x: torch.Tensor, hc_mult: int, hidden_size: int) -> None:
    """Raise unless x is a float tensor [..., hc_mult, hidden_size]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or tuple(x.shape[-2:]) != (hc_mult, hidden_size):
        raise ValueError(f"x must have shape [..., {hc_mult}, {hidden_size}], got {tuple(x.shape)}")


class HyperConnection(nn.Module):
    """mHC around one sublayer. Parameters (fp32): fn [(2+n)*n, n*D], base [(2+n)*n], scale [3]."""

    def __init__(
        self,
        hidden_size: int,
        hc_mult: int = 4,
        sinkhorn_iters: int = 20,
        hc_eps: float = 1e-6,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.sinkhorn_iters = sinkhorn_iters
        self.hc_eps = hc_eps
        self.norm_eps = norm_eps
        width = (2 + hc_mult) * hc_mult  # pre (n) | post (n) | comb (n*n)
        self.fn = nn.Parameter(torch.empty(width, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(width, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = INIT_STD, generator: torch.Generator | None = None) -> None:
        """Small normal fn, zero base, unit scale: pre ~ 0.5, post ~ 1, comb ~ uniform 1/n."""
        nn.init.normal_(self.fn, mean=0.0, std=std, generator=generator)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, n, D] -> collapsed [B, T, D] (x.dtype), post [B, T, n], comb [B, T, n, n] (fp32)."""
        _check_streams(x, self.hc_mult, self.hidden_size)
        mixes = stream_mixes(x, self.fn, self.norm_eps)  # [B, T, (2+n)*n]
        pre, post, comb = mhc_split(
            mixes, self.scale.float(), self.base.float(), self.hc_mult, self.sinkhorn_iters, self.hc_eps
        )
        return mhc_pre(x, pre), post, comb

    def expand(
        self, f_out: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
    ) -> torch.Tensor:
        """Residual update: f_out [B, T, D], x [B, T, n, D] -> y [B, T, n, D] = post ⊗ f_out + comb^T @ x."""
        return mhc_post(f_out, x, post, comb)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, sinkhorn_iters={self.sinkhorn_iters}"


class HyperHead(nn.Module):
    """Final mHC collapse (no Sinkhorn). Parameters (fp32): hc_fn [n, n*D], hc_base [n], hc_scale [1]."""

    def __init__(
        self, hidden_size: int, hc_mult: int = 4, hc_eps: float = 1e-6, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.hc_eps = hc_eps
        self.norm_eps = norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.empty(hc_mult, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self, std: float = INIT_STD, generator: torch.Generator | None = None) -> None:
        """Small normal hc_fn, zero hc_base, unit hc_scale: pre ~ 0.5 per stream."""
        nn.init.normal_(self.hc_fn, mean=0.0, std=std, generator=generator)
        nn.init.zeros_(self.hc_base)
        nn.init.ones_(self.hc_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, n, D] -> [B, T, D] (x.dtype): sum_i (sigmoid(mix_i * scale + base_i) + eps) * x_i."""
        _check_streams(x, self.hc_mult, self.hidden_size)
        mixes = stream_mixes(x, self.hc_fn, self.norm_eps)  # [B, T, n]
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return mhc_pre(x, pre)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}"
