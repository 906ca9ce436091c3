"""The batched Engram client (`lookup_many`): exact against in-process tables over 1, 2 and 3 shard stores, one
request per shard per engine step for all Engram layers, and a failing shard fails the step (no rows made up)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from memory_service.engram_batch import BatchedEngramClient, StoreShard
from memory_service.engram_tables import EngramTableStore, engram_layer_rows
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
NEW_TOKENS = 10


def generate(model) -> tuple[dict[str, list[int]], int]:
    engine = make_engine(model)
    for i, n in enumerate(PROMPT_LENGTHS):
        engine.add_request(f"r{i}", random_prompt(n, seed=20 + i), greedy(NEW_TOKENS))
    outputs = run_to_completion(engine)
    steps = engine.runner.engram_lookups // len(model.config.engram_layer_ids)
    engine.runner.close()
    return {rid: tokens_of(outs) for rid, outs in outputs.items()}, steps


class CountingShard(StoreShard):
    def __init__(self, store):
        super().__init__(store)
        self.calls = []
        self.threads = []

    def start_many(self, model, requests):
        self.calls.append(sorted(requests))
        done = super().start_many(model, requests)
        threads = self.threads

        class Noted:  # which threads send and wait
            def result(self):
                threads.append((threading.current_thread().name, "wait"))
                return done.result()

        self.threads.append((threading.current_thread().name, "send"))
        return Noted()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_model(seed=5, num_hidden_layers=3, engram_layer_ids=[1, 2])  # two Engram layers
    path = tmp_path_factory.mktemp("engram-batch-ckpt")
    save_model(model, path)
    tokens, _ = generate(model)
    return model, path, tokens


def stores_for(path, num_shards):
    stores = [EngramTableStore(hot_cache_rows=16) for _ in range(num_shards)]
    for shard, store in enumerate(stores):
        store.add_model("tiny", path, shard=shard, num_shards=num_shards)
    return stores


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_lookup_many_matches_in_process_tables(saved_model, num_shards):
    model, path, _ = saved_model
    in_process = model.engram_tables
    stores = stores_for(path, num_shards)
    client = BatchedEngramClient("tiny", [StoreShard(s) for s in stores], engram_layer_rows(path))
    gen = torch.Generator().manual_seed(num_shards)
    requests = {layer: torch.randint(0, rows, (7, 3), generator=gen) for layer, rows in client.layers_rows.items()}
    requests[2] = requests[2][:0]  # an empty batch still gives [0, head_dim] rows
    got = client.lookup_many(requests)
    for layer, ids in requests.items():
        assert torch.equal(got[layer], in_process.lookup(layer, ids))
    assert torch.equal(client.lookup(1, requests[1]), in_process.lookup(1, requests[1]))
    with pytest.raises(ValueError, match="rows"):
        client.lookup_many({1: torch.tensor([client.layers_rows[1]])})
    with pytest.raises(TypeError):
        client.lookup_many({1: torch.tensor([0.5])})
    for store in stores:
        store.close()


class BlockingOnly:
    """A client that can only look up and wait (no `start_lookup_many`): the engine uses its fetch thread."""

    def __init__(self, client: BatchedEngramClient):
        self.client, self.layers_rows = client, client.layers_rows

    def lookup(self, layer, ids):
        return self.client.lookup(layer, ids)

    def lookup_many(self, requests):
        return self.client.lookup_many(requests)


@pytest.mark.parametrize("num_shards,sender", [(1, "engine"), (3, "engine"), (3, "fetch thread")])
def test_engine_sends_one_request_per_shard_per_step(saved_model, num_shards, sender):
    """Same tokens whether the engine thread sends the step's request itself (a client with
    `start_lookup_many`, on a CPU) or its fetch thread does; one request per shard per step either way."""
    model, path, want = saved_model
    in_process = model.engram_tables
    stores = stores_for(path, num_shards)
    shards = [CountingShard(s) for s in stores]
    client = BatchedEngramClient("tiny", shards, engram_layer_rows(path))
    model.attach_engram_tables(client if sender == "engine" else BlockingOnly(client))
    try:
        got, steps = generate(model)
    finally:
        model.attach_engram_tables(in_process)
    assert got == want  # token for token
    assert client.requests == steps  # one lookup_many per engine step, never per layer
    for shard in shards:
        assert len(shard.calls) <= steps and all(len(layers) <= 2 for layers in shard.calls)
        assert shard.calls and [1, 2] in shard.calls  # both layers travel in one request
        threads = {name for name, _ in shard.threads}
        assert threads == ({threading.current_thread().name} if sender == "engine" else {"engram-fetch_0"})
    for store in stores:
        store.close()


def test_rows_sent_by_the_engine_are_waited_for_at_the_first_engram_layer(saved_model):
    """The engine thread sends the request before the layers run and waits for the rows only when layer 1
    needs them; that wait is what `engram_wait_s` counts (here at least the shard's 20 ms delay per step)."""
    model, path, want = saved_model
    in_process = model.engram_tables
    (store,) = stores_for(path, 1)

    class Slow(StoreShard):
        def start_many(self, model_name, requests):
            done = super().start_many(model_name, requests)

            class Later:
                def result(self):
                    time.sleep(0.02)
                    return done.result()

            return Later()

    model.attach_engram_tables(BatchedEngramClient("tiny", [Slow(store)], engram_layer_rows(path)))
    engine = make_engine(model)
    try:
        for i, n in enumerate(PROMPT_LENGTHS):
            engine.add_request(f"r{i}", random_prompt(n, seed=20 + i), greedy(NEW_TOKENS))
        got = {rid: tokens_of(outs) for rid, outs in run_to_completion(engine).items()}
        steps = engine.runner.engram_lookups // 2
        assert got == want
        assert engine.runner.engram_fetch_s >= engine.runner.engram_wait_s >= 0.02 * steps
    finally:
        engine.runner.close()
        model.attach_engram_tables(in_process)
        store.close()


@pytest.mark.parametrize("when", ["send", "wait"])
def test_failing_shard_fails_the_step(saved_model, when):
    model, path, _ = saved_model
    in_process = model.engram_tables
    (store,) = stores_for(path, 1)

    class Broken(StoreShard):
        def start_many(self, model_name, requests):
            if when == "send":
                raise RuntimeError("memory service unreachable")

            class Failing:
                def result(self):
                    raise RuntimeError("memory service unreachable")

            return Failing()

    model.attach_engram_tables(BatchedEngramClient("tiny", [Broken(store)], engram_layer_rows(path)))
    engine = make_engine(model)
    try:
        engine.add_request("r0", random_prompt(9, seed=1), greedy(3))
        with pytest.raises(RuntimeError, match="memory service unreachable"):
            engine.step()
    finally:
        engine.runner.close()
        model.attach_engram_tables(in_process)
        store.close()


def test_load_model_without_engram_tables(saved_model, tmp_path):
    """`load_model(engram_tables=False)` needs no table file; the model runs once a client is attached."""
    import shutil

    from model_worker import load_model
    from model_worker.loading import ENGRAM_TABLES_FILE

    model, path, _ = saved_model
    bare = tmp_path / "no-tables"
    shutil.copytree(path, bare)
    (bare / ENGRAM_TABLES_FILE).unlink()
    loaded = load_model(bare, engram_tables=False)
    assert loaded.engram_tables is None
    prompt = torch.tensor([random_prompt(12, seed=2)])
    with pytest.raises(RuntimeError, match="attach_engram_tables"):
        loaded(prompt)
    (store,) = stores_for(path, 1)
    loaded.attach_engram_tables(BatchedEngramClient("tiny", [StoreShard(store)], engram_layer_rows(path)))
    assert torch.equal(loaded(prompt), model(prompt))
    store.close()
