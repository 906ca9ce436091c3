"""V4 sparse decode attention with a shared KV vector and per-head sinks: torch reference, Triton entry
point and dispatcher.

One query token per sequence attends over (a) the first sliding_count[b] sliding-window keys and (b) the
compressed entries picked by entry_index[b] (-1 = unused slot), plus one per-head sink logit (spec §5.1):

    logit[b, h, j] = (q[b, h] . kv_j) * scale          kv_j: a valid sliding key or a selected entry
    p[b, h, :]     = softmax over {logit[b, h, :], sinks[h]}, the sink's probability dropped
    out[b, h]      = sum_j p[b, h, j] * kv_j           -> [B, H, D] in q.dtype (fp32 inside)

Key = value, so each kv_j serves both. The sink only enlarges the denominator: a sequence with no valid
key gets a zero output. Sliding rows past sliding_count and entries no slot selects are never read. An
index listed twice counts twice (the indexer never lists one twice). Sinks must be finite. RoPE, the
inverse RoPE on the output and the output projection are the model layer's job.
"""

from __future__ import annotations

import torch

from engram_kernels.dispatch import dispatched
from engram_kernels.v4_decode.checks import (
    check_device,
    check_float32,
    check_float_dims,
    check_index,
    check_ranges,
    check_scale,
    check_shape,
)


def check_attention_args(q: torch.Tensor, sliding: torch.Tensor, sliding_count: torch.Tensor,
        entries: torch.Tensor, entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> None:
    """Validate shapes, dtypes and devices, 0 <= sliding_count[b] <= W and -1 <= entry_index < T."""
    check_float_dims(q, "q", 3, "[B, H, D]")
    batch, heads, dim = q.shape
    check_float_dims(sliding, "sliding", 3, "[B, W, D]")
    check_shape(sliding, "sliding", (batch, sliding.shape[1], dim), "[B, W, D]")
    check_index(sliding_count, "sliding_count")
    check_shape(sliding_count, "sliding_count", (batch,), "[B]")
    check_float_dims(entries, "entries", 3, "[B, T, D]")
    check_shape(entries, "entries", (batch, entries.shape[1], dim), "[B, T, D]")
    check_index(entry_index, "entry_index")
    if entry_index.dim() != 2 or entry_index.shape[0] != batch:
        raise ValueError(f"entry_index must have shape [B, K] with B = {batch}, got {tuple(entry_index.shape)}")
    check_float32(sinks, "sinks")
    check_shape(sinks, "sinks", (heads,), "[H]")
    check_scale(scale)
    check_device(q=q, sliding=sliding, sliding_count=sliding_count, entries=entries, entry_index=entry_index,
                 sinks=sinks)
    check_ranges(
        (sliding_count, "sliding_count", 0, sliding.shape[1]),
        (entry_index, "entry_index", -1, entries.shape[1] - 1),
    )


def sparse_decode_attention_ref(q: torch.Tensor, sliding: torch.Tensor, sliding_count: torch.Tensor,
        entries: torch.Tensor, entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """Sparse decode attention with sinks, torch reference, fp32 inside.

    q [B, H, D]; sliding [B, W, D]; sliding_count int [B]; entries [B, T, D]; entry_index int [B, K]
    (-1 = unused); sinks [H] fp32 -> out [B, H, D] in q.dtype.
    """
    check_attention_args(q, sliding, sliding_count, entries, entry_index, sinks, scale)
    batch, heads, dim = q.shape
    width = sliding.shape[1]
    in_window = torch.arange(width, device=q.device)[None, :] < sliding_count[:, None]  # [B, W]
    used = entry_index >= 0  # [B, K]
    if entries.shape[1]:
        rows = torch.arange(batch, device=q.device)[:, None]
        picked = entries[rows, entry_index.long().clamp(min=0)].float()  # [B, K, D]
    else:  # no entries at all: every slot is -1
        picked = torch.zeros(batch, entry_index.shape[1], dim, device=q.device)
    kv = torch.cat((sliding.float(), picked), dim=1)  # [B, W + K, D]
    valid = torch.cat((in_window, used), dim=1)  # [B, W + K]
    kv = kv.masked_fill(~valid[..., None], 0.0)  # rows never read may hold anything (NaN)
    logits = torch.einsum("bhd,bjd->bhj", q.float(), kv) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    sink = sinks[None, :, None].expand(batch, heads, 1)
    probs = torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1]  # [B, H, W + K]
    return torch.einsum("bhj,bjd->bhd", probs, kv).to(q.dtype)


def sparse_decode_attention_triton(q: torch.Tensor, sliding: torch.Tensor, sliding_count: torch.Tensor,
        entries: torch.Tensor, entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """`sparse_decode_attention_ref` semantics in a Triton kernel (online softmax, sink folded in first)."""
    check_attention_args(q, sliding, sliding_count, entries, entry_index, sinks, scale)
    from engram_kernels.v4_decode.attention_kernel import launch_sparse_decode_attention

    return launch_sparse_decode_attention(q, sliding, sliding_count, entries, entry_index, sinks, float(scale))


sparse_decode_attention = dispatched(sparse_decode_attention_ref, sparse_decode_attention_triton)
