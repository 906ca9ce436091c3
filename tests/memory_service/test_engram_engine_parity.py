"""Must-show 1: the engine's output with Engram tables in-process equals its output with the tables served by
1, 2 and 3 shard stores (loaded from the saved checkpoint) through `ShardedEngramClient`."""

from __future__ import annotations

import pytest
import torch

from memory_service.engram_tables import EngramTableStore, ShardedEngramClient, engram_layer_rows
from model_worker import save_model
from tests.model_worker.engine.engine_fixtures import (
    greedy,
    make_engine,
    random_prompt,
    run_to_completion,
    tiny_model,
    tokens_of,
)

PROMPT_LENGTHS = [5, 23, 41]
NEW_TOKENS = 12


def generate(model) -> dict[str, list[int]]:
    engine = make_engine(model)
    for i, n in enumerate(PROMPT_LENGTHS):
        engine.add_request(f"r{i}", random_prompt(n, seed=10 + i), greedy(NEW_TOKENS))
    outputs = run_to_completion(engine)
    engine.runner.close()
    return {rid: tokens_of(outs) for rid, outs in outputs.items()}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_model(seed=4)
    path = tmp_path_factory.mktemp("engram-ckpt")
    save_model(model, path)
    prompt = torch.tensor([random_prompt(30, seed=3)])
    return model, path, generate(model), model(prompt), prompt


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_engine_output_through_sharded_service_equals_in_process(saved_model, num_shards):
    model, path, want_tokens, want_logits, prompt = saved_model
    in_process = model.engram_tables
    stores = [EngramTableStore(hot_cache_rows=16, hot_cache_window=64) for _ in range(num_shards)]
    for shard, store in enumerate(stores):
        store.add_model("tiny", path, shard=shard, num_shards=num_shards)
    client = ShardedEngramClient("tiny", stores, engram_layer_rows(path), parallel_min_ids=0)  # as for remote shards
    model.attach_engram_tables(client)
    try:
        assert torch.equal(model(prompt), want_logits)
        assert generate(model) == want_tokens
    finally:
        model.attach_engram_tables(in_process)
        client.close()
    served = [store.stats()["tiny"][layer]["ids"] for store in stores for layer in model.config.engram_layer_ids]
    assert all(ids > 0 for ids in served)  # every shard answered lookups
    for store in stores:
        store.close()


def test_engram_rows_change_the_output(saved_model):
    """Control: the comparison above would see wrong rows (shifted ids give a different output)."""
    model, path, want_tokens, want_logits, prompt = saved_model
    in_process = model.engram_tables

    class Shifted:
        def lookup(self, layer_id, hash_ids):
            return in_process.lookup(layer_id, (hash_ids + 1) % in_process.tables[layer_id].rows)

    model.attach_engram_tables(Shifted())
    try:
        assert not torch.equal(model(prompt), want_logits)
        assert generate(model) != want_tokens
    finally:
        model.attach_engram_tables(in_process)
