"""Our architecture end to end: MLA + mHC + MoE + Engram, random weights, save/load and batching."""

from __future__ import annotations

import pytest
import torch

from model_worker import ModelConfig, build_random_model, load_model, save_model
from model_worker.engram_tables import EngramTable

ENGRAM_MHC = dict(model_type="engram_mhc", vocab_size=120, hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32,
                  q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
                  hc_mult=4, engram_layer_ids=[1, 2], engram_max_ngram_size=3, engram_n_heads=2,
                  engram_head_dim=32, engram_vocab_size=53, engram_num_embeddings=90, engram_pad_token_id=0)


def _model(**patch):
    config = ModelConfig.from_dict({**ENGRAM_MHC, **patch})
    token_map = torch.arange(config.vocab_size) % config.engram_num_embeddings
    return build_random_model(config, seed=3, token_map=token_map, std=0.1)


def _batch(lengths, vocab, side="left", seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (n,), generator=gen) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(T - len(p), T) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    return prompts, ids, mask


@pytest.mark.parametrize("table_dtype", ["fp8", "bfloat16", "float32"])
def test_save_and_load_reproduce_logits_exactly(tmp_path, table_dtype):
    model = _model(engram_table_dtype=table_dtype)
    _, ids, mask = _batch([5, 9], model.config.vocab_size)
    expected = model(ids, attention_mask=mask)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert torch.equal(loaded(ids, attention_mask=mask), expected)
    assert torch.equal(loaded.model.engram_token_map, model.model.engram_token_map)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(side):
    model = _model()
    prompts, ids, mask = _batch([4, 11, 7], model.config.vocab_size, side=side)
    logits = model(ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model(p[None])[0]
        assert (logits[i][mask[i].bool()] - alone).abs().max().item() <= 1e-5


def test_engram_rows_reach_the_logits():
    """Replacing one Engram table changes the output; without Engram tables the model refuses to run."""
    model = _model()
    _, ids, mask = _batch([6, 8], model.config.vocab_size)
    before = model(ids, attention_mask=mask)
    tables = model.engram_tables
    layer = model.config.engram_layer_ids[0]
    old = tables.tables[layer]
    tables.tables[layer] = EngramTable.random(old.data.shape[0], old.data.shape[1], dtype="fp8", seed=99)
    assert (model(ids, attention_mask=mask) - before).abs().max().item() > 1e-3
    model.engram_tables = None
    with pytest.raises(RuntimeError, match="attach_engram_tables"):
        model(ids, attention_mask=mask)


def test_mhc_streams_are_used():
    """With hc_mult=4 the residual carries 4 streams; the same weights at different comb scale differ."""
    model = _model()
    _, ids, mask = _batch([6], model.config.vocab_size)
    before = model(ids, attention_mask=mask)
    with torch.no_grad():
        model.model.layers[0].attn_hc.base.add_(0.5)
    assert (model(ids, attention_mask=mask) - before).abs().max().item() > 1e-4


def test_bf16_model_tracks_fp32():
    model = _model()
    _, ids, mask = _batch([6, 9], model.config.vocab_size)
    ref = model(ids, attention_mask=mask)
    model.cast(torch.bfloat16)
    assert model.model.layers[0].attn_hc.fn.dtype == torch.float32  # mHC weights stay fp32
    got = model(ids, attention_mask=mask)
    valid = mask.bool()
    assert (got[valid] - ref[valid]).abs().max().item() < 0.05 * ref[valid].abs().max().item() + 0.05


def test_bad_inputs_are_rejected_with_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[1, 500]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
