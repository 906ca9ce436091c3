"""The simulator's runtime-like retrieval (model_worker/training/retrieval.py) against the memory service's own
search, and what it changes in the simulated sessions. A feature-hashing embedder stands in for MiniLM (the
same code path, fast): the claim under test is "ranks as the memory store ranks with the same embedder"."""

from __future__ import annotations

import json
import random

import pytest

from memory_service.agent_memory import AgentMemoryStore
from memory_service.agent_memory.embedder import HashingEmbedder
from model_worker.training import traces
from model_worker.training.retrieval import WORD_OVERLAP, EmbedderRetrieval, MixedRetrieval, retrieval_for


def _store_memories(seed: int) -> list[traces.Memory]:
    generator = traces.TraceGenerator(seed)
    memories: list[traces.Memory] = []
    while len(memories) < 12:
        fact = generator.person_fact()
        memories += generator.prior_store(fact) + generator.stored_memories(fact)
    return memories


def test_embedder_retrieval_ranks_as_the_memory_store(tmp_path):
    embedder = HashingEmbedder(64)
    memories = _store_memories(3)
    store = AgentMemoryStore(f"sqlite:///{tmp_path / 'memory.db'}", embedder)
    ids = {}
    for memory in memories:
        ids[store.write("t", "a", memory.text, kind=memory.kind).id] = memory.id
    retrieval = EmbedderRetrieval(embedder)
    fact_key = memories[-1].text.split(" is ")[0].removeprefix("Task: ")
    for query in (fact_key, f"What is {fact_key}?", memories[0].text):
        hits = retrieval.ranked(memories, query, 5)
        expected = store.search("t", "a", query, k=5)
        assert [h["id"] for h in hits] == [ids[e.memory.id] for e in expected]
        assert [h["score"] for h in hits] == [round(e.score, 4) for e in expected]
        assert [h["text"] for h in hits] == [e.memory.text for e in expected]
    store.close()


def _last_block_and_hits(session: list[traces.Example]) -> tuple[str, list[dict]]:
    last = session[-1]
    hits = json.loads(last.messages[-1]["content"])[-1]["result"]["hits"]
    return last.messages[0]["content"], hits


def test_runtime_retrieval_shows_a_found_fact_in_the_next_block():
    """The runtime's retrieval after a search queries with the task and the search's observation, so the fact the
    first step's retrieval missed shows in the block beside the hits; word overlap keeps it hidden (the earlier
    runs' data)."""
    for retrieval, shows in ((EmbedderRetrieval(HashingEmbedder(64)), True), (WORD_OVERLAP, False)):
        generator = traces.TraceGenerator(11, retrieval=retrieval)
        checked = 0
        while checked < 10:
            session = generator.session("recall_search")
            answer = json.loads(session[-1].target)["answer"]
            if len(session) != 2 or answer.startswith("I have no memory"):
                continue
            first_block = session[0].messages[0]["content"]
            block, hits = _last_block_and_hits(session)
            assert answer not in first_block and any(answer in h["text"] for h in hits)
            assert (answer in block) is shows
            checked += 1


def test_runtime_retrieval_scores_are_the_embedders_cosines():
    """Hits carry the embedder's cosine (best first), the block's query holds the runtime's idempotency key
    format (session id:step:call)."""
    embedder = HashingEmbedder(64)
    generator = traces.TraceGenerator(5, retrieval=EmbedderRetrieval(embedder))
    for _ in range(20):
        session = generator.session("refusal")
        if len(session) < 2:
            continue
        query = json.loads(session[0].target)["calls"][0]["arguments"]["query"]
        _, hits = _last_block_and_hits(session)
        if not hits:
            continue
        vectors = embedder.embed([query] + [h["text"] for h in hits])
        assert [h["score"] for h in hits] == [round(float(v @ vectors[0]), 4) for v in vectors[1:]]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        return
    raise AssertionError("no refusal session searched and got hits")


def test_word_overlap_keeps_its_range_and_draws():
    rng_a, rng_b = random.Random(1), random.Random(1)
    memories = _store_memories(4)
    hits = WORD_OVERLAP.ranked(memories, "Lena's home city", 5, rng_a)
    assert all(0.06 <= h["score"] <= 0.95 for h in hits)
    for _ in memories:  # one noise draw per memory, as the data of earlier runs
        rng_b.uniform(-0.06, 0.06)
    assert rng_a.random() == rng_b.random()


class _Logged:
    """A retrieval that notes its name in a shared log each time it ranks."""

    def __init__(self, inner, name: str, log: list[str]) -> None:
        self.inner, self.name, self.log = inner, name, log
        self.refinds_later = inner.refinds_later

    def ranked(self, memories, query, k, rng=None):
        self.log.append(self.name)
        return self.inner.ranked(memories, query, k, rng)


def test_mixed_retrieval_draws_one_retrieval_per_session():
    """About the share of sessions ranks with the runtime-like retrieval, the rest with word overlap, and a
    session never switches between its steps (its block, its search and the next block rank alike)."""
    log: list[str] = []
    runtime = _Logged(EmbedderRetrieval(HashingEmbedder(64)), "runtime", log)
    plain = _Logged(WORD_OVERLAP, "plain", log)
    generator = traces.TraceGenerator(6, retrieval=MixedRetrieval(0.3, runtime, plain))
    drawn = []
    for _ in range(80):
        log.clear()
        generator.session("refusal")
        assert len(log) >= 2 and len(set(log)) == 1, log
        drawn.append(log[0])
    assert 12 <= drawn.count("runtime") <= 36, drawn.count("runtime")


def test_retrieval_for_a_share():
    assert retrieval_for(0) is WORD_OVERLAP
    assert retrieval_for(False) is WORD_OVERLAP
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="share"):
            retrieval_for(bad)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="share"):
            MixedRetrieval(bad, WORD_OVERLAP)


def test_the_training_command_takes_a_share(tmp_path, capsys):
    from model_worker.training.__main__ import _share, main

    assert _share("0.5") == 0.5 and _share("1") == 1.0
    for bad in ("2", "-0.1", "half"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "run"), "--runtime-retrieval", bad])
        assert exit_info.value.code == 2
        assert "--runtime-retrieval" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
