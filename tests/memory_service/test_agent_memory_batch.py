"""Batch writes (`write_many`) and writes with a precomputed vector (issue #19, item 2), on SQLite and PostgreSQL.

References: one-at-a-time `write` and `get` for what a batch must store, the embedder itself for the vectors,
and a counting wrapper for how often the embedder runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from memory_service.agent_memory import HashingEmbedder, MemoryValidationError


class CountingEmbedder:
    def __init__(self, dim: int = 64) -> None:
        self.inner = HashingEmbedder(dim)
        self.name, self.dim = self.inner.name, dim
        self.calls: list[int] = []

    def embed(self, texts):
        self.calls.append(len(texts))
        return self.inner.embed(texts)


def test_write_many_stores_what_write_would_in_one_embedder_call(open_store):
    embedder = CountingEmbedder()
    store = open_store(embedder)
    items = ["the deploy window is Tuesday", {"text": "Ana prefers tea", "kind": "episode", "metadata": {"n": 1},
                                              "source_session": "s1", "source_step": 3},
             {"text": "budget review moved to Friday"}]
    records = store.write_many("t", "a", items)
    assert embedder.calls == [3]
    assert [r.text for r in records] == ["the deploy window is Tuesday", "Ana prefers tea",
                                         "budget review moved to Friday"]
    assert records[1].kind == "episode" and records[1].metadata == {"n": 1} and records[1].source_step == 3
    assert all(r.tenant == "t" and r.agent == "a" for r in records)
    assert [store.get("t", r.id) for r in records] == records
    for record in records:
        assert store.search("t", "a", record.text, k=1)[0].memory == record
    assert store.index_stats()[("t", "a")]["vectors"] == 3
    reopened = open_store(HashingEmbedder(64))  # the index is rebuilt from the database: the rows are all there
    assert sorted(h.memory.id for h in reopened.search("t", "a", "tea Tuesday Friday", k=10)) == \
        sorted(r.id for r in records)


def test_write_many_honours_idempotency_keys_like_write(open_store):
    store = open_store()
    first = store.write("t", "a", "original", idempotency_key="k1")
    records = store.write_many("t", "a", [{"text": "retry of k1", "idempotency_key": "k1"},
                                          {"text": "new with k2", "idempotency_key": "k2"},
                                          {"text": "duplicate k2 in the batch", "idempotency_key": "k2"},
                                          "no key"])
    assert records[0] == first
    assert records[1] == records[2] and records[1].text == "new with k2"
    assert len(store.list("t", "a").items) == 3
    assert store.write("t", "a", "retry again", idempotency_key="k2") == records[1]
    assert store.write_many("t", "a", []) == []


def test_write_many_with_one_bad_item_writes_nothing(open_store):
    store = open_store()
    store.write("t", "a", "already here")
    bad_batches = [(["fine", "   "], r"^items\[1\]\.text"),
                   (["fine", {"text": "x", "kind": "rumour"}], r"^items\[1\]\.kind"),
                   ([{"text": "x", "colour": "red"}], r"^items\[0\]"),
                   ("a single string", "^items")]
    for items, message in bad_batches:
        with pytest.raises(MemoryValidationError, match=message):
            store.write_many("t", "a", items)
    with pytest.raises(MemoryValidationError, match="^vectors"):
        store.write_many("t", "a", ["one", "two"], vectors=np.ones((1, 64), np.float32))
    assert [r.text for r in store.list("t", "a").items] == ["already here"]


def test_precomputed_vectors_skip_the_embedder_and_are_searchable(open_store):
    embedder = CountingEmbedder()
    store = open_store(embedder)
    reference = HashingEmbedder(64)
    texts = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    vectors = reference.embed(texts) * 3.0  # not unit length: the store normalises
    single = store.write("t", "a", texts[0], vector=vectors[0])
    batch = store.write_many("t", "a", texts[1:], vectors=vectors[1:])
    assert embedder.calls == []
    for record, text in zip([single, *batch], texts):
        hit = store.search("t", "a", text, k=1)[0]
        assert hit.memory == record and hit.score == pytest.approx(1.0, abs=1e-5)
    for bad, message in ((np.zeros(64), "zero"), (np.full(64, np.nan), "finite"), (np.ones(63), "shape"),
                         (np.ones(64, dtype=np.int64), "floats")):
        with pytest.raises(MemoryValidationError, match=message):
            store.write("t", "a", "bad vector", vector=bad)
    assert len(store.list("t", "a").items) == 3
