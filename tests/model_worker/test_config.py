"""Config reading: HF DeepSeek configs, our Engram + mHC fields, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from model_worker import ConfigError, ModelConfig

V3_FIELDS = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32,
                 q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2)


def test_reads_a_transformers_v3_config(tmp_path):
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(**{k: v for k, v in V3_FIELDS.items() if k != "model_type"},
                          rope_parameters={"rope_type": "yarn", "rope_theta": 5e4, "factor": 40.0,
                                           "original_max_position_embeddings": 4096, "mscale": 1.0,
                                           "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    hf.save_pretrained(tmp_path)
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.model_type == "deepseek_v3" and config.router_kind == "sigmoid"
    assert config.rope_theta == 5e4 and config.rope_scaling.rope_type == "yarn"
    assert config.rope_scaling.factor == 40.0 and config.rope_scaling.mscale_all_dim == 1.0
    assert config.q_lora_rank == 48 and config.is_moe_layer(1) and not config.is_moe_layer(0)


def test_reads_deepseek_style_rope_scaling_and_v2_defaults():
    raw = dict(V3_FIELDS, model_type="deepseek_v2", n_group=None, topk_group=None, rope_theta=10000,
               rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})
    config = ModelConfig.from_dict(raw)
    assert config.router_kind == "softmax" and config.topk_method == "greedy"
    assert config.rope_scaling.mscale == 0.707 and config.routed_scaling_factor == 1.0


def test_engram_mhc_config_round_trips(tmp_path):
    raw = dict(V3_FIELDS, model_type="engram_mhc", hc_mult=4, engram_layer_ids=[0, 2], engram_max_ngram_size=3,
               engram_n_heads=2, engram_head_dim=32, engram_vocab_size=101, engram_num_embeddings=80,
               engram_pad_token_id=3)
    config = ModelConfig.from_dict(raw)
    config.save(tmp_path)
    again = ModelConfig.from_pretrained(tmp_path)
    assert again == config and again.uses_mhc and again.engram_hash_cols == 4


@pytest.mark.parametrize("patch,field", [
    (dict(flux_capacitor=1), "flux_capacitor"),
    (dict(model_type="llama"), "model_type"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 2}), "original_max_position_embeddings"),
    (dict(model_type="engram_mhc", engram_layer_ids=[5], engram_num_embeddings=10), "engram_layer_ids"),
    (dict(model_type="engram_mhc", engram_layer_ids=[1], engram_num_embeddings=10, engram_head_dim=40),
     "engram_head_dim"),
    (dict(model_type="engram_mhc", engram_layer_ids=[1], engram_num_embeddings=0), "engram_num_embeddings"),
])
def test_bad_fields_raise_an_error_naming_the_field(patch, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(dict(V3_FIELDS, **patch))


def test_malformed_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_pretrained(tmp_path)
