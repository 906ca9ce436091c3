"""AgentMemoryStore API on SQLite and PostgreSQL: search against brute-force numpy over the embedder's own
vectors, filters, hybrid ranking against the reciprocal-rank-fusion formula, pagination, update, delete,
forget_agent, and the errors bad input raises."""

from __future__ import annotations

import random

import numpy as np
import pytest

from memory_service.agent_memory import HashingEmbedder, MemoryNotFound, MemoryValidationError

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + f" item{i}" for i in range(n)]


def exact_scores(embedder, texts, query) -> np.ndarray:
    """Cosine of every text with the query, by numpy over the embedder's vectors."""
    return embedder.embed(texts) @ embedder.embed([query])[0]


def assert_exact_top_k(hits, ids, scores, k, keep=lambda i: True, min_score=None):
    """hits are the k best of the kept memories by exact score (memories with equal scores in any order)."""
    kept = sorted((float(scores[i]) for i in range(len(ids)) if keep(i)
                   and (min_score is None or scores[i] >= min_score)), reverse=True)
    np.testing.assert_allclose([hit.score for hit in hits], kept[:k], rtol=1e-5, atol=1e-6)
    for hit in hits:
        i = ids.index(hit.memory.id)
        assert keep(i) and hit.score == pytest.approx(float(scores[i]), rel=1e-5, abs=1e-6)


class DictEmbedder:
    """Fixed vectors for known texts (tests design the geometry)."""

    name = "dict-test"

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors
        self.dim = len(next(iter(vectors.values())))

    def embed(self, texts):
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


class NaNEmbedder:
    name, dim = "nan-test", 8

    def embed(self, texts):
        return np.full((len(texts), self.dim), np.nan, np.float32)


def test_write_then_get_returns_every_field(open_store):
    store = open_store()
    written = store.write("acme", "planner", "The user prefers window seats", kind="episode",
                          metadata={"topic": "travel", "n": 3}, idempotency_key="k-1",
                          source_session="s-9", source_step=4)
    got = store.get("acme", written.id)
    assert got == written
    assert (got.tenant, got.agent, got.kind) == ("acme", "planner", "episode")
    assert got.text == "The user prefers window seats"
    assert got.metadata == {"topic": "travel", "n": 3}
    assert (got.source_session, got.source_step, got.idempotency_key) == ("s-9", 4, "k-1")
    assert got.created_at == got.updated_at and got.created_at.tzinfo is not None


def test_search_ranks_like_exact_numpy_search(open_store):
    embedder = HashingEmbedder(64)
    store = open_store(embedder)
    texts = random_texts(40)
    ids = [store.write("t", "a", text).id for text in texts]
    for query in ("alpha bravo charlie delta", "item3", "zulu zulu yankee"):
        hits = store.search("t", "a", query, k=7)
        assert len(hits) == 7
        assert_exact_top_k(hits, ids, exact_scores(embedder, texts, query), k=7)


def test_search_filters_by_kind_metadata_and_min_score(open_store):
    embedder = HashingEmbedder(64)
    store = open_store(embedder)
    texts = random_texts(60, seed=1)
    kinds = [("fact", "episode", "summary")[i % 3] for i in range(len(texts))]
    topics = [("travel", "food")[i % 2] for i in range(len(texts))]
    ids = [store.write("t", "a", text, kind=kind, metadata={"topic": topic, "i": i}).id
           for i, (text, kind, topic) in enumerate(zip(texts, kinds, topics))]
    query = "golf hotel india"
    scores = exact_scores(embedder, texts, query)
    keep = lambda i: kinds[i] in ("fact", "summary") and topics[i] == "food"
    hits = store.search("t", "a", query, k=4, kinds=["fact", "summary"], metadata={"topic": "food"})
    assert len(hits) == 4
    assert_exact_top_k(hits, ids, scores, k=4, keep=keep)
    # a filter matching only the memory ranked last still finds it
    worst = int(np.argmin(scores))
    assert [hit.memory.id for hit in store.search("t", "a", query, k=3, metadata={"i": worst})] == [ids[worst]]
    threshold = float(np.sort(scores)[-5])
    hits = store.search("t", "a", query, k=50, min_score=threshold)
    assert len(hits) == int((scores >= threshold).sum()) >= 5
    assert_exact_top_k(hits, ids, scores, k=50, min_score=threshold)


