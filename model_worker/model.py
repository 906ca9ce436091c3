"""The transformer: DeepSeek-V2/V3 (MLA + MoE) and our Engram + mHC variant, for batched prefill.

Module names match Hugging Face checkpoints (`model.layers.{i}.self_attn.q_a_proj`, ...). Our
architecture adds, per layer, `attn_hc` / `ffn_hc` (mHC around each sublayer), `engram` on the layers in
`engram_layer_ids`, and `model.hc_head` (final stream collapse). Engram tables are not module
parameters: they are looked up through an `EngramTableClient` (`lookup(layer_id, hash_ids) -> rows`),
in-process here, served by the memory service elsewhere. The model computes all Engram hash ids from
the tokens before the first layer runs, so the lookups can be issued ahead of compute.

This module runs a whole sequence batch (prefill) and returns logits and the latent KV entries; paged
caching, decode and scheduling belong to the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from model_worker.config import ModelConfig
from model_worker.execution.linear_methods import REFERENCE, LinearMethod
from model_worker.layers.engram import EngramModule
from model_worker.layers.mhc import HyperConnection, HyperHead, expand_to_streams
from model_worker.layers.mla import MLA, LatentKV
from model_worker.layers.moe import MLP, MoE
from model_worker.layers.norm import RMSNorm
from model_worker.layers.rope import RotaryEmbedding


class EngramTableClient(Protocol):
    """Where Engram rows come from: in-process tables or the memory service."""

    def lookup(self, layer_id: int, hash_ids: torch.Tensor) -> torch.Tensor:
        """hash_ids int64 [...] -> rows [..., engram_head_dim] fp32."""
        ...


@dataclass
class PrefillOutput:
    """logits [B, T, vocab] fp32; kv: one LatentKV per layer (the entries the paged cache stores)."""

    logits: torch.Tensor
    kv: list[LatentKV]


class DecoderLayer(nn.Module):
    """Attention then feed-forward, each wrapped in a residual (plain or mHC); Engram first if present."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_id) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = self.ffn_hc = None
        if config.uses_mhc:
            hc_args = dict(hidden_size=config.hidden_size, hc_mult=config.hc_mult,
                           sinkhorn_iters=config.hc_sinkhorn_iters, hc_eps=config.hc_eps, norm_eps=config.rms_norm_eps)
            self.attn_hc = HyperConnection(**hc_args)
            self.ffn_hc = HyperConnection(**hc_args)
        self.engram = None
        if layer_id in config.engram_layer_ids:
            self.engram = EngramModule(config.hidden_size, config.hc_mult, config.engram_hash_cols,
                                       config.engram_head_dim, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor],
                engram_rows: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, T, D] (plain) or [B, T, n, D] (mHC); `attend` maps the normed sublayer input [B, T, D] to
        the attention output (whole-sequence prefill or paged, the caller decides); engram_rows
        [B, T, cols * head_dim] for Engram layers."""
        if self.engram is not None:
            streams = h if self.attn_hc is not None else h.unsqueeze(2)
            streams = self.engram(streams, engram_rows.to(h.dtype))
            h = streams if self.attn_hc is not None else streams.squeeze(2)
        if self.attn_hc is None:
            h = h + attend(self.input_layernorm(h))
            return h + self.mlp(self.post_attention_layernorm(h))
        collapsed, post, comb = self.attn_hc(h)
        h = self.attn_hc.expand(attend(self.input_layernorm(collapsed)), h, post, comb)
        collapsed, post, comb = self.ffn_hc(h)
        return self.ffn_hc.expand(self.mlp(self.post_attention_layernorm(collapsed)), h, post, comb)


class Backbone(nn.Module):
    """Embedding, decoder layers, final collapse and norm (the `model.` prefix of checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.hc_head = HyperHead(config.hidden_size, config.hc_mult, config.hc_eps, config.rms_norm_eps) \
            if config.uses_mhc else None
        if config.uses_engram:
            # Raw token id -> compressed id (the tokenizer's Engram token map); saved with the weights.
            self.register_buffer("engram_token_map", torch.zeros(config.vocab_size, dtype=torch.int64))


class CausalLM(nn.Module):
    """`model_worker.load_model` returns this. Call it with input_ids [B, T] and an optional
    attention_mask [B, T] (1 = token, 0 = padding, either side) to get logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head_method: LinearMethod = REFERENCE  # chosen at load (`arrange_weights`)
        self.engram_tables: EngramTableClient | None = None
        self._engram_hasher = None

    # ---- settings --------------------------------------------------------------------------------
    def set_absorbed_attention(self, enabled: bool) -> None:
        """Run prefill attention in absorbed (latent-space) form instead of expanding kv_b."""
        for layer in self.model.layers:
            layer.self_attn.absorbed = enabled

    def set_latent_rounding(self, dtype: torch.dtype | None) -> None:
        """Round each layer's cache entries (latent, k_rope) through dtype, as a cache of that dtype stores
        them: full-recompute references then match a cached engine exactly."""
        for layer in self.model.layers:
            layer.self_attn.latent_dtype = dtype

    def keep_fp32_names(self) -> set[str]:
        """Parameters that stay fp32 whatever the model dtype (router and mHC weights, as upstream)."""
        keep = set()
        for name, _ in self.named_parameters():
            if ".mlp.gate." in name or "_hc." in name or ".hc_head." in name:
                keep.add(name)
        for name, _ in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                keep.add(name)
        return keep

    def cast(self, dtype: torch.dtype, arrange: bool = True) -> CausalLM:
        """Convert floating weights to dtype, leaving keep_fp32_names() in fp32 (and FP8 weights as FP8), then
        `arrange_weights` unless arrange=False (a caller that moves the model first arranges it there)."""
        keep = self.keep_fp32_names()
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if name in keep or not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
                continue
            tensor.data = tensor.data.to(dtype)
        return self.arrange_weights() if arrange else self

    def arrange_weights(self, pack: bool = True) -> CausalLM:
        """Choose each layer's method for this host and prepare its weights once (fusions, packed copies;
        values and `state_dict()` unchanged): `model_worker.execution.prepare.arrange_weights`."""
        from model_worker.execution.prepare import arrange_weights

        return arrange_weights(self, pack=pack)

    def decode_gemm_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(name, weight [out, in]) of every float product a decode step runs as a GEMM
        (`model_worker.execution.prepare.decode_gemm_weights`)."""
        from model_worker.execution.prepare import decode_gemm_weights

        return decode_gemm_weights(self)

    def attach_engram_tables(self, tables: EngramTableClient) -> None:
        """Use these tables for Engram lookups (in-process tables or a remote client)."""
        from model_worker.engram_hashing import hasher_for

        self._engram_hasher = hasher_for(self.config, self.model.engram_token_map)
        self.engram_tables = tables

    @property
    def engram_hasher(self):
        return self._engram_hasher

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] fp32."""
        return self.prefill(input_ids, attention_mask).logits

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> PrefillOutput:
        """Run whole sequences. Positions count only real tokens, so left and right padding both work.
        input_ids [B, T]; attention_mask [B, T] (1 = token); positions [B, T] to override."""
        self._check_inputs(input_ids, attention_mask)
        B, T = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        engram_rows = self._engram_rows(input_ids, valid)  # issued before any layer runs
        body = self.model
        h = self.embed(input_ids)
        mask = self._attention_mask(valid)
        cos, sin = body.rotary_emb.cos_sin(positions)
        kv_entries: list[LatentKV] = []

        def attend(layer: DecoderLayer) -> Callable[[torch.Tensor], torch.Tensor]:
            def run(x: torch.Tensor) -> torch.Tensor:
                out, kv = layer.self_attn(x, body.rotary_emb, cos, sin, mask)
                kv_entries.append(kv)
                return out

            return run

        for layer in body.layers:
            h = layer(h, attend(layer), engram_rows.get(layer.layer_id))
        return PrefillOutput(logits=self.head(h), kv=kv_entries)

    @torch.inference_mode()
    def forward_step(self, input_ids: torch.Tensor, positions: torch.Tensor, paged_for_layer: Callable[[int], object],
                     engram_rows: Callable[[int], torch.Tensor], logits_index: torch.Tensor) -> torch.Tensor:
        """One engine step over a flat token batch of several sequences.
        input_ids, positions [N]; paged_for_layer(layer_id) -> that layer's PagedAttention;
        engram_rows(layer_id) -> [N, cols * head_dim]; logits_index [S] -> logits [S, vocab] fp32."""
        body = self.model
        h = self.embed(input_ids[None])
        cos, sin = body.rotary_emb.cos_sin(positions[None])
        for layer in body.layers:
            paged = paged_for_layer(layer.layer_id)
            rows = engram_rows(layer.layer_id)[None] if layer.engram is not None else None
            h = layer(h, lambda x, mla=layer.self_attn, paged=paged: mla.forward_paged(x, body.rotary_emb, cos, sin,
                                                                                      paged), rows)
        return self.head(h[:, logits_index])[0]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final residual (streams collapsed under mHC) -> logits fp32 [..., vocab]."""
        if self.model.hc_head is not None:
            h = self.model.hc_head(h)
        return self.head_method.apply(self.lm_head, self.model.norm(h)).float()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> the initial residual: [B, T, D], or [B, T, n, D] copied to the mHC streams."""
        h = self.model.embed_tokens(input_ids)
        return expand_to_streams(h, self.config.hc_mult) if self.config.uses_mhc else h

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids: expected an integer tensor [B, T], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids: token ids must be in [0, {self.config.vocab_size})")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids "
                             f"{tuple(input_ids.shape)}")

    @staticmethod
    def _attention_mask(valid: torch.Tensor) -> torch.Tensor:
        """Causal mask over real keys, [B, 1, T, T] bool. Padding queries see themselves (no NaN rows)."""
        T = valid.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
        mask = causal & valid[:, None, None, :]
        return mask | torch.eye(T, dtype=torch.bool, device=valid.device)

    def _engram_rows(self, input_ids: torch.Tensor, valid: torch.Tensor) -> dict[int, torch.Tensor]:
        """Engram rows per Engram layer: {layer: [B, T, cols * head_dim]}."""
        if not self.config.uses_engram:
            return {}
        from model_worker.engram_hashing import lookup_rows

        return lookup_rows(self._engram_hasher, self.engram_tables, self.config.engram_layer_ids,
                           self.model.engram_token_map[input_ids], valid)
