"""Keyword side of hybrid search: an in-memory BM25 index over one agent's memory texts.

Okapi BM25 (k1 = 1.2, b = 0.75, idf = ln(1 + (N - n + 0.5) / (n + 0.5))) over lower-cased word tokens.
Built on demand from the database texts the first time an agent is searched in hybrid mode, then kept up
to date by the store. No stemming, no stop words, no persistence, no locking (the store serialises calls).
"""

from __future__ import annotations

import math
import re
from collections import Counter

TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


class KeywordIndex:
    """BM25 scores of memory texts for a query; `search` returns (memory id, score) best first."""

    def __init__(self, k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._postings: dict[str, dict[str, int]] = {}  # token -> memory id -> term frequency
        self._lengths: dict[str, int] = {}  # memory id -> tokens in its text
        self._terms: dict[str, list[str]] = {}  # memory id -> its distinct tokens
        self._total_length = 0

    def __len__(self) -> int:
        return len(self._lengths)

    def add(self, memory_id: str, text: str) -> None:
        """Index a text (replacing the memory's previous text if any)."""
        self.remove(memory_id)
        counts = Counter(tokens(text))
        for token, tf in counts.items():
            self._postings.setdefault(token, {})[memory_id] = tf
        self._lengths[memory_id] = sum(counts.values())
        self._terms[memory_id] = list(counts)
        self._total_length += self._lengths[memory_id]

    def remove(self, memory_id: str) -> None:
        length = self._lengths.pop(memory_id, None)
        if length is None:
            return
        self._total_length -= length
        for token in self._terms.pop(memory_id):
            del self._postings[token][memory_id]
            if not self._postings[token]:
                del self._postings[token]

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Up to k memories sharing a word with the query, by BM25 score (ties: memory id)."""
        n_docs = len(self._lengths)
        if n_docs == 0:
            return []
        mean_length = self._total_length / n_docs
        scores: dict[str, float] = {}
        for token in set(tokens(query)):
            docs = self._postings.get(token, {})
            idf = math.log(1 + (n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
            for memory_id, tf in docs.items():
                norm = self.k1 * (1 - self.b + self.b * self._lengths[memory_id] / mean_length)
                scores[memory_id] = scores.get(memory_id, 0.0) + idf * tf * (self.k1 + 1) / (tf + norm)
        return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