def test_hybrid_search_fuses_keyword_and_vector_ranks(open_store):
    query = "zx4471"
    basis = np.eye(8, dtype=np.float32)
    distractors = [f"lunch note {i}" for i in range(5)]
    vectors = {query: basis[0], "invoice zx4471 was paid": 0.1 * basis[0] + np.sqrt(0.99) * basis[1]}
    for i, text in enumerate(distractors):  # cosines 0.9, 0.8, ... with the query, all above the target's 0.1
        cos = 0.9 - 0.1 * i
        vectors[text] = cos * basis[0] + np.sqrt(1 - cos**2) * basis[2 + i]
    store = open_store(DictEmbedder(vectors))
    for text in distractors + ["invoice zx4471 was paid"]:
        store.write("t", "a", text)
    plain = store.search("t", "a", query, k=6)
    assert plain[-1].memory.text == "invoice zx4471 was paid"
    hybrid = store.search("t", "a", query, k=6, hybrid=True)
    # target: vector rank 6 and keyword rank 1; best distractor: vector rank 1 only
    assert hybrid[0].memory.text == "invoice zx4471 was paid"
    assert hybrid[0].score == pytest.approx(1 / 61 + 1 / 66)
    assert [h.memory.text for h in hybrid[1:]] == distractors
    assert hybrid[1].score == pytest.approx(1 / 61)
    assert [h.memory.text for h in store.search("t", "a", query, k=6, hybrid=True, min_score=0.45)] == distractors


def test_list_pages_through_everything_oldest_first(open_store):
    store = open_store()
    written = [store.write("t", "a" if i % 2 else "b", f"memory number {i}", kind="fact" if i < 5 else "summary")
               for i in range(9)]
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list("t", limit=4, cursor=cursor)
        seen += page.items
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 3 and seen == sorted(written, key=lambda r: (r.created_at, r.id))
    assert [r.id for r in store.list("t", "a").items] == [r.id for r in written if r.agent == "a"]
    assert [r.id for r in store.list("t", kinds=["summary"]).items] == [r.id for r in written[5:]]
    with pytest.raises(MemoryValidationError, match="^cursor"):
        store.list("t", cursor="not-a-cursor")


def test_update_replaces_text_embedding_and_metadata(open_store):
    embedder = HashingEmbedder(64)
    store = open_store(embedder)
    original = store.write("t", "a", "meeting moved to tuesday", metadata={"v": 1})
    store.write("t", "a", "the printer is broken")
    updated = store.update("t", original.id, text="meeting moved to friday afternoon")
    assert updated.text == "meeting moved to friday afternoon" and updated.metadata == {"v": 1}
    assert updated.updated_at >= original.updated_at and updated.created_at == original.created_at
    hit = store.search("t", "a", "friday afternoon", k=1)[0]
    expected = float(embedder.embed(["friday afternoon"])[0] @ embedder.embed([updated.text])[0])
    assert hit.memory.id == original.id and hit.score == pytest.approx(expected, rel=1e-5)
    assert store.update("t", original.id, metadata={"v": 2}).metadata == {"v": 2}
    assert store.get("t", original.id).text == updated.text
    assert store.index_stats()[("t", "a")]["vectors"] == 2
    with pytest.raises(MemoryValidationError, match="^text/metadata"):
        store.update("t", original.id)


def test_delete_removes_memory_everywhere(open_store):
    store = open_store()
    keep = store.write("t", "a", "keep this memory")
    gone = store.write("t", "a", "delete this memory")
    store.delete("t", gone.id)
    with pytest.raises(MemoryNotFound):
        store.get("t", gone.id)
    with pytest.raises(MemoryNotFound):
        store.delete("t", gone.id)
    assert [h.memory.id for h in store.search("t", "a", "delete this memory", k=5)] == [keep.id]
    assert [r.id for r in store.list("t").items] == [keep.id]


