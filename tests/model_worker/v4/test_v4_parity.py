"""DeepSeek-V4 logits against transformers' DeepseekV4ForCausalLM (the independent reference), max |diff| <=
1e-4 in fp32, on small configs that mix the three attention layer types, hash-routed and learned MoE layers,
hc_mult 2 and 4, batched, with sequences that close several compression windows and an indexer top-k
smaller than the number of entries. Every weight is random (the reference's own init zeroes sinks, biases
and the hash table, which would hide mistakes); the checkpoint goes through save_pretrained and our loader."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
DeepseekV4Config = getattr(transformers, "DeepseekV4Config", None)
pytestmark = pytest.mark.skipif(DeepseekV4Config is None, reason="this transformers has no deepseek_v4")

from model_worker.v4 import load_v4_model  # noqa: E402

BASE = dict(
    vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25, num_experts_per_tok=2,
    n_routed_experts=8, n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    max_position_embeddings=1024, rope_theta=10000.0, compress_rope_theta=160000.0,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"], hc_mult=4, swiglu_limit=10.0,
    sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=4,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
CONFIGS = {
    "all three types, hc 4": (BASE, (2, 40)),
    "hc 2, sigmoid, longer windows, plain compress rope": (
        {**BASE, "hc_mult": 2, "scoring_func": "sigmoid", "rope_parameters": None, "sliding_window": 16,
         "compress_rates": {"compressed_sparse_attention": 8, "heavily_compressed_attention": 16},
         "index_topk": 3, "o_groups": 4, "o_lora_rank": 8, "swiglu_limit": 0.5}, (3, 72)),
    "default schedule (no sliding layers), one hash layer": (
        {**BASE, "layer_types": None, "mlp_layer_types": None, "num_hash_layers": 1, "num_hidden_layers": 4,
         "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 6}}, (2, 50)),
}


def _random_reference(config: dict, seed: int, std: float = 0.1):
    """transformers' model with every weight random (std `std`; norm weights around 1), the hash table and
    the router biases too."""
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(DeepseekV4Config(**config)).eval().float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, config["n_routed_experts"], b.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_transformers(name, tmp_path):
    config, shape = CONFIGS[name]
    reference = _random_reference(config, seed=len(name))
    reference.save_pretrained(tmp_path)
    ids = torch.randint(0, config["vocab_size"], shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits.float()
    ours = load_v4_model(tmp_path)
    assert ours.config.layer_types == list(reference.config.layer_types)
    with torch.no_grad():
        got = ours(ids)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |ours - transformers| = {diff:.2e} (logits up to {want.abs().max():.2f})"


def _release_name(name: str) -> str:
    """transformers' saved name -> DeepSeek's release naming (no `model.` prefix, embed/hc_head_fn)."""
    name = name.removeprefix("model.")
    return {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
            "hc_head.hc_scale": "hc_head_scale"}.get(name, name)


def test_release_naming_loads_the_same_mtp_is_skipped_and_bad_checkpoints_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from model_worker.errors import CheckpointError, ConfigError
    from model_worker.loading import load_model

    reference = _random_reference(BASE, seed=3)
    reference.save_pretrained(tmp_path / "hf")
    (shard,) = (tmp_path / "hf").glob("*.safetensors")
    tensors = {_release_name(k): v for k, v in load_file(shard).items()}
    assert "embed.weight" in tensors and "layers.1.attn.indexer.compressor.ape" in tensors
    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({**tensors, "mtp.0.head.weight": torch.zeros(3)}, release / "model.safetensors")
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(load_v4_model(release)(ids), load_v4_model(tmp_path / "hf")(ids), rtol=0, atol=0)
        bf16 = load_v4_model(release, dtype=torch.bfloat16)
        assert bf16.model.layers[0].attn_hc.fn.dtype == torch.float32  # mHC stays fp32, as transformers keeps it
        assert bf16.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
        assert bf16(ids).isfinite().all()
    del tensors["layers.2.attn.compressor.wkv.weight"]
    save_file(tensors, release / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.compressor\.kv_proj\.weight"):
        load_v4_model(release)
    with pytest.raises(ConfigError, match="load_v4_model"):
        load_model(release)  # the engine's loader says where V4 loads instead of failing on a field
