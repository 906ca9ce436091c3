"""Hot-row cache for one Engram table: dequantized rows of the most used hash ids.

N-gram use is Zipfian, so a small set of rows takes most lookups. The cache holds at most `capacity`
fp32 rows in a slot pool, indexed by a sorted id array (membership is one `searchsorted`, no per-id
Python). Ids looked up are counted in windows of `window` ids; after each window the cache keeps the
top `capacity` ids by score = count in the window + the previous score halved (a windowed, aged LFU).
An id not yet cached needs two uses in a window to displace a cached one (a doorkeeper: the long tail of
one-off n-grams never churns the cache); while there is room it is admitted anyway. Only rows that enter
are fetched and written, into the slots of rows that left.

It does not know where rows come from (`fetch` is passed in) and never changes a value: a hit returns
exactly the row `fetch` returned when the id was admitted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

SCORE_DECAY = 0.5  # weight of the previous windows' score at each rebuild
ADMIT_COUNT = 2  # uses in one window an uncached id needs to compete for a full cache

Fetch = Callable[[torch.Tensor], torch.Tensor]  # ids int64 [n] -> rows fp32 [n, head_dim]


class HotRowCache:
    """Rows of the most used ids of one table; `lookup(ids, fetch)` serves hits and fetches misses."""

    def __init__(self, capacity: int, head_dim: int, window: int | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"capacity: must be >= 0, got {capacity}")
        if window is not None and window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self.capacity = capacity
        self.head_dim = head_dim
        self.window = window if window is not None else max(capacity, 1024)
        self._pool = torch.empty(0, head_dim)  # fp32 [<= capacity, head_dim], grown as it fills
        self._ids = torch.empty(0, dtype=torch.int64)  # [c] sorted cached ids
        self._slots = torch.empty(0, dtype=torch.int64)  # [c] pool slot of each cached id
        self._scores = torch.empty(0)  # [c]
        self._pending: list[torch.Tensor] = []
        self._pending_ids = 0
        self._lock = threading.Lock()  # index + pool reads/writes, counters, the pending window
        self._rebuild_lock = threading.Lock()  # one rebuild at a time
        self.hits = 0
        self.misses = 0

    @property
    def cached(self) -> int:
        return self._ids.numel()

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def lookup(self, ids: torch.Tensor, fetch: Fetch) -> torch.Tensor:
        """ids int64 [n] (CPU) -> rows fp32 [n, head_dim]; misses come from fetch(missed ids)."""
        with self._lock:
            hit_at, miss_at, found = _match(self._ids, ids)
            hit_rows = self._pool.index_select(0, self._slots.index_select(0, found)) if found.numel() else None
        if hit_rows is None:
            out = fetch(ids)
        else:
            out = torch.empty(ids.numel(), self.head_dim)
            out.index_copy_(0, hit_at, hit_rows)
            if miss_at.numel():
                out.index_copy_(0, miss_at, fetch(ids.index_select(0, miss_at)))
        self._count(ids, hit_at.numel(), fetch)
        return out

    def _count(self, ids: torch.Tensor, n_hits: int, fetch: Fetch) -> None:
        with self._lock:
            self.hits += n_hits
            self.misses += ids.numel() - n_hits
            if not self.capacity:
                return
            self._pending.append(ids.clone())
            self._pending_ids += ids.numel()
            if self._pending_ids < self.window:
                return
            window, self._pending, self._pending_ids = torch.cat(self._pending), [], 0
        with self._rebuild_lock:
            self._rebuild(window, fetch)

    def _rebuild(self, window: torch.Tensor, fetch: Fetch) -> None:
        """Keep the top-`capacity` ids by score; fetch the rows that enter into the slots of those that leave."""
        old_ids, old_slots, old_scores = self._ids, self._slots, self._scores
        seen, counts = torch.unique(window, return_counts=True)
        _, new_at, _ = _match(old_ids, seen)
        scores = counts.float()
        scores[new_at] = torch.where(counts[new_at] >= ADMIT_COUNT, scores[new_at], 0.0)  # the doorkeeper
        candidates, inverse = torch.unique(torch.cat([seen, old_ids]), return_inverse=True)
        total = torch.zeros(candidates.numel()).scatter_add_(0, inverse, torch.cat([scores, old_scores * SCORE_DECAY]))
        top = torch.topk(total, min(self.capacity, candidates.numel())).indices
        ids, order = torch.sort(candidates[top])
        kept_at, entering_at, kept_found = _match(old_ids, ids)
        slots = torch.empty(ids.numel(), dtype=torch.int64)
        slots[kept_at] = old_slots[kept_found]
        free = torch.ones(self.capacity, dtype=torch.bool)
        free[slots[kept_at]] = False
        slots[entering_at] = free.nonzero().squeeze(1)[: entering_at.numel()]
        entering_rows = fetch(ids[entering_at]) if entering_at.numel() else None
        # the pool outlives this call: never an inference tensor, whatever mode the caller runs in
        with self._lock, torch.inference_mode(False):
            needed = int(slots.max()) + 1 if slots.numel() else 0
            if self._pool.shape[0] < needed:  # grow by doubling, up to capacity
                grow = min(self.capacity, max(needed, 2 * self._pool.shape[0])) - self._pool.shape[0]
                self._pool = torch.cat([self._pool, torch.empty(grow, self.head_dim)])
            if entering_rows is not None:
                self._pool.index_copy_(0, slots[entering_at], entering_rows)
            self._ids, self._slots, self._scores = ids, slots, total[top][order]

    def stats(self) -> dict:
        return {"capacity": self.capacity, "cached": self.cached, "hits": self.hits, "misses": self.misses,
                "hit_rate": self.hit_rate}


def _match(cached: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which ids are in the sorted `cached`.  cached int64 [c], ids int64 [n]
    -> (positions in ids found [h], positions not found [n - h], their positions in cached [h])"""
    if cached.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, torch.arange(ids.numel()), empty
    pos = torch.searchsorted(cached, ids).clamp_(max=cached.numel() - 1)
    found = cached[pos] == ids
    hit_at = found.nonzero().squeeze(1)
    return hit_at, (~found).nonzero().squeeze(1), pos.index_select(0, hit_at)
