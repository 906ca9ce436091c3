"""How simulated sessions retrieve memories: the memory block of each step and `memory_search`'s hits.

Two ways, one interface (`ranked`):
- `WordOverlap` (the default, the data of every run before `--runtime-retrieval`): a memory scores by the
  share of its words the query holds, plus noise, squeezed into the range a sentence embedder's cosines take.
- `EmbedderRetrieval`: the runtime's own embedder (all-MiniLM-L6-v2, as `memory_service.agent_memory` ranks
  memories), so the scores and orders a model trains on are the ones it meets through the runtime: the asked
  fact at 0.8-0.9 in a search's hits, and a later step's memory block (queried with the task and the last
  observation, as the orchestrator queries) lower, led by what the search returned. Its retrieval finds, at a
  later step, a memory the first step's retrieval missed, as the runtime's does once the observation names it.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
CACHE_TEXTS = 50_000  # embeddings kept (memory texts repeat within a session; queries mostly do not)


class Retrieval(Protocol):
    """Ranks memories ({"id", "kind", "text"}-bearing objects) for a query, as the runtime's retrieval would."""

    refinds_later: bool  # a later step's retrieval finds what the first step's missed

    def ranked(self, memories: list[Any], query: str, k: int, rng) -> list[dict[str, Any]]:
        """The top k as retrieval returns them: [{"id", "kind", "text", "score"}], best first."""
        ...


def _hits(scored: list[tuple[float, Any]], k: int) -> list[dict[str, Any]]:
    scored.sort(key=lambda pair: -pair[0])
    return [{"id": m.id, "kind": m.kind, "text": m.text, "score": round(score, 4)} for score, m in scored[:k]]


class WordOverlap:
    """Word overlap plus noise, into the range of an embedder's cosines (no model; the earlier runs' data)."""

    refinds_later = False

    def ranked(self, memories: list[Any], query: str, k: int, rng) -> list[dict[str, Any]]:
        words = set(_WORD.findall(query.lower()))
        scored = []
        for memory in memories:
            own = set(_WORD.findall(memory.text.lower()))
            overlap = len(words & own) / max(1, len(own))
            scored.append((min(0.95, 0.12 + 0.7 * overlap + rng.uniform(-0.06, 0.06)), memory))
        return _hits(scored, k)


class EmbedderRetrieval:
    """Cosine similarity of the runtime's sentence embeddings (deterministic, cached per text)."""

    refinds_later = True

    def __init__(self, embedder=None) -> None:
        if embedder is None:
            from memory_service.agent_memory.embedder import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        self.embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def vectors(self, texts: list[str]) -> np.ndarray:
        """texts [N] -> float32 [N, dim] unit rows, embedding only the texts not seen before."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
            if missing:
                if len(self._vectors) + len(missing) > CACHE_TEXTS:
                    self._vectors.clear()
                self._vectors.update(zip(missing, self.embedder.embed(missing)))
            return np.stack([self._vectors[t] for t in texts])

    def ranked(self, memories: list[Any], query: str, k: int, rng=None) -> list[dict[str, Any]]:
        if not memories:
            return []
        vectors = self.vectors([query] + [m.text for m in memories])  # [1 + N, dim]
        cosines = vectors[1:] @ vectors[0]  # [N]
        return _hits([(float(c), m) for c, m in zip(cosines, memories)], k)


WORD_OVERLAP = WordOverlap()


@lru_cache(maxsize=1)
def runtime_retrieval() -> EmbedderRetrieval:
    """One EmbedderRetrieval per process (the embedder loads once; worker processes make their own)."""
    return EmbedderRetrieval()


class MixedRetrieval:
    """Each session ranks with the runtime's embedder with probability `share`, else by word overlap: data
    that keeps the earlier runs' sessions beside runtime-like ones (a model tuned on runtime-like data alone
    lost recalls it had made from word-overlap data; docs/training.md, stage 10; stage 11 tried this mix)."""

    def __init__(self, share: float, runtime: Retrieval, plain: Retrieval = WORD_OVERLAP) -> None:
        if not 0.0 < share < 1.0:
            raise ValueError(f"share of runtime-like sessions must be in (0, 1), got {share}")
        self.share, self.runtime, self.plain = share, runtime, plain

    def for_session(self, rng) -> Retrieval:
        """The retrieval of one session (every step of a session ranks the same way)."""
        return self.runtime if rng.random() < self.share else self.plain


def retrieval_for(runtime_share: float) -> Retrieval | MixedRetrieval:
    """Word overlap (0), the runtime's embedder (1, or True), or a per-session mix of the two."""
    share = float(runtime_share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share of runtime-like sessions must be in [0, 1], got {runtime_share}")
    if share == 0.0:
        return WORD_OVERLAP
    return runtime_retrieval() if share == 1.0 else MixedRetrieval(share, runtime_retrieval())
