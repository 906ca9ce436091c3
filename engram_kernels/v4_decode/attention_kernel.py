"""Triton kernel for V4 sparse decode attention; the definition is `attention.sparse_decode_attention_ref`.

One program handles one sequence and BLOCK_H heads. It keeps an online softmax in base 2 (running max
m, running sum l, unnormalised output acc [BLOCK_H, D]) that starts from the sink: m = sink, l = 1
(exp(sink - m)), acc = 0, since the sink adds to the denominator but carries no value. It then walks
the valid sliding keys BLOCK_N at a time and the entry slots BLOCK_N at a time, gathering the selected
entries' rows (slots holding -1 are masked, never read). Key = value, so each chunk feeds both dots,
which run in fp32 (`ieee`). Arguments are validated by the caller; no split-KV reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _online_update(q, kv, ok, qk_scale, m_i, l_i, acc):
    """Fold a chunk kv [BLOCK_N, BLOCK_D] fp32 (rows where ok is False are masked) into (m, l, acc)."""
    s = tl.dot(q, tl.trans(kv), input_precision="ieee") * qk_scale  # [BLOCK_H, BLOCK_N]
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: m starts at the sink
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _query_and_sink(q_ptr, sinks_ptr, b, heads, h_ok, d, d_ok, H, D: tl.constexpr):
    """The block's queries [BLOCK_H, BLOCK_D] fp32, and the online softmax started from the sink logit (base 2):
    (q, running max = the sink, denominator = 1, accumulator = 0: the sink carries no value)."""
    q_offs = (b * H + heads)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    m_i = tl.load(sinks_ptr + heads, mask=h_ok, other=0.0) * _LOG2E
    return q, m_i, m_i * 0.0 + 1.0, q * 0.0


@triton.jit
def _sparse_decode_kernel(
    q_ptr, sliding_ptr, count_ptr, entries_ptr, index_ptr, sinks_ptr, out_ptr,
    H, W, T, K, scale,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    h_ok = heads < H
    d_ok = d < D
    q, m_i, l_i, acc = _query_and_sink(q_ptr, sinks_ptr, b, heads, h_ok, d, d_ok, H, D)
    qk_scale = scale * _LOG2E

    count = tl.load(count_ptr + b)
    for start in range(0, count, BLOCK_N):  # valid sliding keys
        ok = start + n < count
        kv = tl.load(
            sliding_ptr + (b * W + start + n)[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0
        )
        m_i, l_i, acc = _online_update(q, kv.to(tl.float32), ok, qk_scale, m_i, l_i, acc)
    for start in range(0, K, BLOCK_N):  # selected entries
        idx = tl.load(index_ptr + b * K + start + n, mask=start + n < K, other=-1).to(tl.int64)
        ok = idx >= 0
        kv = tl.load(entries_ptr + (b * T + idx)[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :],
                     other=0.0)
        m_i, l_i, acc = _online_update(q, kv.to(tl.float32), ok, qk_scale, m_i, l_i, acc)

    out = acc / l_i[:, None]
    out_offs = (b * H + heads)[:, None] * D + d[None, :]  # [BLOCK_H, BLOCK_D]: where q came from
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


def _tile_sizes(heads: int, block_d: int, longest: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_N). The CPU interpreter pays per op, so it takes many heads and long chunks;
    a GPU keeps acc [BLOCK_H, D] and a chunk [BLOCK_N, D] small enough for registers."""
    if on_gpu:
        return 16, max(16, min(64, 8192 // block_d))
    return max(16, min(128, triton.next_power_of_2(heads))), max(16, min(256, triton.next_power_of_2(longest)))


def launch_sparse_decode_attention(q: torch.Tensor, sliding: torch.Tensor, sliding_count: torch.Tensor,
        entries: torch.Tensor, entry_index: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """Run the kernel on validated arguments. -> out [B, H, D] in q.dtype"""
    batch, heads, dim = q.shape
    width, total, slots = sliding.shape[1], entries.shape[1], entry_index.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(dim))
    block_h, block_n = _tile_sizes(heads, block_d, max(width, slots, 1), q.is_cuda)
    grid = (batch, triton.cdiv(heads, block_h))
    _sparse_decode_kernel[grid](
        q.contiguous(), sliding.contiguous(), sliding_count.contiguous(), entries.contiguous(),
        entry_index.contiguous(), sinks.contiguous(), out,
        heads, width, total, slots, scale,
        D=dim, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=8 if block_d >= 256 else 4,
    )
    return out
