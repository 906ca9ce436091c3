"""Engram n-gram hash (V4.1 semantics): compressed token ids -> table row ids per (n-gram, head).

At position t the window is tokens[s] = id[t - s] for s = 0..max_ngram-1; once t - s falls before
the sequence start or on a masked (padding) position, that token and every further one is `pad_id`.
With m the layer's multipliers:

    rolling = tokens[0] * m[0];  for i = 1..max_ngram-1: rolling ^= tokens[i] * m[i]
    hash id for (n-gram size i+1, head h) = rolling mod prime[i-1][h] + offset[i-1][h]

All arithmetic is int64 with wrap-around multiplication; `mod` is non-negative (Python style).
This module does not build multipliers or primes (see `model_worker.engram_hashing`).
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched


def check_hash_args(
    compressed_ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor,
    pad_id: int,
    valid_mask: torch.Tensor | None,
) -> int:
    """Validate the hash arguments; return n_heads."""
    for name, t in (("compressed_ids", compressed_ids), ("multipliers", multipliers),
                    ("primes", primes), ("offsets", offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name}: expected int64, got {t.dtype}")
    if compressed_ids.dim() != 2:
        raise ValueError(f"compressed_ids: expected [B, T], got shape {tuple(compressed_ids.shape)}")
    if multipliers.dim() != 1 or multipliers.numel() < 2:
        raise ValueError(f"multipliers: expected [max_ngram], max_ngram >= 2, got {tuple(multipliers.shape)}")
    n_grams = multipliers.numel() - 1
    if primes.dim() != 1 or primes.numel() == 0 or primes.numel() % n_grams:
        raise ValueError(
            f"primes: expected [(max_ngram-1)*n_heads] = [{n_grams}*n_heads], got {tuple(primes.shape)}"
        )
    if offsets.shape != primes.shape:
        raise ValueError(f"offsets: expected shape {tuple(primes.shape)}, got {tuple(offsets.shape)}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_id: expected an int, got {type(pad_id).__name__}")
    if valid_mask is not None:
        if not isinstance(valid_mask, torch.Tensor) or valid_mask.dtype != torch.bool:
            raise TypeError("valid_mask: expected a bool tensor or None")
        if valid_mask.shape != compressed_ids.shape:
            raise ValueError(
                f"valid_mask: expected shape {tuple(compressed_ids.shape)}, got {tuple(valid_mask.shape)}"
            )
    devices = {t.device for t in (compressed_ids, multipliers, primes, offsets, valid_mask) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"compressed_ids, multipliers, primes, offsets, valid_mask: on {devices}")
    return primes.numel() // n_grams


def _shift_right(x: torch.Tensor, s: int, fill: int | bool) -> torch.Tensor:
    """x[:, t - s] at position t, `fill` where t - s < 0.  # [B, T] -> [B, T]"""
    if s == 0:
        return x
    head = torch.full_like(x[:, : min(s, x.shape[1])], fill)
    return torch.cat([head, x[:, : max(x.shape[1] - s, 0)]], dim=1)


def engram_hash_ref(
    compressed_ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor,
    pad_id: int,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hash ids, torch reference.  ids [B, T] -> [B, T, (max_ngram-1)*n_heads], columns (n-gram, head)."""
    n_heads = check_hash_args(compressed_ids, multipliers, primes, offsets, pad_id, valid_mask)
    valid = torch.ones_like(compressed_ids, dtype=torch.bool) if valid_mask is None else valid_mask
    blocked = torch.zeros_like(valid)  # [B, T]; sticky once a window meets the start or padding
    columns = []
    rolling = torch.zeros_like(compressed_ids)
    for s in range(multipliers.numel()):
        blocked = blocked | ~_shift_right(valid, s, False)
        token = torch.where(blocked, pad_id, _shift_right(compressed_ids, s, pad_id))  # [B, T]
        term = token * multipliers[s]
        rolling = term if s == 0 else rolling ^ term
        if s > 0:
            heads = slice((s - 1) * n_heads, s * n_heads)
            columns.append(torch.remainder(rolling[..., None], primes[heads]) + offsets[heads])  # [B, T, H]
    return torch.cat(columns, dim=-1)


def engram_hash_triton(
    compressed_ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor,
    pad_id: int,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hash ids, Triton kernel; same contract as `engram_hash_ref`."""
    n_heads = check_hash_args(compressed_ids, multipliers, primes, offsets, pad_id, valid_mask)
    from engram_kernels.engram.hash_kernel import launch_engram_hash

    return launch_engram_hash(compressed_ids, multipliers, primes, offsets, pad_id, valid_mask, n_heads)


engram_hash = dispatched(engram_hash_ref, engram_hash_triton)
