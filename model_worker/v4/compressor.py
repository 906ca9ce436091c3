"""Compressed entries of V4's CSA and HCA layers, and CSA's lightning indexer (docs/v4-model-spec.md, 5.2-5.4).

A compressor pools each complete window of m tokens into one entry: per channel, a softmax over the window's
slots of (gate + position bias) weights the slots' values. HCA's windows do not overlap; CSA's entry w pools
2m slots, the previous window's tokens through the first half of the projections' channels and its own
window's tokens through the second half. The entry is then normed and rotated by the compress RoPE at
position w*m. A query at t sees entry w once its window has closed: w < floor((t + 1) / m).

Decoding carries a `CompressorState` per layer between calls: the entries so far and the raw projections
of the tokens whose windows are still open (for CSA also the last closed window, whose first half feeds the
next entry), so a chunk of new tokens only pools the windows it closes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from engram_kernels.v4_decode import indexer_topk
from model_worker.layers.linear import Linear
from model_worker.v4.kv_rows import FloatRows, Model1Rows
from model_worker.v4.norm import V4RMSNorm as RMSNorm


def pool_windows(values: torch.Tensor, gates: torch.Tensor, position_bias: torch.Tensor, m: int,
                 overlap: bool) -> torch.Tensor:
    """values, gates [B, S, C] (C = d, or 2d when overlapping), position_bias [m, C] -> entries [B, T, d] with
    T = floor(S / m) complete windows; the softmax over slots runs per channel, in fp32."""
    B, S, C = values.shape
    T = S // m
    v = values[:, : T * m].reshape(B, T, m, C).float()
    g = gates[:, : T * m].reshape(B, T, m, C).float() + position_bias.float()
    if overlap:
        d = C // 2
        previous_v, previous_g = torch.zeros_like(v[..., :d]), torch.full_like(g[..., :d], float("-inf"))
        previous_v[:, 1:], previous_g[:, 1:] = v[:, :-1, :, :d], g[:, :-1, :, :d]  # window w-1's first half
        v = torch.cat((previous_v, v[..., d:]), dim=2)  # [B, T, 2m, d]
        g = torch.cat((previous_g, g[..., d:]), dim=2)
    return (v * torch.softmax(g, dim=2)).sum(dim=2).to(values.dtype)


def visible(T: int, m: int, positions: torch.Tensor) -> torch.Tensor:
    """bool [S, T]: query at positions[s] sees entry w (its window has closed)."""
    return torch.arange(T, device=positions.device)[None, :] < ((positions + 1) // m)[:, None]


class Compressor(nn.Module):
    """Entries of width `width` from the layer input: kv_proj, gate_proj [C, H], position_bias [m, C] and
    kv_norm [width], with C = 2 * width when the windows overlap (CSA)."""

    def __init__(self, hidden: int, width: int, m: int, overlap: bool, eps: float):
        super().__init__()
        channels = 2 * width if overlap else width
        self.m, self.overlap = m, overlap
        self.kv_proj = Linear(hidden, channels)
        self.gate_proj = Linear(hidden, channels)
        self.position_bias = nn.Parameter(torch.zeros(m, channels))
        self.kv_norm = RMSNorm(width, eps)

    def extend(self, x: torch.Tensor, end: int, state: CompressorState, rope) -> torch.Tensor:
        """x [B, n, H]: the layer input of the tokens at positions end - n .. end - 1, following `state` (which
        holds everything before them and is updated) -> all entries so far, roped, [B, T, width] with
        T = end // m."""
        self.update(x, end, state, rope)
        return state.entries.rows(x.new_zeros(x.shape[0], 0, self.kv_norm.weight.shape[0]))

    def update(self, x: torch.Tensor, end: int, state: CompressorState, rope) -> None:
        """`extend` without reading the entries back (a paged decode reads them where they are stored)."""
        values, gates = self.kv_proj(x), self.gate_proj(x)  # [B, n, C]
        if state.values is not None:
            values, gates = torch.cat((state.values, values), dim=1), torch.cat((state.gates, gates), dim=1)
        done, total = state.entries.count, end // self.m
        if total > done:
            first = done - 1 if self.overlap and done > 0 else done  # CSA: re-read the window before
            span = slice(first * self.m - state.start, total * self.m - state.start)
            pooled = pool_windows(values[:, span], gates[:, span], self.position_bias, self.m, self.overlap)
            pooled = pooled[:, done - first:]  # [B, total - done, width]
            cos, sin = rope.tables(torch.arange(done, total, device=x.device) * self.m)
            state.entries.append(rope.rotate(self.kv_norm(pooled), cos, sin))
        keep = max(total - 1, 0) * self.m if self.overlap else total * self.m  # first position still needed
        state.values, state.gates = values[:, keep - state.start:], gates[:, keep - state.start:]
        state.start = keep