def test_forget_agent_deletes_only_that_agent(open_store):
    store = open_store()
    for i in range(3):
        store.write("t", "forgetful", f"secret {i}")
    other = store.write("t", "other", "unrelated")
    assert store.forget_agent("t", "forgetful") == 3
    assert store.forget_agent("t", "forgetful") == 0
    assert store.search("t", "forgetful", "secret") == []
    with pytest.raises(MemoryNotFound):
        store.list("t", "forgetful")
    assert [r.id for r in store.list("t").items] == [other.id]
    assert store.write("t", "forgetful", "a fresh start").agent == "forgetful"


def test_hnsw_index_beyond_threshold_answers_like_exact_search(open_store):
    embedder = HashingEmbedder(64)
    store = open_store(embedder, hnsw_threshold=16)
    texts = random_texts(48, seed=2)
    ids = [store.write("t", "a", text).id for text in texts]
    assert store.index_stats()[("t", "a")]["kind"] == "hnsw"
    for query in ("kilo lima mike", "tango uniform", "zulu alpha item7"):
        assert_exact_top_k(store.search("t", "a", query, k=5), ids, exact_scores(embedder, texts, query), k=5)


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.write("t", "a", ""), "text"),
    (lambda s: s.write("t", "a", "   \n"), "text"),
    (lambda s: s.write("t", "a", "x" * 101), "text"),
    (lambda s: s.write("t", "a", b"bytes"), "text"),
    (lambda s: s.write("t", "a", "ok", kind="opinion"), "kind"),
    (lambda s: s.write("t", "a", "ok", metadata={"x": float("nan")}), "metadata"),
    (lambda s: s.write("t", "a", "ok", metadata={"x": object()}), "metadata"),
    (lambda s: s.write("t", "a", "ok", metadata=["not", "a", "dict"]), "metadata"),
    (lambda s: s.write("t", "a", "ok", source_step=-1), "source_step"),
    (lambda s: s.write("t", "a", "ok", idempotency_key=""), "idempotency_key"),
    (lambda s: s.write("", "a", "ok"), "tenant"),
    (lambda s: s.write("t", None, "ok"), "agent"),
    (lambda s: s.write("t", "a" * 129, "ok"), "agent"),
    (lambda s: s.search("t", "a", "q", k=0), "k"),
    (lambda s: s.search("t", "a", "q", kinds=["fact", "rumour"]), "kinds"),
    (lambda s: s.search("t", "a", "q", min_score=float("nan")), "min_score"),
    (lambda s: s.search("t", "a", ""), "query"),
    (lambda s: s.list("t", limit=0), "limit"),
    (lambda s: s.get("t", 42), "memory_id"),
])
def test_bad_input_raises_validation_error_naming_the_field(open_store, call, field):
    store = open_store(max_text_chars=100)
    store.write("t", "a", "an existing memory")
    with pytest.raises(MemoryValidationError, match=f"^{field}"):
        call(store)
    assert len(store.list("t").items) == 1


def test_nan_embedding_is_rejected_and_nothing_is_written(open_store):
    store = open_store(NaNEmbedder())
    with pytest.raises(MemoryValidationError, match="^text: its embedding is not finite"):
        store.write("t", "a", "anything")
    assert store.list("t").items == []
    assert store.search("t", "a", "anything") == []


def test_unknown_agent_and_missing_memory_raise_not_found(open_store):
    store = open_store()
    with pytest.raises(MemoryNotFound, match="nobody"):
        store.list("t", "nobody")
    for call in (lambda: store.get("t", "no-such-id"), lambda: store.delete("t", "no-such-id"),
                 lambda: store.update("t", "no-such-id", text="x")):
        with pytest.raises(MemoryNotFound, match="no-such-id"):
            call()
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get("t", "no-such-id")
