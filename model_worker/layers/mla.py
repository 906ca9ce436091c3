"""Multi-head latent attention (DeepSeek-V2/V3) for prefill, in naive and absorbed form.

Per token the layer keeps one compressed entry: the RMS-normalised latent c_kv [kv_lora_rank] and the
rotated shared key k_rope [qk_rope_head_dim] (576 values for V3). The naive path expands the latent to
per-head keys/values with kv_b; the absorbed path folds kv_b's key part into the query and its value
part after attention, so attention runs directly over the latents (what the decode kernel does). Both
compute the same function. Paged caching and decode live in the engine, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model_worker.config import ModelConfig
from model_worker.execution.fused import ConcatenatedWeight
from model_worker.layers.linear import Linear
from model_worker.layers.norm import RMSNorm
from model_worker.layers.rope import RotaryEmbedding, softmax_scale


class PagedAttention(Protocol):
    """One layer's view of the engine's paged latent cache for the current step (see engine/runner)."""

    def write(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store the step's new entries: latent [N, r], k_rope [N, rope]."""
        ...

    def attend(self, q_lat: torch.Tensor, q_rope: torch.Tensor, scale: float) -> torch.Tensor:
        """q_lat [N, H, r], q_rope [N, H, rope] -> o_lat [N, H, r] fp32 over each token's causal context."""
        ...


@dataclass
class LatentKV:
    """The per-layer cache entries of a prefill: latent [B, T, kv_lora_rank], k_rope [B, T, rope_dim]."""

    latent: torch.Tensor
    k_rope: torch.Tensor


class MLA(nn.Module):
    """Multi-head latent attention; module names match HF checkpoints (`self_attn.*`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_dim = config.qk_head_dim
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, self.n_heads * qk_dim)
        else:
            self.q_a_proj = Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, self.n_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, config.hidden_size, bias=bias)
        # q_a and kv_a both read the layer input: one GEMM when their weights can be fused.
        self._q_a_kv_a = ConcatenatedWeight(self.q_a_proj, self.kv_a_proj_with_mqa) \
            if config.q_lora_rank is not None else None
        self.scale = softmax_scale(config)
        self.absorbed = False  # a setting: prefill through the absorbed path
        self.latent_dtype: torch.dtype | None = None  # a setting: round cache entries as a cache would store them
        self._kv_b_split: dict = {}  # dtype or None -> (weight storage key, (w_uk, w_uv)), see kv_b_weights

    def _project(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, LatentKV]:
        """x [B, T, D] -> (q [B, T, H, nope + rope] before rotation, the tokens' cache entries)."""
        if self._q_a_kv_a is not None:
            q_a, kv_a = self._q_a_kv_a(x)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            q, kv_a = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_layernorm(latent), rope.rotate(k_rope, cos, sin)
        if self.latent_dtype is not None:
            latent = latent.to(self.latent_dtype).to(latent.dtype)
            k_rope = k_rope.to(self.latent_dtype).to(k_rope.dtype)
        return q.view(*x.shape[:2], self.n_heads, self.nope_dim + self.rope_dim), LatentKV(latent, k_rope)

    def kv_b_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b split per head: w_uk [H, nope, r] (latent -> k_nope), w_uv [H, v, r] (latent -> v).
        Views of a float kv_b; an FP8 one is dequantized once and kept (it is read every step). With `dtype`,
        the split converted to it, kept too (bf16 decode reads it in fp32 every layer of every step). Cached
        per weight storage and version, so a cast, a new weight or an in-place update is picked up and an
        unchanged one costs one lookup."""
        kv_b = self.kv_b_proj
        weight, scale = kv_b._parameters["weight"], kv_b._parameters["weight_scale_inv"]
        key = (weight.data_ptr(), weight.dtype, None if scale is None else scale.data_ptr(),
               0 if weight.is_inference() else weight._version)
        cached = self._kv_b_split.get(dtype)
        if cached is not None and cached[0] == key:
            return cached[1]
        if dtype is None:
            dense = kv_b.dense_weight().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            split = (dense[:, : self.nope_dim], dense[:, self.nope_dim :])
        else:
            split = tuple(part if part.dtype == dtype else part.to(dtype) for part in self.kv_b_weights())
        self._kv_b_split[dtype] = (key, split)
        return split

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, LatentKV]:
        """x [B, T, D]; cos/sin [B, T, rope/2]; mask bool [B, 1, T, T] (True = may attend).
        Returns the attention output [B, T, D] and this layer's latent KV entries."""
        q, kv = self._project(x, rope, cos, sin)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = rope.rotate(q_rope, cos, sin)  # [B, T, H, rope]
        if self.absorbed:
            out = self._attend_absorbed(q_nope, q_rope, kv, mask)
        else:
            out = self._attend_naive(q_nope, q_rope, kv, mask)
        return self.o_proj(out.flatten(2)), kv

    def forward_paged(self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor,
                      paged: PagedAttention) -> torch.Tensor:
        """Flat step batch x [1, N, D] (tokens of several sequences); the new latents go into the paged
        cache, then attention runs over each sequence's cached context in absorbed form. -> [1, N, D]."""
        q, kv = self._project(x, rope, cos, sin)
        q_nope, q_rope = q[0].split([self.nope_dim, self.rope_dim], dim=-1)  # [N, H, nope], [N, H, rope]
        q_rope = _fp32(rope.rotate(q_rope, cos[0], sin[0]))
        paged.write(kv.latent[0], kv.k_rope[0])
        w_uk, w_uv = self.kv_b_weights(torch.float32)
        q_lat = torch.bmm(_fp32(q_nope).transpose(0, 1), w_uk).transpose(0, 1)  # [N, H, r]
        o_lat = paged.attend(q_lat, q_rope, self.scale)  # [N, H, r] fp32
        out = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [N, H, v]
        out = out.reshape(out.shape[0], -1)
        return self.o_proj(out if out.dtype == x.dtype else out.to(x.dtype))[None]

    def _attend_naive(self, q_nope, q_rope, kv: LatentKV, mask) -> torch.Tensor:
        """Expand the latent to per-head k_nope and v, then standard attention. -> [B, T, H, v]."""
        B, S = kv.latent.shape[:2]
        k_nope, v = self.kv_b_proj(kv.latent).view(B, S, self.n_heads, -1).split([self.nope_dim, self.v_dim], -1)
        k_rope = kv.k_rope.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k = torch.cat((k_nope, k_rope), dim=-1).transpose(1, 2)  # [B, H, S, qk]
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2)

    def _attend_absorbed(self, q_nope, q_rope, kv: LatentKV, mask) -> torch.Tensor:
        """Attention over latents: q_lat = q_nope . W_UK; score = q_lat . c + q_rope . k_rope. -> [B, T, H, v]."""
        w_uk, w_uv = self.kv_b_weights()
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk.to(q_nope.dtype))  # [B, T, H, r]
        scores = torch.einsum("bthr,bsr->bhts", q_lat, kv.latent)
        scores = scores + torch.einsum("bthe,bse->bhts", q_rope, kv.k_rope)
        scores = (scores.float() * self.scale).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.latent.dtype)
        o_lat = torch.einsum("bhts,bsr->bthr", probs, kv.latent)  # [B, T, H, r]
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv.to(o_lat.dtype))


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """t as float32, without a dispatch when it already is (decode calls this per layer per step)."""
    return t if t.dtype == torch.float32 else t.float()
