"""Tiny random DeepSeek-V2/V3 checkpoints written by transformers' own `save_pretrained`.

Weights are redrawn at a larger scale than HF's init (and the V3 correction bias made non-zero) so that
routing, RoPE and normalisation differences show up in the logits instead of vanishing in noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
            v_head_dim=24,
            qk_nope_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=256, tie_word_embeddings=False)

V3_VARIANTS = {
    "moe_grouped": dict(n_group=4, topk_group=2, rope_interleave=True),
    "dense_bigger": dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, kv_lora_rank=128,
                         q_lora_rank=192, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
                         first_k_dense_replace=3, n_group=4, topk_group=2),
    "no_q_lora": dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False),
    "yarn": dict(n_group=4, topk_group=2, rope_interleave=True,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                  "mscale": 0.707, "mscale_all_dim": 1.0}),
    "yarn_not_interleaved": dict(n_group=1, topk_group=1, rope_interleave=False,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                  "original_max_position_embeddings": 16, "mscale": 1.0,
                                                  "mscale_all_dim": 1.0}),
}
V2_VARIANTS = {
    "greedy": dict(q_lora_rank=None, topk_method="greedy"),
    "group_limited": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in list(model.named_parameters()) + list(model.named_buffers()):
            if not param.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "e_score_correction_bias" in name:
                param.copy_(0.5 * noise)
            elif param.dim() == 2 and "embed_tokens" not in name:
                param.copy_(noise / param.shape[-1] ** 0.5)  # unit gain per projection
            else:
                param.copy_(noise * 0.5)


def write_hf_checkpoint(tmp_path: Path, family: str, variant: str, seed: int = 0):
    """Save a random transformers model; returns (directory, the transformers model in eval mode)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    extra = (V3_VARIANTS if family == "v3" else V2_VARIANTS)[variant]
    config_cls, model_cls = ((DeepseekV3Config, DeepseekV3ForCausalLM) if family == "v3"
                             else (DeepseekV2Config, DeepseekV2ForCausalLM))
    config = config_cls(**{**BASE, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model, seed)
    out = tmp_path / f"{family}-{variant}"
    model.save_pretrained(out)
    return out, model
