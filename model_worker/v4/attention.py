"""V4 attention (docs/v4-model-spec.md, 5.1): low-rank query with per-head RMSNorm; one shared KV head that
is both key and value; a causal sliding window over the sequence plus, in CSA/HCA layers, the compressed
entries (`compressor`), all in one softmax that also holds a per-head sink logit; the output rotated back
by its position and projected by G grouped low-rank maps then one dense one.

A call takes the layer input of n new tokens and the layer's `AttentionState` (the last W - 1 keys, the
compressors' states), so the same code runs a whole sequence (an empty state) or continues one: a prefill
chunk or a decode step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engram_kernels.v4_decode import sparse_decode_attention, sparse_decode_attention_paged
from model_worker.layers.linear import Linear
from model_worker.v4.compressor import Compressor, CompressorState, Indexer, visible
from model_worker.v4.config import CSA, SLIDING, V4Config
from model_worker.v4.kv_rows import FloatRows, Model1Rows
from model_worker.v4.norm import V4RMSNorm as RMSNorm


@dataclass
class AttentionState:
    """One layer's memory of a sequence: the sliding window's last keys ([B, <= W-1, D] rows, `kv_rows`) and
    the compressors' states (the attention's entries in the same kind of rows; the indexer's keys as floats)."""

    keys: FloatRows | Model1Rows = field(default_factory=FloatRows)
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)

    def copy(self) -> AttentionState:
        return AttentionState(self.keys.copy(), self.compressor.copy(), self.indexer.copy())


