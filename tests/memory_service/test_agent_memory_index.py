"""VectorIndex against exact numpy search (flat, HNSW, tombstones, compaction); KeywordIndex against the
BM25 formula worked by hand; the HashingEmbedder against its definition."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memory_service.agent_memory import HashingEmbedder, VectorIndex
from memory_service.agent_memory.index import gpu_available
from memory_service.agent_memory.keywords import KeywordIndex


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(live: dict[str, np.ndarray], query: np.ndarray, k: int) -> list[tuple[str, float]]:
    ids = list(live)
    scores = np.stack([live[i] for i in ids]) @ query
    return [(ids[j], float(scores[j])) for j in np.argsort(-scores)[:k]]


def recall(index: VectorIndex, live: dict[str, np.ndarray], queries: np.ndarray, k: int) -> float:
    found = sum(len({i for i, _ in index.search(q, k)} & {i for i, _ in exact(live, q, k)}) for q in queries)
    return found / (k * len(queries))


def test_flat_index_equals_exact_search_through_adds_updates_and_removals():
    vectors = unit_vectors(300, 32, seed=0)
    index = VectorIndex(32, hnsw_threshold=10_000)
    live = {f"m{i}": v for i, v in enumerate(vectors[:200])}
    index.add(list(live), np.stack(list(live.values())))
    for i in range(0, 200, 4):  # replace every 4th vector, remove every 7th memory
        live[f"m{i}"] = vectors[200 + i // 4]
        index.add([f"m{i}"], vectors[200 + i // 4][None])
    removed = [f"m{i}" for i in range(0, 200, 7)]
    assert index.remove(removed + ["never-added"]) == len(removed)
    for memory_id in removed:
        del live[memory_id]
    assert len(index) == len(live) and index.kind == "flat" and index.tombstones == 50 + len(removed)
    for query in unit_vectors(10, 32, seed=1):
        got, want = index.search(query, 10), exact(live, query, 10)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-6)
    assert len(index.search(unit_vectors(1, 32, seed=2)[0], 1000)) == len(live)


def test_compaction_drops_tombstones_and_keeps_answers():
    vectors = unit_vectors(1500, 8, seed=3)
    index = VectorIndex(8, hnsw_threshold=10_000)
    index.add([f"m{i}" for i in range(1500)], vectors)
    index.remove([f"m{i}" for i in range(1100)])
    assert index.tombstones == 0 and len(index) == 400
    live = {f"m{i}": vectors[i] for i in range(1100, 1500)}
    for query in unit_vectors(5, 8, seed=4):
        assert [i for i, _ in index.search(query, 5)] == [i for i, _ in exact(live, query, 5)]


def test_index_switches_to_hnsw_past_threshold_and_skips_tombstones():
    vectors = unit_vectors(600, 32, seed=5)
    index = VectorIndex(32, hnsw_threshold=100)
    index.add([f"m{i}" for i in range(50)], vectors[:50])
    assert index.kind == "flat"
    for start in range(50, 600, 50):
        index.add([f"m{i}" for i in range(start, start + 50)], vectors[start:start + 50])
    assert index.kind == "hnsw" and len(index) == 600
    index.remove([f"m{i}" for i in range(0, 600, 3)])
    live = {f"m{i}": vectors[i] for i in range(600) if i % 3}
    queries = np.concatenate([unit_vectors(20, 32, seed=6), vectors[:30]])  # includes removed vectors
    assert all(memory_id in live for q in queries for memory_id, _ in index.search(q, 10))
    assert recall(index, live, queries, 10) >= 0.95


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda ix: ix.add(["a"], np.zeros((1, 5), np.float32)), ValueError, "vectors: expected shape"),
    (lambda ix: ix.add(["a"], np.zeros((1, 4), np.float64)), TypeError, "vectors: expected float32"),
    (lambda ix: ix.add(["a"], np.full((1, 4), np.nan, np.float32)), ValueError, "vectors: must be finite"),
    (lambda ix: ix.add(["a", "a"], np.ones((2, 4), np.float32)), ValueError, "ids"),
    (lambda ix: ix.search(np.ones(4, np.float32), 0), ValueError, "k"),
    (lambda ix: VectorIndex(4, hnsw_threshold=-1), ValueError, "hnsw_threshold"),
])
def test_index_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(VectorIndex(4))


@pytest.mark.skipif(gpu_available(), reason="this faiss sees a GPU")
def test_asking_for_a_gpu_index_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="use_gpu"):
        VectorIndex(4, use_gpu=True)


def test_bm25_scores_match_the_formula_by_hand():
    index = KeywordIndex()
    docs = {"d1": "red apple red", "d2": "green apple", "d3": "blue sky today"}
    for memory_id, body in docs.items():
        index.add(memory_id, body)
    mean_len = 8 / 3

    def term(tf, length, docs_with_term):
        idf = math.log(1 + (3 - docs_with_term + 0.5) / (docs_with_term + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / mean_len))

    got = dict(index.search("Red APPLE!", 10))
    assert set(got) == {"d1", "d2"}
    assert got["d1"] == pytest.approx(term(2, 3, 1) + term(1, 3, 2))
    assert got["d2"] == pytest.approx(term(1, 2, 2))
    index.add("d1", "blue whale")  # replacing d1's text equals indexing the final texts from scratch
    index.remove("d3")
    fresh = KeywordIndex()
    fresh.add("d1", "blue whale")
    fresh.add("d2", "green apple")
    assert index.search("blue apple", 10) == fresh.search("blue apple", 10)


def test_hashing_embedder_counts_words_and_bigrams():
    embedder = HashingEmbedder(32)
    expected = np.zeros(32)
    for feature in ("to", "be", "or", "not", "to", "be", "to be", "be or", "or not", "not to", "to be"):
        digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        expected[digest % 32] += 1
    got = embedder.embed(["To be, or NOT to be"])
    np.testing.assert_allclose(got[0], expected / np.linalg.norm(expected), rtol=1e-6)
    assert got.dtype == np.float32 and embedder.embed([]).shape == (0, 32)


def test_hashing_embedder_is_the_same_in_another_process():
    code = ("from memory_service.agent_memory import HashingEmbedder;"
            "print(HashingEmbedder(16).embed(['same text in any process'])[0].tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    np.testing.assert_array_equal(np.array(json.loads(out.stdout), np.float32),
                                  HashingEmbedder(16).embed(["same text in any process"])[0])
