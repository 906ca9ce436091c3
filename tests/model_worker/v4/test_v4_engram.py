"""DeepSeek-V4.1 with Engram layers (MODEL_SPEC's Engram semantics, our `EngramModule` and hashing, tables of
e4m3 rows with one e8m0 scale per 32 values): a checkpoint with `engram_*` config fields, the module's
tensors and `engram_tables.safetensors` loads and gives the logits of the model it was saved from; the memory
read changes them; decoding with carried state (the n-gram history kept in the state) equals full recompute,
also one batched step of sequences at different lengths; and the tables served by the memory service (two
shards) give the same logits as in-process tables."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from memory_service.engram_client import ShardedEngramClient
from memory_service.engram_tables import EngramTableStore
from model_worker.engram_hashing import hasher_for
from model_worker.engram_tables import EngramTable, InProcessEngramTables
from model_worker.v4 import V4CausalLM, V4Config, load_v4_model

RAW = {
    "model_type": "deepseek_v4", "vocab_size": 128, "hidden_size": 64, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 32, "q_lora_rank": 32,
    "partial_rotary_factor": 0.25, "num_experts_per_tok": 2, "n_routed_experts": 8,
    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                    "sliding_attention"],
    "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"], "hc_mult": 4, "sliding_window": 8, "o_groups": 2,
    "o_lora_rank": 16, "index_n_heads": 8, "index_head_dim": 16, "index_topk": 4,
    "engram_layer_ids": [1, 3], "engram_max_ngram_size": 3, "engram_n_heads": 2, "engram_head_dim": 32,
    "engram_vocab_size": 101, "engram_num_embeddings": 100, "engram_pad_token_id": 0,
}


def _model(seed: int = 0) -> V4CausalLM:
    config = V4Config.from_dict(RAW)
    model = V4CausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, 8, b.shape, generator=g))
        model.model.engram_token_map.copy_(torch.arange(config.vocab_size) % config.engram_num_embeddings)
    hasher = hasher_for(config, model.model.engram_token_map)
    model.attach_engram_tables(InProcessEngramTables({
        layer: EngramTable.from_float(torch.randn(hasher.table_rows(layer), 32, generator=g), "fp8")
        for layer in config.engram_layer_ids}))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v41")
    model = _model()
    (path / "config.json").write_text(json.dumps(RAW))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    save_file(dict(model.engram_tables.state_dict_items()), path / "engram_tables.safetensors")
    return path


def _ids(shape, seed=1):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_a_v41_checkpoint_loads_and_its_memory_read_matters(checkpoint):
    ids = _ids((2, 30))
    model = load_v4_model(checkpoint)
    assert model.model.layers[1].engram is not None and model.model.layers[0].engram is None
    table = model.engram_tables.tables[1]
    assert table.data.dtype == torch.float8_e4m3fn and table.scales.shape[1] == 32 // 32  # one scale per 32
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _model()(ids), rtol=0, atol=0)
        with_memory = model(ids)
        model.attach_engram_tables(InProcessEngramTables({
            layer: EngramTable.from_float(torch.zeros_like(t.data, dtype=torch.float32), "fp8")
            for layer, t in model.engram_tables.tables.items()}))
        assert (model(ids) - with_memory).abs().max() > 1e-3


def test_decoding_with_state_equals_full_recompute(checkpoint):
    model = load_v4_model(checkpoint)
    prompt = _ids((2, 21), seed=3)
    with torch.no_grad():
        state = model.new_state()
        got = [model(prompt[:, :1], state), model(prompt[:, 1:9], state), model(prompt[:, 9:], state)]
        torch.testing.assert_close(torch.cat(got, dim=1), model(prompt), rtol=1e-4, atol=1e-4)
        sequences = [_ids((1, n), seed=n) for n in (1, 2, 13)]  # shorter and longer than the n-gram history
        states = [model.new_state() for _ in sequences]
        for seq, s in zip(sequences, states):
            model(seq, s)
        nexts = torch.tensor([5, 77, 40])
        together = model.decode(nexts, states)
        for i, seq in enumerate(sequences):
            full = model(torch.cat((seq, nexts[i].view(1, 1)), dim=1))[0, -1]
            torch.testing.assert_close(together[i], full, rtol=1e-4, atol=1e-4)


def test_tables_from_the_memory_service_give_the_same_logits(checkpoint):
    ids = _ids((2, 26), seed=5)
    with torch.no_grad():
        local = load_v4_model(checkpoint)(ids)
        remote = load_v4_model(checkpoint, engram_tables=False)
        shards = []
        for shard in range(2):
            store = EngramTableStore(hot_cache_rows=0)
            store.add_model("v41", checkpoint, shard=shard, num_shards=2)
            shards.append(store)
        remote.attach_engram_tables(ShardedEngramClient("v41", shards, shards[0].layer_rows("v41")))
        torch.testing.assert_close(remote(ids), local, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="attach_engram_tables"):
            load_v4_model(checkpoint, engram_tables=False)(ids)
