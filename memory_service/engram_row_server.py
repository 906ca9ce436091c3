"""`EngramRowServer`: one shard of a model's Engram tables, answering a step's lookups for all layers at once.

It is what a memory-service replica runs as its own Ray actor (`runtime/serve/engram_rows.py`) so that model
workers call it directly, without a Serve request per engine step; the class itself knows nothing of Ray.
`lookup_many(model, {layer: global ids [n]})` answers {layer: rows} either as fp32 rows or, with
`encoded=True`, in the table's own format (`memory_service.engram_wire`: FP8 bytes + scales, 3.9x fewer
bytes), and counts what it served (`traffic()`), so the wire's bytes per token can be checked against the
capacity model (docs/capacity.md).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from memory_service.engram_tables import EngramTableStore
from memory_service.engram_wire import encoded_nbytes, ids_tensor

TRAFFIC_KEYS = ("requests", "ids", "id_bytes", "row_bytes")


class EngramRowServer:
    """The rows `shard_ranges(rows, num_shards)[shard]` of every Engram layer of the checkpoint at `path`,
    served as model `model`."""

    def __init__(self, path: str | Path, model: str, *, shard: int = 0, num_shards: int = 1,
                 hot_cache_rows: int = 65536) -> None:
        self.model, self.shard, self.num_shards = model, shard, num_shards
        self.store = EngramTableStore(hot_cache_rows=hot_cache_rows)
        self.store.add_model(model, path, shard=shard, num_shards=num_shards)
        self._counts = dict.fromkeys(TRAFFIC_KEYS, 0)
        self._lock = threading.Lock()

    def info(self, model: str) -> dict:
        """{"shard", "num_shards", "layer_rows": {layer: rows of the whole table}} (ValueError: not served)."""
        return {"shard": self.shard, "num_shards": self.num_shards, "layer_rows": self.store.layer_rows(model)}

    def lookup_many(self, model: str, requests: Mapping[int, torch.Tensor], encoded: bool = False) -> dict:
        """{layer: global row ids int64 [n] of this shard (tensor or numpy array)} -> {layer: rows fp32
        [n, head_dim]}, or with encoded=True {layer: `encode_rows` output}."""
        if not isinstance(requests, Mapping):
            raise TypeError(f"requests: expected {{layer: hash ids}}, got {type(requests).__name__}")
        requests = {layer: ids_tensor(ids) for layer, ids in requests.items()}  # numpy ids from the direct path
        out: dict[int, Any] = {}
        for layer, ids in requests.items():
            if encoded:
                out[int(layer)] = self.store.lookup_encoded(model, int(layer), ids)
            else:
                out[int(layer)] = self.store.lookup(model, int(layer), ids, out_dtype=torch.float32)
        with self._lock:
            self._counts["requests"] += 1
            for ids in requests.values():
                self._counts["ids"] += ids.numel()
                self._counts["id_bytes"] += ids.numel() * ids.element_size()
            self._counts["row_bytes"] += sum(encoded_nbytes(rows) if encoded else rows.numel() * rows.element_size()
                                             for rows in out.values())
        return out

    def traffic(self, reset: bool = False) -> dict[str, int]:
        """What `lookup_many` served since the start (or the last reset): requests, ids, id and row bytes."""
        with self._lock:
            counts = dict(self._counts)
            if reset:
                self._counts = dict.fromkeys(TRAFFIC_KEYS, 0)
        return counts

    def stats(self) -> dict:
        """The store's per-layer figures (`EngramTableStore.stats`)."""
        return self.store.stats()

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        self.store.close()
