"""The engine's `EngramTableClient` over sharded table replicas: route each hash id to its shard, fan out,
reassemble in order.

Shard i of every layer holds the rows `shard_ranges(rows, len(shards))[i]`. A shard is anything with
`lookup(model, layer, hash_ids, out_dtype=...) -> rows` taking global row ids (an `EngramTableStore` or a
`MemoryService` in-process, or a wrapper around a remote handle); a shard that also has `models()` is asked
when the client is created whether it serves the model, so a wrong name fails there, not at the first
lookup. Transport, retries and replica discovery are not this module's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from memory_service.sharding import shard_of, shard_ranges

ID_DTYPES = (torch.int64, torch.int32)


def check_id_type(hash_ids: object) -> None:
    """TypeError unless hash_ids is an int64 (or int32) tensor: what the in-process tables raise (the kernel's
    argument check), so one bad input raises one error type whichever side serves the tables."""
    if not isinstance(hash_ids, torch.Tensor) or hash_ids.dtype not in ID_DTYPES:
        got = getattr(hash_ids, "dtype", type(hash_ids).__name__)
        raise TypeError(f"hash_ids: expected an int64 (or int32) tensor, got {got}")


class EngramShard(Protocol):
    def lookup(self, model: str, layer: int, hash_ids: torch.Tensor,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Global row ids of this shard's range, int64 [n] -> rows [n, head_dim]."""
        ...


class ShardedEngramClient:
    """EngramTableClient for one model whose tables are split by row range over `shards`."""

    def __init__(self, model: str, shards: Sequence[EngramShard], layers_rows: dict[int, int], *,
                 parallel_min_ids: int = 8192) -> None:
        """parallel_min_ids: fan out to shards on threads from this many ids per lookup (below it, one after
        another: a thread hand-off costs more than an in-process shard's lookup). 0 for remote shards."""
        if not shards:
            raise ValueError("shards: need at least one shard")
        for i, shard in enumerate(shards):
            if not callable(getattr(shard, "lookup", None)):
                raise TypeError(f"shards[{i}]: {type(shard).__name__} has no lookup()")
            served = shard.models() if callable(getattr(shard, "models", None)) else None
            if served is not None and model not in served:
                raise ValueError(f"model: {model!r} is not served by shards[{i}] (it serves {sorted(served)})")
        if not layers_rows:
            raise ValueError("layers_rows: need at least one Engram layer")
        for layer, rows in layers_rows.items():
            if not isinstance(rows, int) or rows < 1:
                raise ValueError(f"layers_rows[{layer}]: expected a row count >= 1, got {rows!r}")
        self.model = model
        self.parallel_min_ids = parallel_min_ids
        self.shards = list(shards)
        self.layers_rows = dict(layers_rows)
        self.ranges = {layer: shard_ranges(rows, len(self.shards)) for layer, rows in self.layers_rows.items()}
        self._fanout = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="engram-shard") \
            if len(self.shards) > 1 else None
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-client-prefetch")

    def lookup(self, layer_id: int, hash_ids: torch.Tensor) -> torch.Tensor:
        """hash_ids int64 [...] -> rows fp32 [..., head_dim], in the order of hash_ids."""
        self._check(layer_id, hash_ids)
        flat = hash_ids.reshape(-1)
        ranges = self.ranges[layer_id]
        shard_index = shard_of(flat, ranges)  # [n]
        order = torch.argsort(shard_index, stable=True)
        counts = torch.bincount(shard_index, minlength=len(self.shards)).tolist()
        groups = [(i, ids) for i, ids in enumerate(torch.split(flat[order], counts)) if ids.numel()]
        if not groups:  # no ids: ask one shard for an empty batch, which also gives head_dim
            groups = [(0, flat)]
        if len(groups) == 1 or self._fanout is None or flat.numel() < self.parallel_min_ids:
            parts = [self._shard_lookup(i, layer_id, ids) for i, ids in groups]
        else:
            futures = [self._fanout.submit(self._shard_lookup, i, layer_id, ids) for i, ids in groups]
            parts = [future.result() for future in futures]
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]  # [n, head_dim], shard order
        out = torch.empty_like(rows)
        out[order] = rows
        return out.reshape(*hash_ids.shape, rows.shape[-1])

    def prefetch(self, layer_id: int, hash_ids: torch.Tensor) -> Future:
        """Start `lookup(layer_id, hash_ids)` now; the Future holds its rows (or its error)."""
        return self._prefetch.submit(self.lookup, layer_id, hash_ids)

    def _shard_lookup(self, shard: int, layer_id: int, ids: torch.Tensor) -> torch.Tensor:
        rows = self.shards[shard].lookup(self.model, layer_id, ids, out_dtype=torch.float32)
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != ids.numel():
            raise RuntimeError(f"shard {shard} returned {getattr(rows, 'shape', type(rows))} for "
                               f"{ids.numel()} ids of layer {layer_id}")
        return rows.to(device=ids.device, dtype=torch.float32)

    def _check(self, layer_id: int, hash_ids: torch.Tensor) -> None:
        check_lookup(self.model, self.layers_rows, layer_id, hash_ids)

    def close(self) -> None:
        for pool in (self._fanout, self._prefetch):
            if pool is not None:
                pool.shutdown(wait=False)


def check_lookup(model: str, layers_rows: dict[int, int], layer_id: int, hash_ids: torch.Tensor) -> None:
    """ValueError/TypeError unless `layer_id` has a table and every id is one of its rows."""
    if layer_id not in layers_rows:
        raise ValueError(f"layer_id: model {model!r} has no Engram table for layer {layer_id} "
                         f"(have {sorted(layers_rows)})")
    check_id_type(hash_ids)
    if hash_ids.numel():
        low, high = (int(v) for v in torch.aminmax(hash_ids))
        rows = layers_rows[layer_id]
        if low < 0 or high >= rows:
            raise ValueError(f"hash_ids: layer {layer_id} has rows [0, {rows}), got min {low} max {high}")
