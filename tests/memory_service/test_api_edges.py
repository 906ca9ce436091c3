"""API edges of the memory service (issue #19, item 3): what users hit at the boundaries.

References: the in-process tables (`model_worker.engram_tables`) for error types and accepted dtypes, and the
in-process `EngramTable.lookup` for the rows a `MemoryService` shard returns.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from safetensors.torch import save_file

from memory_service.agent_memory import AgentMemoryStore, HashingEmbedder
from memory_service.engram_tables import EngramTableStore, ShardedEngramClient
from memory_service.service import MemoryService
from model_worker.engram_hashing import EngramHasher
from model_worker.engram_tables import EngramTable, InProcessEngramTables
from model_worker.loading import ENGRAM_TABLES_FILE


def write_tables(directory, tables: dict[int, EngramTable]):
    items = {name: t.contiguous() for name, t in InProcessEngramTables(tables).state_dict_items()}
    save_file(items, str(directory / ENGRAM_TABLES_FILE))
    return directory / ENGRAM_TABLES_FILE


@pytest.fixture
def served(tmp_path):
    tables = {1: EngramTable.random(300, 64, "fp8", seed=1), 3: EngramTable.random(90, 32, "bfloat16", seed=2)}
    write_tables(tmp_path, tables)
    store = EngramTableStore(hot_cache_rows=0)
    store.add_model("m", tmp_path)
    yield tables, store
    store.close()


# ---- agent memory --------------------------------------------------------------------------------------
def test_search_of_an_agent_without_memories_is_empty(open_store):
    store = open_store()
    assert store.search("t", "never-wrote", "anything at all", k=3) == []
    assert store.search("t", "never-wrote", "anything", k=3, hybrid=True, kinds=["fact"]) == []
    memory = store.write("t", "forgotten", "a note")
    store.forget_agent("t", "forgotten")
    assert store.search("t", "forgotten", "a note") == []
    store.write("t", "emptied", "a note")
    store.delete("t", store.search("t", "emptied", "a note")[0].memory.id)
    assert store.search("t", "emptied", "a note") == []
    assert memory.agent == "forgotten"


def test_search_of_an_agent_without_memories_is_empty_through_the_service(tmp_path):
    service = MemoryService(AgentMemoryStore(f"sqlite:///{tmp_path / 'm.sqlite3'}", HashingEmbedder(64)))
    try:
        assert asyncio.run(service.search("t", "nobody", "hello")) == []
    finally:
        service.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_agent_memory_on_an_in_memory_sqlite_url(url):
    store = AgentMemoryStore(url, HashingEmbedder(64))
    service = MemoryService(store, threads=4)  # the service's worker threads share the one connection
    try:
        async def fill():
            return await asyncio.gather(*(service.write("t", f"agent-{i % 3}", f"note number {i} about topic {i % 5}")
                                          for i in range(60)))

        written = asyncio.run(fill())
        errors = []

        def reader(agent: str) -> None:
            try:
                for i in range(20):
                    store.search("t", agent, f"topic {i % 5}", k=3, hybrid=i % 2 == 0)
                    store.list("t", agent, limit=5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(f"agent-{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert sorted(r.id for r in store.list("t", limit=100).items) == sorted(r.id for r in written)
        hit = store.search("t", "agent-0", "note number 9 about topic 4", k=1)[0]
        assert hit.memory.text == "note number 9 about topic 4"
        other = AgentMemoryStore(url, HashingEmbedder(64))  # another engine: another, empty database
        assert other.list("t").items == []
        other.close()
    finally:
        service.close()


# ---- Engram tables -------------------------------------------------------------------------------------
def test_bad_ids_raise_the_same_error_type_in_process_and_through_the_service(served):
    tables, store = served
    in_process = InProcessEngramTables(tables)
    service = MemoryService(engram=store)
    client = ShardedEngramClient("m", [store], store.layer_rows("m"))
    good = torch.tensor([0, 5, 299])
    bad_inputs = {"float ids": good.float(), "a list": [0, 5], "negative": torch.tensor([-1]),
                  "past the table": torch.tensor([300])}
    for what, ids in bad_inputs.items():
        with pytest.raises(Exception) as want:
            in_process.lookup(1, ids)
        for name, call in {"store": lambda ids=ids: store.lookup("m", 1, ids),
                           "service": lambda ids=ids: service.engram_lookup("m", 1, ids),
                           "client": lambda ids=ids: client.lookup(1, ids)}.items():
            with pytest.raises(Exception) as got:
                call()
            assert type(got.value) is type(want.value), (what, name, got.value, want.value)
    assert torch.equal(client.lookup(1, good), in_process.lookup(1, good))
    client.close()
    service.close()


def test_a_model_the_shards_do_not_hold_is_refused_when_the_client_is_created(served):
    _, store = served
    with pytest.raises(ValueError, match="'other'.*not served by shards\\[0\\]"):
        ShardedEngramClient("other", [store], store.layer_rows("m"))
    with pytest.raises(ValueError, match="not served by shards\\[0\\]"):
        ShardedEngramClient("m", [MemoryService()], {1: 300})  # a service with no Engram tables at all


def test_fp16_tables_follow_one_rule_in_process_and_in_the_service(tmp_path):
    half = {"engram.2.table": torch.randn(40, 32).half()}
    save_file(half, str(tmp_path / ENGRAM_TABLES_FILE))
    with pytest.raises(TypeError):
        InProcessEngramTables.from_tensors(half)
    store = EngramTableStore()
    with pytest.raises(ValueError, match="engram.2.table must be"):
        store.add_model("half", tmp_path)
    assert store.models() == []
    bf16 = {"engram.2.table": torch.randn(40, 32).bfloat16()}  # control: a dtype both sides take
    save_file(bf16, str(tmp_path / ENGRAM_TABLES_FILE))
    store.add_model("bf16", tmp_path)
    ids = torch.tensor([0, 39, 7])
    assert torch.equal(store.lookup("bf16", 2, ids), InProcessEngramTables.from_tensors(bf16).lookup(2, ids))
    store.close()


@pytest.mark.parametrize("num_shards", [1, 2])
def test_memory_service_is_an_engram_shard(tmp_path, num_shards):
    tables = {1: EngramTable.random(300, 64, "fp8", seed=1), 3: EngramTable.random(90, 32, "bfloat16", seed=2)}
    write_tables(tmp_path, tables)
    services = []
    for shard in range(num_shards):
        store = EngramTableStore(hot_cache_rows=8)
        store.add_model("m", tmp_path, shard=shard, num_shards=num_shards)
        services.append(MemoryService(engram=store))
    client = ShardedEngramClient("m", services, services[0].layer_rows("m"), parallel_min_ids=0)
    ids = torch.randint(0, 90, (4, 7, 3), generator=torch.Generator().manual_seed(0))
    for layer, table in tables.items():
        assert torch.equal(client.lookup(layer, ids), table.lookup(ids))
    assert services[0].lookup("m", 1, torch.tensor([0, 1]), out_dtype=torch.bfloat16).dtype == torch.bfloat16
    client.close()
    for service in services:
        service.engram.close()
        service.close()


def test_token_ids_beyond_the_vocabulary_are_refused_before_hashing():
    hasher = EngramHasher([1, 4], 3, 2, engram_vocab_size=100, compressed_vocab_size=1000, pad_id=2)
    fine = torch.tensor([[0, 5, 999]])
    assert hasher.hash(1, fine).shape == (1, 3, 4)
    for bad in ([[0, 5, 1000]], [[-1, 5, 7]], [[2**40, 1, 1]]):
        with pytest.raises(ValueError, match=r"compressed_ids: token ids must lie in \[0, 1000\)"):
            hasher.hash(4, torch.tensor(bad))
