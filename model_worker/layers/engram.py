"""Engram module (V4.1 semantics): mixes looked-up n-gram memory into the n mHC residual streams.

    kv = wkv(e) -> key [n, D], value [D];  w = q_weight * k_weight  ([n, D])
    dot_k  = sum_d(h_k * w_k * key_k) * rsqrt(mean(h_k^2) + eps) * rsqrt(mean(key_k^2) + eps) / sqrt(D)
    gate_k = sigmoid(sign(dot_k) * sqrt(max(|dot_k|, 1e-6)))
    out_k  = h_k + gate_k * value

Hashing and table lookup happen outside (`model_worker.engram_hashing`, `engram_tables`); this
module only sees the concatenated rows `e`. It does not implement the January demo's conv branch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MIN_ABS_DOT = 1e-6


class EngramModule(nn.Module):
    """Gated Engram memory read for an n-stream residual of width hidden_size."""

    def __init__(
        self, hidden_size: int, hc_mult: int, n_hash_cols: int, head_dim: int, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("hc_mult", hc_mult),
                            ("n_hash_cols", n_hash_cols), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.n_hash_cols = n_hash_cols
        self.head_dim = head_dim
        self.norm_eps = norm_eps
        self.wkv = nn.Linear(n_hash_cols * head_dim, (hc_mult + 1) * hidden_size, bias=False)
        self.q_weight = nn.Parameter(torch.ones(hc_mult, hidden_size))
        self.k_weight = nn.Parameter(torch.ones(hc_mult, hidden_size))

    def _check_inputs(self, h: torch.Tensor, e: torch.Tensor) -> None:
        n, dim = self.hc_mult, self.hidden_size
        if h.dim() != 4 or tuple(h.shape[2:]) != (n, dim):
            raise ValueError(f"h: expected [B, T, {n}, {dim}], got {tuple(h.shape)}")
        width = self.n_hash_cols * self.head_dim
        if tuple(e.shape) != (*h.shape[:2], width):
            want = (*h.shape[:2], width)
            raise ValueError(f"e: expected {want} (B, T, n_hash_cols*head_dim), got {tuple(e.shape)}")
        if not h.is_floating_point() or not e.is_floating_point():
            raise TypeError(f"h, e: expected floating tensors, got {h.dtype}, {e.dtype}")

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """h [B, T, n, D] residual streams, e [B, T, n_hash_cols*head_dim] rows -> [B, T, n, D]"""
        self._check_inputs(h, e)
        n, dim = self.hc_mult, self.hidden_size
        kv = self.wkv(e.to(self.wkv.weight.dtype)).float()  # [B, T, (n+1)*D]
        key = kv[..., : n * dim].unflatten(-1, (n, dim))  # [B, T, n, D]
        value = kv[..., n * dim :]  # [B, T, D]
        hf = h.float()
        w = (self.q_weight * self.k_weight).float()  # [n, D]
        dot = (hf * w * key).sum(-1)  # [B, T, n]
        h_scale = torch.rsqrt(hf.pow(2).mean(-1) + self.norm_eps)  # [B, T, n]
        key_scale = torch.rsqrt(key.pow(2).mean(-1) + self.norm_eps)  # [B, T, n]
        dot = dot * h_scale * key_scale / math.sqrt(dim)
        gate = torch.sigmoid(torch.sign(dot) * torch.sqrt(dot.abs().clamp(min=MIN_ABS_DOT)))  # [B, T, n]
        return (hf + gate[..., None] * value[:, :, None, :]).to(h.dtype)
