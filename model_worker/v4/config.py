"""V4Config: the fields of a DeepSeek-V4 config.json that the forward pass uses, with transformers'
defaults and derived values (docs/v4-model-spec.md, section 1). Unknown fields are ignored; values that the
model cannot run are refused with a ConfigError naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model_worker.errors import ConfigError

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_TYPES = ("hash_moe", "moe")
_LEGACY_RATIOS = {0: SLIDING, 4: CSA, 128: HCA}


@dataclass
class V4Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    compress_rope: dict = field(default_factory=lambda: {"rope_type": "default"})  # YaRN fields when "yarn"
    max_position_embeddings: int = 1048576
    layer_types: list[str] = field(default_factory=list)
    compress_rates: dict[str, int] = field(default_factory=lambda: {CSA: 4, HCA: 128})
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    mlp_layer_types: list[str] = field(default_factory=list)
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # V4.1 Engram (empty engram_layer_ids: none); the same fields and semantics as our engram_mhc models
    engram_layer_ids: list[int] = field(default_factory=list)
    engram_max_ngram_size: int = 4
    engram_n_heads: int = 8
    engram_head_dim: int = 256
    engram_vocab_size: int = 16_000_000
    engram_num_embeddings: int = 0  # compressed tokenizer vocabulary (ids after the Engram token map)
    engram_pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "deepseek_v4"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> V4Config:
        """From a config.json dict (`model_type` must be deepseek_v4)."""
        if raw.get("model_type") != "deepseek_v4":
            raise ConfigError(f"model_type: expected 'deepseek_v4', got {raw.get('model_type')!r}")
        known = {f for f in cls.__dataclass_fields__} - {"layer_types", "mlp_layer_types", "compress_rates",
                                                         "compress_rope", "qk_rope_head_dim"}
        cfg = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        cfg.engram_layer_ids = list(cfg.engram_layer_ids)
        head_dim = cfg.head_dim
        if raw.get("partial_rotary_factor") is not None:
            cfg.qk_rope_head_dim = int(head_dim * raw["partial_rotary_factor"])
        elif raw.get("qk_rope_head_dim") is not None:
            cfg.qk_rope_head_dim = int(raw["qk_rope_head_dim"])
        rates = dict(cfg.compress_rates)
        rates.update(raw.get("compress_rates") or {})
        for key, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
            if raw.get(key) is not None:
                rates[kind] = int(raw[key])
        cfg.compress_rates = rates
        cfg.layer_types = _layer_types(raw, cfg.num_hidden_layers)
        cfg.mlp_layer_types = list(raw.get("mlp_layer_types") or
                                   ["hash_moe" if i < raw.get("num_hash_layers", 3) else "moe"
                                    for i in range(cfg.num_hidden_layers)])[: cfg.num_hidden_layers]
        cfg.compress_rope = _compress_rope(raw.get("rope_parameters") or raw.get("rope_scaling"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ConfigError(f"layer_types: {self.num_hidden_layers} of {LAYER_TYPES}, got {self.layer_types}")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - set(MLP_TYPES):
            raise ConfigError(f"mlp_layer_types: {self.num_hidden_layers} of {MLP_TYPES}, got {self.mlp_layer_types}")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid"):
            raise ConfigError(f"scoring_func: 'sqrtsoftplus' or 'sigmoid', got {self.scoring_func!r}")
        if not 0 < self.qk_rope_head_dim <= min(self.head_dim, self.index_head_dim) or self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim: an even number up to head_dim and index_head_dim, "
                              f"got {self.qk_rope_head_dim}")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"o_groups: must divide num_attention_heads * head_dim, got {self.o_groups}")
        if any(int(self.compress_rates.get(kind, 0)) < 1 for kind in (CSA, HCA) if kind in self.layer_types):
            raise ConfigError(f"compress_rates: a positive window per compressed layer type, got {self.compress_rates}")
        if self.sliding_window < 1 or self.hc_mult < 1 or self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("sliding_window and hc_mult must be >= 1, num_experts_per_tok <= n_routed_experts")
        self._validate_engram()

    @property
    def uses_engram(self) -> bool:
        return bool(self.engram_layer_ids)

    @property
    def engram_hash_cols(self) -> int:
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    def _validate_engram(self) -> None:
        ids = self.engram_layer_ids
        if not ids:
            return
        if len(set(ids)) != len(ids) or any(not 0 <= i < self.num_hidden_layers for i in ids):
            raise ConfigError(f"engram_layer_ids: distinct layer indices in 0..{self.num_hidden_layers - 1}, got {ids}")
        if self.engram_max_ngram_size < 2:
            raise ConfigError(f"engram_max_ngram_size: must be >= 2, got {self.engram_max_ngram_size}")
        for name in ("engram_n_heads", "engram_head_dim", "engram_vocab_size", "engram_num_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 for an Engram model, got {getattr(self, name)}")

    def rate(self, layer_type: str) -> int:
        """The compression window m of a compressed layer type."""
        return int(self.compress_rates[layer_type])


def _layer_types(raw: dict, layers: int) -> list[str]:
    """Explicit layer_types; else legacy per-layer compress_ratios; else transformers' default schedule
    (layers 0 and 1 HCA, then odd CSA and even HCA: no sliding-only layer)."""
    if raw.get("layer_types"):
        return list(raw["layer_types"])[:layers]
    if raw.get("compress_ratios"):
        try:
            return [_LEGACY_RATIOS[int(r)] for r in raw["compress_ratios"]][:layers]
        except KeyError as unknown:
            raise ConfigError(f"compress_ratios: each of 0, 4, 128, got {unknown}") from None
    return [HCA if i < 2 or i % 2 == 0 else CSA for i in range(layers)]


def _compress_rope(params: dict | None) -> dict:
    """The compress RoPE's settings: a flat rope_parameters dict, or its 'compress' part when nested."""
    if not params:
        return {"rope_type": "default"}
    if "compress" in params and isinstance(params["compress"], dict):
        params = params["compress"]
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    if params["rope_type"] not in ("default", "yarn"):
        raise ConfigError(f"rope_parameters.rope_type: 'default' or 'yarn', got {params['rope_type']!r}")
    return params