class V4Attention(nn.Module):
    def __init__(self, config: V4Config, layer_type: str):
        super().__init__()
        H, heads, D = config.hidden_size, config.num_attention_heads, config.head_dim
        self.layer_type, self.heads, self.head_dim = layer_type, heads, D
        self.window, self.eps = config.sliding_window, config.rms_norm_eps
        self.groups, self.rank = config.o_groups, config.o_lora_rank
        self.q_a_proj = Linear(H, config.q_lora_rank)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = Linear(config.q_lora_rank, heads * D)
        self.kv_proj = Linear(H, D)
        self.kv_norm = RMSNorm(D, config.rms_norm_eps)
        self.sinks = nn.Parameter(torch.zeros(heads))
        self.o_a_proj = Linear(heads * D // self.groups, self.groups * self.rank)  # G blocks of [R, nh*D/G]
        self.o_b_proj = Linear(self.groups * self.rank, H)
        self.compressor = None
        if layer_type != SLIDING:
            m = config.rate(layer_type)
            self.compressor = Compressor(H, D, m, overlap=layer_type == CSA, eps=config.rms_norm_eps)
            if layer_type == CSA:
                self.compressor.indexer = Indexer(H, config.q_lora_rank, config.index_n_heads, config.index_head_dim,
                                                  m, config.index_topk, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict,
                state: AttentionState | list[tuple[int, int, AttentionState]]) -> torch.Tensor:
        """x [B, n, H] (the normed collapsed stream) -> [B, n, H]; `state` is updated. Either the B rows are
        sequences at the same positions int [n] (consecutive, following what `state` holds), or `state` lists
        (first row, end row, AttentionState) groups of one decode token each at positions int [B] (`decode`).
        ropes: {"main" | "compress": (V4Rope, its tables at positions)}."""
        B, n, _ = x.shape
        rope, tables = ropes["main" if self.compressor is None else "compress"]
        if isinstance(state, list):
            return self.decode(x, positions, rope, tables, state)
        if n == 1:
            rows = tuple(t.expand(B, -1) for t in tables)
            return self.decode(x, positions.expand(B), rope, rows, [(0, B, state)])
        end = int(positions[-1]) + 1
        q_low = self.q_a_norm(self.q_a_proj(x))  # [B, n, rq]
        q = self.q_b_proj(q_low).view(B, n, self.heads, self.head_dim).transpose(1, 2)  # [B, h, n, D]
        q = rope.rotate(F.rms_norm(q.float(), (self.head_dim,), eps=self.eps).to(q.dtype), *tables)
        kv = rope.rotate(self.kv_norm(self.kv_proj(x)), *tables)  # [B, n, D]: key and value
        state.keys.append(kv)  # stored first, so the new keys are read back as the cache holds them
        keys = state.keys.rows(kv)  # [B, len, D]: positions end - len .. end - 1
        state.keys.keep_last(self.window - 1)
        gap = positions[:, None] - torch.arange(end - keys.shape[1], end, device=x.device)[None, :]  # [n, S]
        bias = torch.zeros(B, n, keys.shape[1], dtype=torch.float32, device=x.device).masked_fill(
            (gap < 0) | (gap >= self.window), torch.finfo(torch.float32).min)
        if self.compressor is not None:
            entries = self.compressor.extend(x, end, state.compressor, rope)  # [B, T, D]
            seen = visible(entries.shape[1], self.compressor.m, positions)  # [n, T]
            if self.layer_type == CSA:
                seen = self.compressor.indexer.select(x, q_low, end, state.indexer, rope, tables, seen)
            entry_bias = torch.zeros(seen.shape, dtype=torch.float32, device=x.device).masked_fill(~seen, float("-inf"))
            keys = torch.cat((keys, entries), dim=1)
            bias = torch.cat((bias, entry_bias.expand(B, n, -1)), dim=-1)
        logits = (q @ keys[:, None].transpose(-1, -2)) * self.head_dim ** -0.5 + bias[:, None].to(q.dtype)
        sinks = self.sinks.to(logits.dtype)[None, :, None, None].expand(B, -1, n, 1)
        probs = torch.softmax(torch.cat((logits, sinks), dim=-1), dim=-1)[..., :-1]  # [B, h, n, keys]
        out = rope.rotate(probs @ keys[:, None], *tables, inverse=True)  # [B, h, n, D]
        return self.o_b_proj(self._grouped_low_rank(out.transpose(1, 2).reshape(B, n, -1)))

    def decode(self, x: torch.Tensor, positions: torch.Tensor, rope, tables,
               groups: list[tuple[int, int, AttentionState]]) -> torch.Tensor:
        """One new token per row, x [B, 1, H] at positions int [B] with RoPE tables per row ([B, rd/2] each);
        groups: (first row, end row, the state those rows share), in row order, covering the batch. The rows'
        windows and selected entries go to the decode attention op in one call
        (`engram_kernels.v4_decode.sparse_decode_attention`, Triton on GPU), padded to the longest."""
        B = x.shape[0]
        cos, sin = tables
        heads_tables = (cos[:, None, None], sin[:, None, None])  # against [B, h, 1, D]
        q_low = self.q_a_norm(self.q_a_proj(x))  # [B, 1, rq]
        q = self.q_b_proj(q_low).view(B, 1, self.heads, self.head_dim).transpose(1, 2)  # [B, h, 1, D]
        q = rope.rotate(F.rms_norm(q.float(), (self.head_dim,), eps=self.eps).to(q.dtype), *heads_tables)
        kv = rope.rotate(self.kv_norm(self.kv_proj(x)), cos[:, None], sin[:, None])  # [B, 1, D]
        picks = []
        for first, stop, state in groups:
            end = int(positions[first]) + 1
            state.keys.append(kv[first:stop])  # the window is trimmed after the attention has read it
            if self.compressor is None:
                continue
            self.compressor.update(x[first:stop], end, state.compressor, rope)
            if self.layer_type == CSA:
                picks.append(self.compressor.indexer.pick(x[first:stop], q_low[first:stop], end, state.indexer, rope,
                                                          tuple(t[first:stop] for t in heads_tables)))
            else:
                count = state.compressor.entries.count
                picks.append(torch.arange(count, device=x.device).expand(stop - first, -1))
        index = _padded(picks, torch.full((B, 0), -1, device=x.device))[0] if picks else \
            torch.zeros(B, 0, dtype=torch.int64, device=x.device)
        stores = [state.keys for _, _, state in groups]
        if all(isinstance(store, Model1Rows) and store.pool is stores[0].pool for store in stores):
            out = self._attend_pages(q[:, :, 0], groups, index)
        else:
            out = self._attend_rows(q[:, :, 0], kv, groups, index)
        for _, _, state in groups:
            state.keys.keep_last(self.window - 1)
        out = rope.rotate(out[:, :, None], *heads_tables, inverse=True)  # [B, h, 1, D]
        return self.o_b_proj(self._grouped_low_rank(out.transpose(1, 2).reshape(B, 1, -1)))

    def _attend_rows(self, q: torch.Tensor, kv: torch.Tensor, groups, index: torch.Tensor) -> torch.Tensor:
        """q [B, h, D] over the groups' windows and entries read back as rows, padded to the longest ->
        [B, h, D] (`engram_kernels.v4_decode.sparse_decode_attention`, Triton on GPU)."""
        sliding, counts = _padded([state.keys.rows(kv[first:stop]) for first, stop, state in groups], kv)
        entries = kv.new_zeros(q.shape[0], 0, self.head_dim)
        if self.compressor is not None:
            entries = _padded([state.compressor.entries.rows(kv[first:stop]) for first, stop, state in groups],
                              kv)[0]
        return sparse_decode_attention(q, sliding, counts, entries, index, self.sinks.float(), self.head_dim ** -0.5)

    def _attend_pages(self, q: torch.Tensor, groups, index: torch.Tensor) -> torch.Tensor:
        """q [B, h, D] over the groups' windows and entries where they lie, in MODEL1 FP8 pages of one pool ->
        [B, h, D] (`engram_kernels.v4_decode.sparse_decode_attention_paged`: the Triton kernel on GPU
        dequantizes each row as it reads it)."""
        keys = [state.keys for _, _, state in groups]
        pool = keys[0].pool
        device = q.device
        window = _padded([_page_ids(store, stop - first) for (first, stop, _), store in zip(groups, keys)],
                         torch.full((1, 0), -1))[0].to(device)
        first = torch.tensor([store.first for (a, b, _), store in zip(groups, keys) for _ in range(b - a)],
                             device=device)
        count = torch.tensor([store.count for (a, b, _), store in zip(groups, keys) for _ in range(b - a)],
                             device=device)
        entry_pages = torch.full((q.shape[0], 0), -1, dtype=torch.int64, device=device)
        if self.compressor is not None:
            entry_pages = _padded([_page_ids(state.compressor.entries, stop - first) for first, stop, state in groups],
                                  torch.full((1, 0), -1))[0].to(device)
        return sparse_decode_attention_paged(q, pool.pages, window, first, count, entry_pages, index,
                                             self.sinks.float(), self.head_dim ** -0.5, pool.layout)

    def _grouped_low_rank(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, S, nh*D] -> [B, S, G*R]: group g of the heads through o_a_proj's row block g."""
        B, S, _ = o.shape
        blocks = self.o_a_proj.dense_weight(o.dtype).view(self.groups, self.rank, -1)  # [G, R, nh*D/G]
        return torch.einsum("bsgi,gri->bsgr", o.view(B, S, self.groups, -1), blocks).reshape(B, S, -1)


def _padded(parts: list[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups' rows [g_i, c_i, ...] stacked in order into [B, max c_i, ...] (padding: `like`'s fill, 0 or -1 for
    indices) -> (that tensor, counts int64 [B]: each row's c_i)."""
    longest = max(part.shape[1] for part in parts)
    fill = -1 if not like.is_floating_point() else 0
    out = torch.full((sum(p.shape[0] for p in parts), longest, *parts[0].shape[2:]), fill,
                     dtype=parts[0].dtype, device=parts[0].device)
    counts, row = [], 0
    for part in parts:
        out[row: row + part.shape[0], : part.shape[1]] = part
        counts += [part.shape[1]] * part.shape[0]
        row += part.shape[0]
    return out, torch.tensor(counts, dtype=torch.int64, device=out.device)


def _page_ids(store: Model1Rows, rows: int) -> torch.Tensor:
    """A store's page ids [rows, P] (P = 0 when it holds nothing yet)."""
    return store.ids if store.ids is not None else torch.zeros(rows, 0, dtype=torch.int64)
