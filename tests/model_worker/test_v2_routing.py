"""DeepSeek-V2 routing: softmax top-k whose weights are normalised (norm_topk_prob, top_k > 1) or scaled by
routed_scaling_factor, never both, as DeepSeek's V2 code does; without normalisation it equals transformers'
V2 router (which always scales). And a config spacing MoE layers other than every layer is refused."""

from __future__ import annotations

import pytest
import torch

from model_worker import ConfigError, ModelConfig
from model_worker.layers.moe import Router

V2_FIELDS = dict(model_type="deepseek_v2", vocab_size=97, hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32,
                 q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=3.0)


def _router(norm: bool, seed: int = 0) -> tuple[Router, torch.Tensor]:
    router = Router(ModelConfig.from_dict(dict(V2_FIELDS, norm_topk_prob=norm)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
    return router, torch.randn(5, 64, generator=g)


def _by_expert(weights: torch.Tensor, ids: torch.Tensor, experts: int = 8) -> torch.Tensor:
    """[N, k] weights and ids -> dense [N, E] (order-free comparison)."""
    return torch.zeros(weights.shape[0], experts).scatter(1, ids, weights)


@pytest.mark.parametrize("norm", [True, False])
def test_v2_weights_are_normalised_or_scaled(norm):
    router, x = _router(norm)
    weights, ids = router(x)
    scores = (x @ router.weight.T).softmax(-1)
    top, top_ids = scores.topk(3, dim=-1)
    want = top / top.sum(-1, keepdim=True) if norm else top * 3.0
    torch.testing.assert_close(_by_expert(weights, ids), _by_expert(want, top_ids))
    if norm:
        torch.testing.assert_close(weights.sum(-1), torch.ones(5))  # normalised, not also scaled


def test_v2_without_normalisation_equals_transformers_router():
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    router, x = _router(norm=False, seed=3)
    hf_fields = {k: v for k, v in V2_FIELDS.items() if k != "model_type"}
    hf = DeepseekV2TopkRouter(DeepseekV2Config(**hf_fields, topk_method="greedy", n_group=1, topk_group=1))
    with torch.no_grad():
        hf.weight.copy_(router.weight)
    _, hf_weights, hf_ids = hf(x)
    weights, ids = router(x)
    torch.testing.assert_close(_by_expert(weights, ids), _by_expert(hf_weights, hf_ids))


@pytest.mark.parametrize("freq", [2, 0])
def test_moe_layer_spacing_other_than_every_layer_is_refused(freq):
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        ModelConfig.from_dict(dict(V2_FIELDS, moe_layer_freq=freq))
    assert ModelConfig.from_dict(dict(V2_FIELDS, moe_layer_freq=1)).is_moe_layer(1)