@dataclass
class CompressorState:
    """What a compressor keeps between calls: its entries so far ([B, T, width] rows, `kv_rows`), and the raw
    projections values/gates [B, L, C] of the tokens from position `start` on (a window boundary) not yet
    pooled."""

    entries: FloatRows | Model1Rows = field(default_factory=FloatRows)
    values: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    start: int = 0

    def copy(self) -> CompressorState:
        return dataclasses.replace(self, entries=self.entries.copy())


class Scorer(nn.Module):
    """The indexer's per-head weights from the layer input: weights_proj [hI, H]."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.weights_proj = Linear(hidden, heads)


class Indexer(Compressor):
    """CSA's lightning indexer: its own overlapping-window keys [dI] and queries from the attention's
    low-rank query (q_b_proj [hI * dI, rq], no norm); picks each query's top-k visible entries."""

    def __init__(self, hidden: int, q_rank: int, heads: int, head_dim: int, m: int, top_k: int, eps: float):
        super().__init__(hidden, head_dim, m, overlap=True, eps=eps)
        self.heads, self.head_dim, self.top_k = heads, head_dim, top_k
        self.q_b_proj = Linear(q_rank, heads * head_dim)
        self.scorer = Scorer(hidden, heads)

    def _score_inputs(self, x: torch.Tensor, q_low: torch.Tensor, end: int, state: CompressorState, rope,
                      query_tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [B, T, dI], queries [B, hI, n, dI], head weights [B, n, hI]), fp32; `state` is updated."""
        keys = self.extend(x, end, state, rope).float()
        B, n, _ = x.shape
        queries = self.q_b_proj(q_low).view(B, n, self.heads, self.head_dim).transpose(1, 2)
        queries = rope.rotate(queries, *query_tables).float()
        return keys, queries, self.scorer.weights_proj(x).float() * self.heads ** -0.5

    def select(self, x: torch.Tensor, q_low: torch.Tensor, end: int, state: CompressorState, rope, query_tables,
               seen: torch.Tensor) -> torch.Tensor:
        """x [B, n, H] and q_low [B, n, rq] (after q_a_norm) of the tokens ending at position `end`, seen bool
        [n, T] -> bool [B, n, T]: the entries each query attends to (its top-k by score among the visible
        ones). `state` holds the indexer's own keys (updated)."""
        keys, queries, weights = self._score_inputs(x, q_low, end, state, rope, query_tables)
        relu = torch.relu(queries @ keys[:, None].transpose(-1, -2)) * self.head_dim ** -0.5  # [B, hI, n, T]
        scores = torch.einsum("bhst,bsh->bst", relu, weights).masked_fill(~seen, float("-inf"))
        k = min(self.top_k, scores.shape[-1])
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)
        return chosen & seen

    def pick(self, x: torch.Tensor, q_low: torch.Tensor, end: int, state: CompressorState, rope,
             query_tables) -> torch.Tensor:
        """A decode step (one token per row, x [B, 1, H]): the top-k entries' indices [B, k'] (-1 = none), by
        the indexer decode op (`engram_kernels.v4_decode.indexer_topk`: Triton on GPU). Every entry that exists
        at a decode step is visible to it."""
        keys, queries, weights = self._score_inputs(x, q_low, end, state, rope, query_tables)
        count = torch.full((x.shape[0],), keys.shape[1], dtype=torch.int64, device=x.device)
        k = max(min(self.top_k, keys.shape[1]), 1)
        return indexer_topk(queries[:, :, 0], weights[:, 0], keys, count, k, self.head_dim ** -0.5)
