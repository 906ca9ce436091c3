"""Triton kernel for the Engram n-gram hash; the definition is `engram_kernels.engram.hash.engram_hash_ref`.

One program hashes BLOCK_T positions of one sequence for every (n-gram size, head) column.
Arguments are validated by the caller (`engram_hash_triton`), not here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _engram_hash_kernel(
    ids_ptr, valid_ptr, mult_ptr, primes_ptr, offsets_ptr, out_ptr,
    T, pad_id,
    HAS_MASK: tl.constexpr, MAX_NGRAM: tl.constexpr, N_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    in_seq = t < T
    heads = tl.arange(0, HEADS_PAD)  # [HEADS_PAD]
    head_ok = heads < N_HEADS
    row = b * T
    blocked = t < 0  # all False; becomes True once the window meets the start or padding
    rolling = tl.zeros([BLOCK_T], dtype=tl.int64)
    for s in tl.static_range(MAX_NGRAM):
        pos = t - s
        blocked = blocked | (pos < 0)
        if HAS_MASK:
            valid = tl.load(valid_ptr + row + pos, mask=in_seq & ~blocked, other=0)
            blocked = blocked | (valid == 0)
        token = tl.load(ids_ptr + row + pos, mask=in_seq & ~blocked, other=0)
        token = tl.where(blocked, pad_id, token).to(tl.int64)
        term = token * tl.load(mult_ptr + s)
        if s == 0:
            rolling = term
        else:
            rolling = rolling ^ term
            col = (s - 1) * N_HEADS + heads  # [HEADS_PAD]
            prime = tl.load(primes_ptr + col, mask=head_ok, other=1)
            offset = tl.load(offsets_ptr + col, mask=head_ok, other=0)
            rem = rolling[:, None] % prime[None, :]  # C semantics: sign follows rolling
            rem = tl.where(rem < 0, rem + prime[None, :], rem)
            out = out_ptr + (row + t)[:, None] * ((MAX_NGRAM - 1) * N_HEADS) + col[None, :]
            tl.store(out, rem + offset[None, :], mask=in_seq[:, None] & head_ok[None, :])


def launch_engram_hash(
    compressed_ids: torch.Tensor,
    multipliers: torch.Tensor,
    primes: torch.Tensor,
    offsets: torch.Tensor,
    pad_id: int,
    valid_mask: torch.Tensor | None,
    n_heads: int,
) -> torch.Tensor:
    """Run the kernel on validated arguments.  [B, T] -> [B, T, (max_ngram-1)*n_heads] int64"""
    batch, seq_len = compressed_ids.shape
    max_ngram = multipliers.numel()
    n_cols = (max_ngram - 1) * n_heads
    out = torch.empty(batch, seq_len, n_cols, dtype=torch.int64, device=compressed_ids.device)
    if out.numel() == 0:
        return out
    ids = compressed_ids.contiguous()
    valid = ids if valid_mask is None else valid_mask.contiguous().view(torch.uint8)
    block_t = min(128, triton.next_power_of_2(seq_len))
    grid = (batch, triton.cdiv(seq_len, block_t))
    _engram_hash_kernel[grid](
        ids, valid, multipliers.contiguous(), primes.contiguous(), offsets.contiguous(), out,
        seq_len, pad_id,
        HAS_MASK=valid_mask is not None, MAX_NGRAM=max_ngram, N_HEADS=n_heads,
        HEADS_PAD=triton.next_power_of_2(n_heads), BLOCK_T=block_t,
    )
    return out
