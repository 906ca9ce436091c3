"""The vector index of one (tenant, agent): faiss inner product over unit vectors, keyed by memory id.

Exact (IndexFlatIP) while the agent has at most `hnsw_threshold` memories, HNSW (IndexHNSWFlat, inner
product) beyond; the exact index lives on the GPU when faiss has one (HNSW stays on the CPU). faiss HNSW
cannot delete, so removal and replacement leave tombstones: searches skip them (an IDSelectorBitmap of the
live positions, or over-fetching on the GPU) and the index is rebuilt from its live vectors once tombstones
pass a bound. This class holds vectors and ids only: no texts, no database, no locking (the store serialises
calls per agent); it is a cache that the store rebuilds from the database.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

_gpu_resources = None


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)


class VectorIndex:
    """Unit vectors [dim] of one agent's memories; `search` returns (memory id, inner product) best first."""

    def __init__(self, dim: int, *, hnsw_threshold: int = 5000, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 128, use_gpu: bool | None = None) -> None:
        for name, value, low in (("dim", dim, 1), ("hnsw_threshold", hnsw_threshold, 0), ("hnsw_m", hnsw_m, 4),
                                 ("ef_construction", ef_construction, 1), ("ef_search", ef_search, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        if use_gpu and not gpu_available():
            raise ValueError("use_gpu: this faiss build sees no GPU (faiss-cpu, or no CUDA device)")
        self.use_gpu = gpu_available() if use_gpu is None else bool(use_gpu)
        self._ids: list[str | None] = []  # faiss position -> memory id; None marks a tombstone
        self._positions: dict[str, int] = {}  # memory id -> faiss position of its live vector
        self._live = np.zeros(0, dtype=bool)  # [ntotal] position is live: a view of the start of _live_buffer
        self._live_buffer = self._live  # grown by doubling, so an add does not copy every flag
        self._bitmap: np.ndarray | None = None  # packed `_live` that a search's IDSelectorBitmap points into
        self.kind = "flat"
        self._index = self._new_index("flat")

    def __len__(self) -> int:
        return len(self._positions)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._positions

    @property
    def tombstones(self) -> int:
        return len(self._ids) - len(self._positions)

    def _new_index(self, kind: str) -> faiss.Index:
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        index = faiss.IndexFlatIP(self.dim)
        return _to_gpu(index) if self.use_gpu else index

    def _check_vectors(self, vectors: np.ndarray, rows: int) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.dtype != np.float32:
            raise TypeError(f"vectors: expected float32, got {vectors.dtype}")
        if vectors.shape != (rows, self.dim):
            raise ValueError(f"vectors: expected shape {(rows, self.dim)}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors: must be finite (NaN or inf found)")
        return np.ascontiguousarray(vectors)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add memories ids [N] with vectors [N, dim]; an id already present gets the new vector."""
        ids = list(ids)
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) for i in ids):
            raise ValueError("ids: expected distinct str memory ids")
        vectors = self._check_vectors(vectors, len(ids))
        self._bury([i for i in ids if i in self._positions])
        if self.kind == "flat" and len(self) + len(ids) > self.hnsw_threshold:
            self._rebuild(extra_ids=ids, extra_vectors=vectors)
            return
        self._append(ids, vectors)
        self._maybe_compact()

    def remove(self, ids: Sequence[str]) -> int:
        """Drop memories by id (ids not present are ignored); returns how many were present."""
        present = [i for i in dict.fromkeys(ids) if i in self._positions]
        self._bury(present)
        self._maybe_compact()
        return len(present)

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """query [dim] -> up to k (memory id, inner product), highest first."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        query = self._check_vectors(np.asarray(query).reshape(1, -1) if np.ndim(query) == 1 else query, 1)
        k = min(k, len(self))
        if k == 0:
            return []
        dead = self.tombstones
        if dead == 0 or self.kind == "hnsw" or not self.use_gpu:
            scores, positions = self._index.search(query, k, params=self._search_params(k, dead))
        else:  # GPU exact index: no selectors there, so over-fetch past the tombstones
            scores, positions = self._index.search(query, min(k + dead, len(self._ids)))
        hits = [(self._ids[p], float(s)) for s, p in zip(scores[0], positions[0]) if p >= 0 and self._live[p]]
        return hits[:k]

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """ids [N] (present ones) -> their vectors [N, dim]."""
        return np.stack([self._index.reconstruct(self._positions[i]) for i in ids]) if len(ids) else \
            np.zeros((0, self.dim), np.float32)

    def _search_params(self, k: int, dead: int):
        selector = None
        if dead:
            self._bitmap = np.packbits(self._live, bitorder="little")  # kept alive while faiss reads it
            selector = faiss.IDSelectorBitmap(len(self._live), faiss.swig_ptr(self._bitmap))
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, k))
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _append(self, ids: list[str], vectors: np.ndarray) -> None:
        start = len(self._ids)
        if len(ids):
            self._index.add(vectors)
        self._ids.extend(ids)
        self._positions.update((memory_id, start + n) for n, memory_id in enumerate(ids))
        end = start + len(ids)
        if end > len(self._live_buffer):
            buffer = np.zeros(max(end, 2 * len(self._live_buffer), 64), dtype=bool)
            buffer[:start] = self._live
            self._live_buffer = buffer
        self._live_buffer[start:end] = True
        self._live = self._live_buffer[:end]

    def _bury(self, ids: list[str]) -> None:
        for memory_id in ids:
            position = self._positions.pop(memory_id)
            self._ids[position] = None
            self._live[position] = False

    def _maybe_compact(self) -> None:
        limit = 256 if self.use_gpu and self.kind == "flat" else max(1024, len(self._ids) // 5)
        if self.tombstones > limit:
            self._rebuild()

    def _rebuild(self, extra_ids: Sequence[str] = (), extra_vectors: np.ndarray | None = None) -> None:
        """A fresh index of the live vectors (plus extras), exact or HNSW by size; tombstones are dropped."""
        live = np.flatnonzero(self._live)
        ids = [self._ids[p] for p in live] + list(extra_ids)
        vectors = self._index.reconstruct_n(0, len(self._ids))[live] if len(self._ids) else \
            np.zeros((0, self.dim), np.float32)
        if extra_vectors is not None:
            vectors = np.concatenate([vectors, extra_vectors])
        self.kind = "hnsw" if len(ids) > self.hnsw_threshold else "flat"
        self._index = self._new_index(self.kind)
        self._ids, self._positions = [], {}
        self._live = self._live_buffer = np.zeros(0, dtype=bool)
        self._append(ids, np.ascontiguousarray(vectors, dtype=np.float32))
