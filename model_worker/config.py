"""Model configuration: reads Hugging Face `config.json` for DeepSeek-V2/V3 and our Engram + mHC model.

One flat dataclass covers the three architectures:
- `deepseek_v2`: MLA + MoE with a softmax router (greedy or group-limited greedy top-k);
- `deepseek_v3`: MLA + MoE with a sigmoid router, correction bias and group-limited top-k;
- `engram_mhc` (ours): the DeepSeek-V3 backbone plus mHC residual streams (`hc_*` fields) and Engram
  layers (`engram_*` fields), as in the Engram paper's models.
It validates every field it reads and names the offending field in errors. It does not load weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_worker.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "engram_mhc")
ENGRAM_TABLE_DTYPES = ("fp8", "bfloat16", "float32")
FP8_SCALE_FMTS = ("fp32", "ue8m0")  # activation scales in the FP8 GEMM mode: plain fp32, or powers of two

# Fields that HF or DeepSeek config.json files carry but that do not change inference here.
IGNORED_FIELDS = frozenset({
    "architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "pretraining_tp", "output_router_logits",
    "num_nextn_predict_layers", "num_mtp_layers", "ep_size", "aux_loss_alpha", "seq_aux",
    "router_aux_loss_coef", "head_dim", "qk_head_dim", "num_key_value_heads",
    "hidden_act", "mlp_bias", "_name_or_path", "name_or_path", "return_dict", "id2label", "label2id",
    "is_encoder_decoder", "tie_encoder_decoder", "chunk_size_feed_forward", "output_attentions",
    "output_hidden_states", "problem_type",
})


@dataclass
class RopeScaling:
    """YaRN parameters (`rope_type: yarn`); `factor == 1` with no YaRN means plain RoPE."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """Every architectural fact the model needs; names follow HF/DeepSeek config.json."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE (n_routed_experts None or 0 = dense MLP in every layer)
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # norms, positions, embeddings
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # mHC (hc_mult == 1 means a plain residual stream)
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # Engram (empty engram_layer_ids means no Engram)
    engram_layer_ids: list[int] = field(default_factory=list)
    engram_max_ngram_size: int = 3
    engram_n_heads: int = 8
    engram_head_dim: int = 64
    engram_vocab_size: int = 1000
    engram_num_embeddings: int = 0  # compressed tokenizer vocabulary size (ids after the Engram token map)
    engram_pad_token_id: int = 0  # raw token id whose compressed id pads n-grams at sequence starts
    engram_table_dtype: str = "fp8"
    # FP8 checkpoints: the activation scale format of their FP8 GEMMs (`quantization_config.scale_fmt`)
    fp8_scale_fmt: str = "fp32"

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_mhc(self) -> bool:
        return self.hc_mult > 1

    @property
    def uses_engram(self) -> bool:
        return bool(self.engram_layer_ids)

    @property
    def router_kind(self) -> str:
        """'sigmoid' (V3: bias + group-limited top-k) or 'softmax' (V2)."""
        return "softmax" if self.model_type == "deepseek_v2" else "sigmoid"

    @property
    def engram_hash_cols(self) -> int:
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    def is_moe_layer(self, layer_id: int) -> bool:
        return bool(self.n_routed_experts) and layer_id >= self.first_k_dense_replace

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, strict: bool = True) -> ModelConfig:
        """Build and validate from a config.json dict; unknown fields raise when `strict`."""
        data = dict(raw)
        model_type = data.pop("model_type", None)
        if model_type == "deepseek_v4":
            raise ConfigError("model_type: 'deepseek_v4' checkpoints load with model_worker.v4.load_v4_model "
                              "(or ModelWorker.from_pretrained, which serves them), not load_model")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type: {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})")
        kwargs: dict[str, Any] = {"model_type": model_type}
        if model_type == "deepseek_v2":
            # V2 defaults differ from V3: softmax router, greedy top-k, no normalisation, no scaling.
            kwargs.update(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                          routed_scaling_factor=1.0, first_k_dense_replace=0, n_group=None, topk_group=None)
        quantization = data.pop("quantization_config", None) or {}
        if not isinstance(quantization, dict):
            raise ConfigError(f"quantization_config: must be an object, got {quantization!r}")
        if quantization.get("scale_fmt") is not None:
            kwargs["fp8_scale_fmt"] = quantization["scale_fmt"]
        freq = data.pop("moe_layer_freq", 1)
        if freq != 1:  # every layer from first_k_dense_replace on is MoE here; another spacing is not supported
            raise ConfigError(f"moe_layer_freq: only 1 (an MoE layer at every layer after first_k_dense_replace) "
                              f"is supported, got {freq!r}")
        kwargs.update(_rope_fields(data))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key not in IGNORED_FIELDS and strict:
                unknown.append(key)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path, *, strict: bool = True) -> ModelConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: top level must be a JSON object")
        return cls.from_dict(raw, strict=strict)

    def to_dict(self) -> dict[str, Any]:
        """config.json content that `from_dict` reads back to an equal config."""
        out = dataclasses.asdict(self)
        rope = out.pop("rope_scaling")
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = None if rope["rope_type"] == "default" else {
            k: v for k, v in rope.items() if v is not None}
        if not self.uses_engram:
            for key in [k for k in out if k.startswith("engram_")]:
                del out[key]
        if not self.uses_mhc and self.model_type != "engram_mhc":
            for key in ("hc_mult", "hc_sinkhorn_iters", "hc_eps"):
                del out[key]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        if self.fp8_scale_fmt not in FP8_SCALE_FMTS:
            raise ConfigError(f"quantization_config.scale_fmt: {self.fp8_scale_fmt!r} not in {FP8_SCALE_FMTS}")
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                    "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError(f"q_lora_rank: must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim: must be even, got {self.qk_rope_head_dim}")
        if not (self.rms_norm_eps > 0 and self.hc_eps >= 0):
            raise ConfigError("rms_norm_eps/hc_eps: must be positive")
        self._validate_moe()
        self._validate_rope()
        self._validate_engram()

    def _validate_moe(self) -> None:
        if not self.n_routed_experts:
            return
        for name in ("num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer for an MoE model, got {value!r}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds n_routed_experts "
                              f"{self.n_routed_experts}")
        if self.first_k_dense_replace < 0:
            raise ConfigError(f"first_k_dense_replace: must be >= 0, got {self.first_k_dense_replace}")
        grouped = self.router_kind == "sigmoid" or self.topk_method == "group_limited_greedy"
        if grouped:
            n_group = self.n_group or 1
            topk_group = self.topk_group or n_group
            if self.n_routed_experts % n_group:
                raise ConfigError(f"n_group: {n_group} does not divide n_routed_experts {self.n_routed_experts}")
            if not 0 < topk_group <= n_group:
                raise ConfigError(f"topk_group: must be in 1..n_group ({n_group}), got {topk_group}")
            if self.router_kind == "sigmoid" and self.n_routed_experts // n_group < 2:
                raise ConfigError("n_group: each group needs at least 2 experts (group score = top-2 sum)")
            if topk_group * (self.n_routed_experts // n_group) < self.num_experts_per_tok:
                raise ConfigError("topk_group: the kept groups hold fewer experts than num_experts_per_tok")
        if self.router_kind == "softmax" and self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method: {self.topk_method!r} is not a DeepSeek-V2 routing method")

    def _validate_rope(self) -> None:
        rope = self.rope_scaling
        if rope.rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope_scaling.type: {rope.rope_type!r} is not supported (default or yarn)")
        if rope.rope_type == "yarn":
            if not rope.factor or rope.factor <= 0:
                raise ConfigError(f"rope_scaling.factor: must be positive, got {rope.factor!r}")
            if not rope.original_max_position_embeddings:
                raise ConfigError("rope_scaling.original_max_position_embeddings: required for yarn")

    def _validate_engram(self) -> None:
        if not self.engram_layer_ids:
            return
        ids = self.engram_layer_ids
        if not isinstance(ids, list) or len(set(ids)) != len(ids):
            raise ConfigError(f"engram_layer_ids: must be a list of distinct layer indices, got {ids!r}")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"engram_layer_ids: {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.engram_max_ngram_size < 2:
            raise ConfigError(f"engram_max_ngram_size: must be >= 2, got {self.engram_max_ngram_size}")
        for name in ("engram_n_heads", "engram_head_dim", "engram_vocab_size", "engram_num_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer when Engram is on, got {value!r}")
        if self.engram_table_dtype not in ENGRAM_TABLE_DTYPES:
            raise ConfigError(f"engram_table_dtype: {self.engram_table_dtype!r} not in {ENGRAM_TABLE_DTYPES}")
        if self.engram_table_dtype == "fp8" and self.engram_head_dim % 32:
            raise ConfigError(f"engram_head_dim: must be a multiple of 32 for fp8 tables, got {self.engram_head_dim}")
        if not 0 <= self.engram_pad_token_id < self.vocab_size:
            raise ConfigError(f"engram_pad_token_id: {self.engram_pad_token_id} outside the vocabulary")


def _rope_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Pop rope settings from either HF layout (`rope_parameters`) or the older one (`rope_theta` +
    `rope_scaling`), returning `rope_theta` and a RopeScaling."""
    params = data.pop("rope_parameters", None) or {}
    scaling = data.pop("rope_scaling", None) or {}
    theta = data.pop("rope_theta", None)
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("rope_parameters/rope_scaling: must be JSON objects")
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", theta if theta is not None else 10000.0)
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    allowed = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(merged) - allowed)
    if unknown:
        raise ConfigError(f"rope_scaling: unknown field(s) {', '.join(unknown)}")
    if not isinstance(theta, (int, float)) or theta <= 0 or math.isnan(theta):
        raise ConfigError(f"rope_theta: must be a positive number, got {theta!r}")
    factor = merged.pop("factor", None)
    if factor is None and rope_type == "yarn":
        # DeepSeek/HF convention: derive the factor from the extended and original context lengths.
        original = merged.get("original_max_position_embeddings")
        max_pos = data.get("max_position_embeddings")
        factor = max_pos / original if original and max_pos else None
    return {"rope_theta": float(theta),
            "rope_scaling": RopeScaling(rope_type=rope_type, factor=1.0 if factor is None else factor, **merged)}
