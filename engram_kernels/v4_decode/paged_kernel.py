"""Triton kernel for V4 sparse decode attention over MODEL1 FP8 pages; the definition is
`paged.sparse_decode_attention_paged_ref`.

One program handles one sequence and BLOCK_H heads, with the online softmax of `attention_kernel` (base 2,
started from the sink: m = sink, l = 1, acc = 0). It walks the valid window rows BLOCK_N at a time, then
the entry slots BLOCK_N at a time, looking each row's page up in its page list and dequantizing the row in
registers as one [BLOCK_N, BLOCK_D] fp32 tile (d < nope: nope values, nope <= d < D: rope values):

    nope[d] = E4M3[byte] * E8M0[scale byte of tile d // tile]     (E4M3, E8M0: 256-entry fp32 tables)
    rope[i] = bfloat16 from bytes (lo, hi) at nope + 2i: float32 bits (hi << 24) | (lo << 16)

The tables are torch's own decoding of every code (`quant.fp8_format.one_byte_float_to_float32`), so the
values are bit-identical to the reference's and no fp8 dtype is needed (the interpreter runs it as is);
rope is assembled from bytes, so any nope_dim parity (any alignment) works. Rows past window_count and
slots holding -1 are masked: neither they nor their page ids are read. Arguments are validated by the
caller; no split-KV reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engram_kernels.mla_decode.model1_layout import SCALE_SLOT_BYTES, Model1CacheLayout
from engram_kernels.quant.fp8_format import one_byte_float_to_float32
from engram_kernels.v4_decode.attention_kernel import _LOG2E, _online_update, _query_and_sink

_TABLES: dict[torch.device, torch.Tensor] = {}


def decode_tables(device: torch.device) -> torch.Tensor:
    """fp32 [512]: entry c the float8_e4m3fn code c, entry 256 + c the float8_e8m0fnu code c (2^(c - 127);
    NaN for 255), as torch decodes them. Cached per device."""
    table = _TABLES.get(device)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        parts = [one_byte_float_to_float32(codes.view(dtype)) for dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu)]
        table = _TABLES[device] = torch.cat(parts).to(device)
    return table


@triton.jit
def _load_rows(pool_ptr, table_ptr, page, slot, ok, d, page_stride,
               NOPE: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, TOKEN_BYTES: tl.constexpr,
               SCALES_OFFSET: tl.constexpr, SCALE_SLOT: tl.constexpr):
    """Tokens (page [BLOCK_N] int64, slot [BLOCK_N]) where ok -> kv [BLOCK_N, BLOCK_D] fp32, zeros elsewhere."""
    base = page * page_stride  # [BLOCK_N]
    row = pool_ptr + (base + slot * TOKEN_BYTES)[:, None]  # [BLOCK_N, 1]
    nope_ok = ok[:, None] & (d < NOPE)[None, :]
    rope_ok = ok[:, None] & ((d >= NOPE) & (d < D))[None, :]
    code = tl.load(row + d[None, :], mask=nope_ok, other=0).to(tl.int32)
    scale_code = tl.load(pool_ptr + (base + SCALES_OFFSET + slot * SCALE_SLOT)[:, None] + (d // TILE)[None, :],
                         mask=nope_ok, other=0).to(tl.int32)
    nope = tl.load(table_ptr + code) * tl.load(table_ptr + 256 + scale_code)
    rope_at = row + NOPE + 2 * (d - NOPE)[None, :]
    lo = tl.load(rope_at, mask=rope_ok, other=0).to(tl.uint32)
    hi = tl.load(rope_at + 1, mask=rope_ok, other=0).to(tl.uint32)
    rope = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
    return tl.where(nope_ok, nope, rope)  # masked lanes: rope bits 0 -> 0.0


@triton.jit
def _paged_sparse_decode_kernel(
    q_ptr, pool_ptr, table_ptr, window_pages_ptr, first_ptr, count_ptr, entry_pages_ptr, index_ptr, sinks_ptr,
    out_ptr, H, PW, PE, K, page_stride, scale,
    NOPE: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr, PAGE: tl.constexpr, TOKEN_BYTES: tl.constexpr,
    SCALES_OFFSET: tl.constexpr, SCALE_SLOT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    h_ok = heads < H
    d_ok = d < D
    q, m_i, l_i, acc = _query_and_sink(q_ptr, sinks_ptr, b, heads, h_ok, d, d_ok, H, D)
    qk_scale = scale * _LOG2E

    first = tl.load(first_ptr + b).to(tl.int64)
    count = tl.load(count_ptr + b)
    for start in range(0, count, BLOCK_N):  # valid window rows: positions first + j in the page list
        ok = start + n < count
        pos = first + start + n
        page = tl.load(window_pages_ptr + b * PW + pos // PAGE, mask=ok, other=0).to(tl.int64)
        kv = _load_rows(pool_ptr, table_ptr, page, pos % PAGE, ok, d, page_stride,
                        NOPE, D, TILE, TOKEN_BYTES, SCALES_OFFSET, SCALE_SLOT)
        m_i, l_i, acc = _online_update(q, kv, ok, qk_scale, m_i, l_i, acc)
    for start in range(0, K, BLOCK_N):  # selected entries
        idx = tl.load(index_ptr + b * K + start + n, mask=start + n < K, other=-1).to(tl.int64)
        ok = idx >= 0
        idx = tl.where(ok, idx, 0)
        page = tl.load(entry_pages_ptr + b * PE + idx // PAGE, mask=ok, other=0).to(tl.int64)
        kv = _load_rows(pool_ptr, table_ptr, page, idx % PAGE, ok, d, page_stride,
                        NOPE, D, TILE, TOKEN_BYTES, SCALES_OFFSET, SCALE_SLOT)
        m_i, l_i, acc = _online_update(q, kv, ok, qk_scale, m_i, l_i, acc)

    out = acc / l_i[:, None]
    out_offs = (b * H + heads)[:, None] * D + d[None, :]  # [BLOCK_H, BLOCK_D]: where q came from
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


def _tile_sizes(heads: int, block_d: int, longest: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_N), as `attention_kernel._tile_sizes`: the CPU interpreter pays per op, so it takes
    many heads and long chunks; a GPU keeps acc [BLOCK_H, D] and a chunk [BLOCK_N, D] in registers."""
    if on_gpu:
        return 16, max(16, min(64, 8192 // block_d))
    return max(16, min(128, triton.next_power_of_2(heads))), max(16, min(256, triton.next_power_of_2(longest)))


def launch_sparse_decode_attention_paged(q: torch.Tensor, pool: torch.Tensor, window_pages: torch.Tensor,
        window_first: torch.Tensor, window_count: torch.Tensor, entry_pages: torch.Tensor,
        entry_index: torch.Tensor, sinks: torch.Tensor, scale: float, layout: Model1CacheLayout) -> torch.Tensor:
    """Run the kernel on validated arguments. -> out [B, H, D] in q.dtype"""
    batch, heads, dim = q.shape
    window_rows, slots = window_pages.shape[1] * layout.block_size, entry_index.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(dim))
    block_h, block_n = _tile_sizes(heads, block_d, max(window_rows, slots, 1), q.is_cuda)
    grid = (batch, triton.cdiv(heads, block_h))
    _paged_sparse_decode_kernel[grid](
        q.contiguous(), pool, decode_tables(q.device), window_pages.contiguous(), window_first.contiguous(),
        window_count.contiguous(), entry_pages.contiguous(), entry_index.contiguous(), sinks.contiguous(), out,
        heads, window_pages.shape[1], entry_pages.shape[1], slots, pool.stride(0), scale,
        NOPE=layout.nope_dim, D=dim, TILE=layout.tile, PAGE=layout.block_size, TOKEN_BYTES=layout.token_data_bytes,
        SCALES_OFFSET=layout.scales_offset, SCALE_SLOT=SCALE_SLOT_BYTES,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=8 if block_d >= 256 else 4,
    )
    return out
