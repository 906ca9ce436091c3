"""A differentiable forward pass over a batch whose sequences share a prefix, computed once.

Every training example of one agent starts with the same long system text (instructions, reply
format, tool schemas: about 700 tokens), and only the rest differs (memories, task, steps: about 250).
Causal attention makes the prefix's hidden states the same in every sequence, so the batch runs as one
flat token list, prefix once then each suffix: per-token work (projections, MLP, mHC, Engram) is done
for P + B*S tokens instead of B*(P+S), and each suffix attends to the shared prefix keys and its own.
The result equals the model's own forward on each full sequence (`tests/model_worker/test_training.py`
checks the logits against `CausalLM.prefill`).

It deliberately does not: touch the model's parameters or modules (it calls their forward pieces), or
compute logits at positions nobody trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from model_worker.layers.mla import MLA
from model_worker.model import CausalLM


@dataclass
class PrefixBatch:
    """prefix [P] int64 shared by every sequence; suffixes [B, S] int64 right-padded; lengths [B] real suffix
    tokens; labels [B, S] int64: the next token to predict at each suffix position, -100 where none is."""

    prefix: torch.Tensor
    suffixes: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> PrefixBatch:
        return PrefixBatch(*(t.to(device, non_blocking=True) for t in (self.prefix, self.suffixes, self.lengths,
                                                                      self.labels)))

    @property
    def tokens(self) -> int:
        """Tokens the forward pass computes (prefix once, then the real suffix tokens)."""
        return int(self.prefix.numel() + self.lengths.sum())


def _attention_inputs(mla: MLA, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [..., S, r] and rotated k_rope [..., S, e] -> keys [..., S, H, nope + e], values [..., S, H, v]."""
    k_nope, v = mla.kv_b_proj(latent).unflatten(-1, (mla.n_heads, -1)).split([mla.nope_dim, mla.v_dim], -1)
    k_rope = k_rope.unsqueeze(-2).expand(*k_nope.shape[:-1], mla.rope_dim)
    return torch.cat((k_nope, k_rope), dim=-1), v


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention with the queries aligned to the last keys: q [B, T, H, d], k [B, S, H, d], v [B, S, H, v]
    (S >= T; query i sees keys up to S - T + i) -> [B, T, H, v]. A lower-right causal bias, not a mask tensor,
    lets torch run its fused kernel (about twice as fast in backward here)."""
    T, S = q.shape[1], k.shape[1]
    bias = causal_lower_right(T, S)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias, scale=scale)
    return out.transpose(1, 2)


class _SharedPrefixAttention:
    """The `attend` callback a DecoderLayer calls, for the flat [1, P + B*S] token layout."""

    def __init__(self, model: CausalLM, batch: PrefixBatch, cos: torch.Tensor, sin: torch.Tensor):
        self.rope = model.model.rotary_emb
        self.cos, self.sin = cos, sin
        P = batch.prefix.numel()
        B, S = batch.suffixes.shape
        self.P, self.B, self.S = P, B, S

    def __call__(self, mla: MLA, x: torch.Tensor) -> torch.Tensor:
        """x [1, P + B*S, D] (normed layer input) -> attention output [1, P + B*S, D]."""
        P, B, S = self.P, self.B, self.S
        q, kv = mla._project(x, self.rope, self.cos, self.sin)  # q [1, N, H, qk] before rotation
        q_nope, q_rope = q.split([mla.nope_dim, mla.rope_dim], dim=-1)
        q = torch.cat((q_nope, self.rope.rotate(q_rope, self.cos, self.sin)), dim=-1)[0]  # [N, H, qk]
        keys, values = _attention_inputs(mla, kv.latent[0], kv.k_rope[0])  # [N, H, qk], [N, H, v]
        prefix_out = _causal_sdpa(q[None, :P], keys[None, :P], values[None, :P], mla.scale)
        suffix_keys = torch.cat((keys[:P].expand(B, *keys[:P].shape), keys[P:].view(B, S, *keys.shape[1:])), 1)
        suffix_values = torch.cat((values[:P].expand(B, *values[:P].shape),
                                   values[P:].view(B, S, *values.shape[1:])), 1)
        # Suffixes are right-padded, so plain causality already keeps real queries off padding keys;
        # padding queries compute values nothing reads and nothing trains on.
        suffix_out = _causal_sdpa(q[P:].view(B, S, *q.shape[1:]), suffix_keys, suffix_values, mla.scale)
        out = torch.cat((prefix_out[0], suffix_out.flatten(0, 1)), dim=0)  # [N, H, v]
        return mla.o_proj(out.flatten(1)[None])


def _engram_rows(model: CausalLM, batch: PrefixBatch) -> dict[int, torch.Tensor]:
    """Engram rows per layer in the flat layout: hashed over each full sequence (an n-gram at a suffix
    start reaches into the prefix), the prefix's rows taken once. {layer: [1, P + B*S, cols * head_dim]}"""
    if not model.config.uses_engram:
        return {}
    P = batch.prefix.numel()
    B, S = batch.suffixes.shape
    device = batch.suffixes.device
    full = torch.cat((batch.prefix.expand(B, P), batch.suffixes), dim=1)  # [B, P+S]
    valid = torch.cat((torch.ones(B, P, dtype=torch.bool, device=device),
                       torch.arange(S, device=device)[None, :] < batch.lengths[:, None]), 1)
    compressed = model.model.engram_token_map[full]
    rows = {}
    for layer_id in model.config.engram_layer_ids:
        hash_ids = model.engram_hasher.hash(layer_id, compressed, valid)  # [B, P+S, cols]
        flat = torch.cat((hash_ids[0, :P], hash_ids[:, P:].flatten(0, 1)), dim=0)  # [P + B*S, cols]
        rows[layer_id] = model.engram_tables.lookup(layer_id, flat).flatten(-2)[None]
    return rows


def suffix_hidden(model: CausalLM, batch: PrefixBatch) -> torch.Tensor:
    """The final residual at every suffix position: [B, S, D] (plain) or [B, S, n, D] (mHC)."""
    P = batch.prefix.numel()
    B, S = batch.suffixes.shape
    body = model.model
    flat_ids = torch.cat((batch.prefix, batch.suffixes.flatten()))[None]  # [1, N]
    arange = torch.arange(max(P, S), device=batch.suffixes.device)
    positions = torch.cat((arange[:P], (P + arange[:S]).repeat(B)))[None]  # [1, N]
    cos, sin = body.rotary_emb.cos_sin(positions)
    attention = _SharedPrefixAttention(model, batch, cos, sin)
    engram_rows = _engram_rows(model, batch)
    h = model.embed(flat_ids)
    for layer in body.layers:
        h = layer(h, lambda x, mla=layer.self_attn: attention(mla, x), engram_rows.get(layer.layer_id))
    return h[0, P:].view(B, S, *h.shape[2:])


def batch_loss(model: CausalLM, batch: PrefixBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the labelled positions, hits [B, S] bool: greedy teacher-forced prediction
    right (True where unlabelled), labels [M] of the labelled positions). Logits are computed only where
    labels are."""
    h = suffix_hidden(model, batch)
    where = batch.labels >= 0  # [B, S]
    logits = model.head(h[where])  # [M, vocab]
    labels = batch.labels[where]
    loss = F.cross_entropy(logits, labels)
    hits = torch.ones_like(batch.labels, dtype=torch.bool)
    hits[where] = logits.argmax(-1) == labels
    return loss, hits, labels
