"""Checkpoint tensor names -> this model's parameter names (`V4CausalLM`), for the two namings V4 checkpoints
come in: DeepSeek's release (`embed.weight`, `layers.{i}.attn.wq_a.weight`, `layers.{i}.ffn.experts.{e}.w1.weight`,
`hc_head_fn`, `head.weight`, ...) and transformers' `save_pretrained` (the same under `model.`, with
`model.embed_tokens.weight` and `model.hc_head.hc_fn`). The mapping is the one transformers' conversion applies;
a name already in our form maps to itself."""

from __future__ import annotations

import re

# applied in order to a layer's tensor name after "layers.{i}."
_LAYER_RULES = [(re.compile(pattern), target) for pattern, target in (
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
)]
_TOP = {"embed.weight": "model.embed_tokens.weight", "embed_tokens.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight", "lm_head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
        "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
        "hc_head_scale": "model.hc_head.hc_scale", "hc_head.hc_fn": "model.hc_head.hc_fn",
        "hc_head.hc_base": "model.hc_head.hc_base", "hc_head.hc_scale": "model.hc_head.hc_scale"}


def model_name(checkpoint_name: str) -> str:
    """Our parameter name for a checkpoint tensor name (unknown names come back with `model.` normalised, and
    the loader reports them as unexpected)."""
    name = checkpoint_name.removeprefix("model.")
    if name in _TOP:
        return _TOP[name]
    if name.startswith("layers.") and ".engram." not in name:  # V4.1 Engram tensors carry our names already
        for pattern, target in _LAYER_RULES:
            name = pattern.sub(target, name)
    return f"model.{name}"
