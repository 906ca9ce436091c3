"""V4CausalLM: DeepSeek-V4's decoder (docs/v4-model-spec.md, section 4): the embedding copied to hc_mult
residual streams; per layer, an mHC collapse -> RMSNorm -> attention -> mHC expand, then the same around the
MoE block; a final mHC collapse, RMSNorm and the (untied) LM head. Parameter names are the checkpoint's
(transformers' `DeepseekV4ForCausalLM` state_dict); multi-token-prediction weights (`mtp.*`) are not built."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engram_kernels.mla_decode.model1_layout import Model1CacheLayout
from model_worker.layers.engram import EngramModule
from model_worker.layers.mhc import HyperConnection, HyperHead, expand_to_streams
from model_worker.v4.attention import AttentionState, V4Attention
from model_worker.v4.compressor import CompressorState
from model_worker.v4.config import V4Config
from model_worker.v4.kv_rows import FloatRows, Model1Rows
from model_worker.v4.moe import V4MoE
from model_worker.v4.norm import V4RMSNorm as RMSNorm
from model_worker.v4.page_pool import Model1PagePool
from model_worker.v4.rope import V4Rope


class V4DecoderLayer(nn.Module):
    def __init__(self, config: V4Config, layer_id: int):
        super().__init__()
        hc = dict(hc_mult=config.hc_mult, sinkhorn_iters=config.hc_sinkhorn_iters, hc_eps=config.hc_eps,
                  norm_eps=config.rms_norm_eps)
        self.attn_hc = HyperConnection(config.hidden_size, **hc)
        self.ffn_hc = HyperConnection(config.hidden_size, **hc)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = V4Attention(config, config.layer_types[layer_id])
        self.mlp = V4MoE(config, hashed=config.mlp_layer_types[layer_id] == "hash_moe")
        self.engram = EngramModule(config.hidden_size, config.hc_mult, config.engram_hash_cols, config.engram_head_dim,
                                   config.rms_norm_eps) if layer_id in config.engram_layer_ids else None

    def forward(self, streams: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                ropes: dict, state: AttentionState, engram_rows: torch.Tensor | None = None) -> torch.Tensor:
        """streams [B, S, n, H] -> [B, S, n, H]; engram_rows [B, S, cols * head_dim] on an Engram layer (V4.1:
        the memory read is mixed into the streams before the layer)."""
        if self.engram is not None:
            streams = self.engram(streams, engram_rows.to(streams.dtype))
        collapsed, post, comb = self.attn_hc(streams)
        out = self.self_attn(self.input_layernorm(collapsed), positions, ropes, state)
        streams = self.attn_hc.expand(out, streams, post, comb)
        collapsed, post, comb = self.ffn_hc(streams)
        out = self.mlp(self.post_attention_layernorm(collapsed), token_ids)
        return self.ffn_hc.expand(out, streams, post, comb)


class V4Backbone(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(V4DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hc_head = HyperHead(config.hidden_size, config.hc_mult, config.hc_eps, config.rms_norm_eps)
        if config.uses_engram:  # raw token id -> compressed id (MODEL_SPEC's Engram token map), from the checkpoint
            self.register_buffer("engram_token_map", torch.zeros(config.vocab_size, dtype=torch.int64))


# fp32 whatever the model's dtype, as transformers keeps them (docs/v4-model-spec.md, section 7)
_FP32_PARTS = ("attn_hc.", "ffn_hc.", "hc_head.", ".sinks", ".position_bias", "e_score_correction_bias",
               "q_a_norm.", "kv_norm.", "input_layernorm.", "post_attention_layernorm.", "model.norm.")


class V4CausalLM(nn.Module):
    def __init__(self, config: V4Config):
        super().__init__()
        self.config = config
        self.model = V4Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._ropes = {"main": V4Rope(config, "main"), "compress": V4Rope(config, "compress")}
        self.engram_tables = None  # an EngramTableClient (in-process tables or the memory service)
        self._engram_hasher = None

    def attach_engram_tables(self, tables) -> None:
        """Use these tables for the Engram layers' lookups (`InProcessEngramTables` or a remote client)."""
        from model_worker.engram_hashing import hasher_for

        self._engram_hasher = hasher_for(self.config, self.model.engram_token_map)
        self.engram_tables = tables

    def _engram_rows(self, compressed: torch.Tensor, valid: torch.Tensor, keep: int) -> dict[int, torch.Tensor]:
        """{layer: rows [B, keep, cols * head_dim]} of the last `keep` positions of compressed ids [B, T] (the
        earlier ones: the n-gram history before them, valid bool [B, T])."""
        if not self.config.uses_engram:
            return {}
        from model_worker.engram_hashing import lookup_rows

        rows = lookup_rows(self._engram_hasher, self.engram_tables, self.config.engram_layer_ids, compressed, valid)
        return {layer: found[:, -keep:] for layer, found in rows.items()}

    def keep_fp32_names(self) -> set[str]:
        """Parameter and buffer names kept in fp32 when the rest of the model is cast (the loader asks)."""
        names = [name for name, _ in self.named_parameters()] + [name for name, _ in self.named_buffers()]
        return {name for name in names if any(part in name for part in _FP32_PARTS)}

    def new_state(self, fp8: Model1CacheLayout | Model1PagePool | None = None) -> V4State:
        """An empty decoding state: pass it to `forward` with a sequence's first tokens, then with each next chunk.
        fp8: keep the window keys and the compressed entries as MODEL1 FP8 rows, in pages of this pool (shared
        with other states) or, given a layout (`kv_rows.model1_layout`), of a pool of the state's own; None
        keeps them in the model's dtype (lossless)."""
        pool = Model1PagePool(fp8, device=self.lm_head.weight.device) if isinstance(fp8, Model1CacheLayout) else fp8

        def rows():
            return FloatRows() if pool is None else Model1Rows(pool)

        return V4State([AttentionState(rows(), CompressorState(rows())) for _ in self.model.layers])

    def forward(self, input_ids: torch.Tensor, state: V4State | None = None) -> torch.Tensor:
        """input_ids int [B, n] -> logits fp32 [B, n, vocab]. Without `state`: a whole sequence from position 0.
        With one: the n tokens that follow what it holds (a prefill chunk or a decode step; state is updated).
        The B rows of a state are sequences at the same position."""
        state = state if state is not None else self.new_state()
        B, n = input_ids.shape
        positions = torch.arange(state.length, state.length + n, device=input_ids.device)
        ropes = {kind: (rope, rope.tables(positions)) for kind, rope in self._ropes.items()}
        engram = {}
        if self.config.uses_engram:
            ids = self.model.engram_token_map[input_ids]
            ids = ids if state.history is None else torch.cat((state.history, ids), dim=1)
            engram = self._engram_rows(ids, torch.ones_like(ids, dtype=torch.bool), n)
            state.history = ids[:, -(self.config.engram_max_ngram_size - 1):]
        streams = expand_to_streams(self.model.embed_tokens(input_ids), self.config.hc_mult)
        for i, (layer, layer_state) in enumerate(zip(self.model.layers, state.layers, strict=True)):
            streams = layer(streams, input_ids, positions, ropes, layer_state, engram.get(i))
        state.length += n
        return self.lm_head(self.model.norm(self.model.hc_head(streams))).float()


    def decode(self, token_ids: torch.Tensor, states: list[V4State]) -> torch.Tensor:
        """One decode step of B different sequences: token_ids int [B], each the next token of its own state
        (states may hold different lengths; each is updated) -> logits fp32 [B, vocab]. One forward for all."""
        positions = torch.tensor([state.length for state in states], device=token_ids.device)
        ropes = {kind: (rope, rope.tables(positions)) for kind, rope in self._ropes.items()}  # per row
        ids = token_ids[:, None]
        engram = self._engram_rows_of_rows(ids, states) if self.config.uses_engram else {}
        streams = expand_to_streams(self.model.embed_tokens(ids), self.config.hc_mult)
        for i, layer in enumerate(self.model.layers):
            groups = [(row, row + 1, state.layers[i]) for row, state in enumerate(states)]
            streams = layer(streams, ids, positions, ropes, groups, engram.get(i))
        for state in states:
            state.length += 1
        return self.lm_head(self.model.norm(self.model.hc_head(streams))).float()[:, 0]


    def _engram_rows_of_rows(self, ids: torch.Tensor, states: list[V4State]) -> dict[int, torch.Tensor]:
        """Engram rows of one new token per row (ids [B, 1]), each after its own n-gram history (histories of
        different lengths are left-padded and masked); updates the histories."""
        keep = self.config.engram_max_ngram_size - 1
        new = self.model.engram_token_map[ids]  # [B, 1]
        padded = torch.zeros(len(states), keep + 1, dtype=torch.int64, device=ids.device)
        valid = torch.zeros_like(padded, dtype=torch.bool)
        for row, state in enumerate(states):
            history = state.history[0] if state.history is not None else new.new_zeros(0)
            padded[row, keep - len(history): keep], valid[row, keep - len(history):] = history, True
            padded[row, keep] = new[row, 0]
            state.history = padded[row: row + 1, keep + 1 - min(keep, len(history) + 1):]
        return self._engram_rows(padded, valid, 1)


@dataclass
class V4State:
    """A decoding state: every layer's `AttentionState` and how many tokens it holds."""

    layers: list[AttentionState]
    length: int = 0
    history: torch.Tensor | None = None  # Engram models: the last max_ngram_size - 1 compressed ids [B, <= k]

    def copy(self) -> V4State:
        """An independent copy (a shared prefix continued two ways)."""
        return V4State([layer.copy() for layer in self.layers], self.length, self.history)

    def release(self) -> None:
        """Give the state's FP8 pages back to their pool (the state must not be used afterwards)."""
        for layer in self.layers:
            layer.keys.release()
            layer.compressor.entries.release()
