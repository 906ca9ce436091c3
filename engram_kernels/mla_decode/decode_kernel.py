"""Triton kernel for paged MLA decode attention; the definition is `decode.paged_mla_decode_ref`.

One program handles one sequence and BLOCK_H heads. It walks the sequence's context BLOCK_N tokens at
a time (BLOCK_N divides the page size, so a chunk never straddles two pages), looks the page up in the
block table, loads the chunk's latents and k_rope (dequantizing FP8 rows on the fly: e4m3 byte times
its tile's fp32 scale, bf16 rope), and keeps an online softmax: running max m, running sum l, and the
unnormalised output acc [BLOCK_H, r]. Dots run in fp32 (`ieee`), matching the reference closely.
Arguments are validated by the caller; no split-KV reduction (one program per sequence x head block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_kernels.mla_decode.layout import LatentCacheLayout

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _load_chunk(
    cache_ptr, rows, tok_ok, r, e,
    R: tl.constexpr, ROPE: tl.constexpr, IS_FP8: tl.constexpr, TILE: tl.constexpr,
    SCALE_OFFSET: tl.constexpr, ROPE_OFFSET: tl.constexpr,
):
    """rows [BLOCK_N] element offsets of token rows -> (c [BLOCK_N, BLOCK_R], k_rope [BLOCK_N, BLOCK_E]) fp32."""
    c_ok = tok_ok[:, None] & (r < R)[None, :]
    e_ok = tok_ok[:, None] & (e < ROPE)[None, :]
    row_ptrs = cache_ptr + rows[:, None]  # [BLOCK_N, 1]
    if IS_FP8:
        codes = tl.load(row_ptrs + r[None, :], mask=c_ok, other=0)  # uint8 e4m3 codes
        scale_ptrs = (row_ptrs + SCALE_OFFSET).to(tl.pointer_type(tl.float32)) + (r // TILE)[None, :]
        c = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * tl.load(scale_ptrs, mask=c_ok, other=0.0)
        rope_ptrs = (row_ptrs + ROPE_OFFSET).to(tl.pointer_type(tl.bfloat16)) + e[None, :]
        k_rope = tl.load(rope_ptrs, mask=e_ok, other=0.0).to(tl.float32)
    else:
        c = tl.load(row_ptrs + r[None, :], mask=c_ok, other=0.0).to(tl.float32)
        k_rope = tl.load(row_ptrs + R + e[None, :], mask=e_ok, other=0.0).to(tl.float32)
    return c, k_rope


@triton.jit
def _paged_mla_decode_kernel(
    q_lat_ptr, q_rope_ptr, cache_ptr, block_table_ptr, context_lens_ptr, out_ptr,
    H, stride_bt, scale,
    R: tl.constexpr, ROPE: tl.constexpr, ROW_WIDTH: tl.constexpr, PAGE: tl.constexpr,
    IS_FP8: tl.constexpr, TILE: tl.constexpr, SCALE_OFFSET: tl.constexpr, ROPE_OFFSET: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    r = tl.arange(0, BLOCK_R)
    e = tl.arange(0, BLOCK_E)
    h_ok = heads < H
    q_rows = b * H + heads  # [BLOCK_H]
    q_lat = tl.load(q_lat_ptr + q_rows[:, None] * R + r[None, :], mask=h_ok[:, None] & (r < R)[None, :], other=0.0)
    q_rope = tl.load(
        q_rope_ptr + q_rows[:, None] * ROPE + e[None, :], mask=h_ok[:, None] & (e < ROPE)[None, :], other=0.0
    )
    q_lat = q_lat.to(tl.float32)  # [BLOCK_H, BLOCK_R]
    q_rope = q_rope.to(tl.float32)  # [BLOCK_H, BLOCK_E]
    context_len = tl.load(context_lens_ptr + b)
    qk_scale = scale * _LOG2E  # softmax in base 2

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of the scaled scores
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)  # running sum of exp2(score - m) * c
    for start in range(0, context_len, BLOCK_N):
        tok = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] logical positions
        tok_ok = tok < context_len
        page = tl.load(block_table_ptr + b * stride_bt + start // PAGE).to(tl.int64)
        rows = (page * PAGE + tok % PAGE) * ROW_WIDTH  # [BLOCK_N]
        c, k_rope = _load_chunk(cache_ptr, rows, tok_ok, r, e, R, ROPE, IS_FP8, TILE, SCALE_OFFSET, ROPE_OFFSET)
        s = tl.dot(q_lat, tl.trans(c), input_precision="ieee")
        s += tl.dot(q_rope, tl.trans(k_rope), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
        s = tl.where(tok_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first chunk (m_i = -inf, m_new finite)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, c, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * R + r[None, :], out, mask=h_ok[:, None] & (r < R)[None, :])


def _tile_sizes(heads: int, layout: LatentCacheLayout, block_size: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_N). The CPU interpreter pays per op, so it takes whole pages and many heads;
    a GPU keeps the fp32 chunk [BLOCK_N, r] small enough for registers."""
    block_r = triton.next_power_of_2(layout.kv_lora_rank)
    if on_gpu:
        return 16, max(16, min(block_size, 4096 // block_r))
    return max(16, min(128, triton.next_power_of_2(heads))), block_size


def launch_paged_mla_decode(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    layout: LatentCacheLayout,
    block_size: int,
) -> torch.Tensor:
    """Run the kernel on validated arguments. -> o_lat [B, H, r] fp32"""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
    batch, heads, r = q_lat.shape
    out = torch.empty(batch, heads, r, dtype=torch.float32, device=q_lat.device)
    if out.numel() == 0:
        return out
    block_h, block_n = _tile_sizes(heads, layout, block_size, q_lat.is_cuda)
    block_table = block_table.contiguous()
    grid = (batch, triton.cdiv(heads, block_h))
    _paged_mla_decode_kernel[grid](
        q_lat.contiguous(), q_rope.contiguous(), cache, block_table, context_lens.contiguous(), out,
        heads, block_table.stride(0), scale,
        R=r, ROPE=layout.rope_dim, ROW_WIDTH=layout.row_width, PAGE=block_size,
        IS_FP8=layout.fmt == "fp8", TILE=layout.tile, SCALE_OFFSET=layout.scale_offset,
        ROPE_OFFSET=layout.rope_offset,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_E=max(16, triton.next_power_of_2(layout.rope_dim)),
        num_warps=8 if r >= 256 else 4,
    )
    return out
