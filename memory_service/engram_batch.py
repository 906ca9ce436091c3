"""The engine's batched `EngramTableClient`: all Engram layers of a step in one request per shard.

`BatchedEngramClient.lookup_many({layer: hash_ids})` routes every layer's ids to their row-range shards
(`shard_ranges`, as `ShardedEngramClient` does), starts one request per shard that holds any of them
(`shard.start_many(model, {layer: global ids [n]})`, which returns something with `.result()` -> {layer:
rows [n, head_dim] fp32}), then waits for all and puts each layer's rows back in the order of its ids. The
requests run at the same time when the shards' `start_many` does not block (remote handles);
`start_lookup_many` returns after sending them, so a caller can compute while they are in flight. `lookup(layer,
ids)` is `lookup_many` with one layer, so the client also works where per-layer calls are made.

`StoreShard` adapts an in-process `EngramTableStore` / `MemoryService` (anything with `lookup(model, layer,
ids, out_dtype)`) to `start_many`. Transport (Ray handles) lives in `runtime/serve/`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from memory_service.engram_client import check_lookup
from memory_service.sharding import shard_of, shard_ranges


class PendingRows(Protocol):
    def result(self) -> Mapping[int, torch.Tensor]:
        ...


class BatchedShard(Protocol):
    def start_many(self, model: str, requests: dict[int, torch.Tensor]) -> PendingRows:
        """Start looking up {layer: global row ids int64 [n] in this shard's range}; the result is
        {layer: rows fp32 [n, head_dim]}."""
        ...


class StoreShard:
    """A BatchedShard over an in-process shard (`EngramTableStore` or `MemoryService`): looks up at once."""

    def __init__(self, store: Any) -> None:
        if not callable(getattr(store, "lookup", None)):
            raise TypeError(f"store: {type(store).__name__} has no lookup()")
        self.store = store

    def start_many(self, model: str, requests: dict[int, torch.Tensor]) -> Future:
        done: Future = Future()
        try:
            done.set_result({layer: self.store.lookup(model, layer, ids, out_dtype=torch.float32)
                             for layer, ids in requests.items()})
        except Exception as exc:
            done.set_exception(exc)
        return done


class PendingLookup:
    """A `start_lookup_many` in flight: `result()` waits for every shard's answer and puts each layer's rows
    back in the order of its ids (once; later calls return the same rows or raise the same error)."""

    def __init__(self, client: BatchedEngramClient, requests: dict, plans: dict, pending: dict) -> None:
        self.client, self.requests, self.plans, self.pending = client, requests, plans, pending
        self._rows: dict[int, torch.Tensor] | None = None
        self._error: BaseException | None = None

    def result(self) -> dict[int, torch.Tensor]:
        if self._rows is None and self._error is None:
            try:
                answers = {i: p.result() for i, p in self.pending.items()}
                self._rows = self.client._assemble(self.requests, self.plans, answers)
            except BaseException as exc:
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._rows


class BatchedEngramClient:
    """EngramTableClient (`lookup`, `lookup_many`) for one model whose tables are split by row range over
    `shards` (shard i holds rows `shard_ranges(rows, len(shards))[i]` of every layer)."""

    def __init__(self, model: str, shards: Sequence[BatchedShard], layers_rows: dict[int, int]) -> None:
        if not shards:
            raise ValueError("shards: need at least one shard")
        for i, shard in enumerate(shards):
            if not callable(getattr(shard, "start_many", None)):
                raise TypeError(f"shards[{i}]: {type(shard).__name__} has no start_many()")
        if not layers_rows:
            raise ValueError("layers_rows: need at least one Engram layer")
        for layer, rows in layers_rows.items():
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ValueError(f"layers_rows[{layer}]: expected a row count >= 1, got {rows!r}")
        self.model = model
        self.shards = list(shards)
        self.layers_rows = dict(layers_rows)
        self.ranges = {layer: shard_ranges(rows, len(self.shards)) for layer, rows in self.layers_rows.items()}
        self.requests = 0  # lookup_many calls
        self.shard_requests = 0  # requests sent to shards (at most one per shard per lookup_many)

    def lookup(self, layer_id: int, hash_ids: torch.Tensor) -> torch.Tensor:
        """hash_ids int64 [...] -> rows fp32 [..., head_dim], in the order of hash_ids."""
        return self.lookup_many({layer_id: hash_ids})[layer_id]

    def lookup_many(self, requests: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: hash_ids int64 [...]} -> {layer: rows fp32 [..., head_dim]}: one request per shard involved."""
        return self.start_lookup_many(requests).result()

    def start_lookup_many(self, requests: Mapping[int, torch.Tensor]) -> PendingLookup:
        """`lookup_many` in two halves: send the shards their requests now (without waiting, where the shards'
        `start_many` does not block) and return what `.result()` waits on and reassembles."""
        for layer, hash_ids in requests.items():
            self._check(layer, hash_ids)
        per_shard: dict[int, dict[int, torch.Tensor]] = {}
        plans = {}  # layer: (order, counts); order None: one shard, rows come back in the ids' order
        for layer, hash_ids in requests.items():
            flat = hash_ids.reshape(-1).to(device="cpu", dtype=torch.int64)
            if len(self.shards) == 1:
                per_shard.setdefault(0, {})[layer] = flat
                plans[layer] = (None, [flat.numel()])
                continue
            shard_index = shard_of(flat, self.ranges[layer])  # [n]
            order = torch.argsort(shard_index, stable=True)
            counts = torch.bincount(shard_index, minlength=len(self.shards)).tolist()
            for i, ids in enumerate(torch.split(flat[order], counts)):
                if ids.numel():
                    per_shard.setdefault(i, {})[layer] = ids
            if not flat.numel():  # no ids: ask shard 0 for an empty batch, which also gives head_dim
                per_shard.setdefault(0, {})[layer] = flat
            plans[layer] = (order, counts)
        pending = {i: self.shards[i].start_many(self.model, reqs) for i, reqs in sorted(per_shard.items())}
        self.requests += 1
        self.shard_requests += len(pending)
        return PendingLookup(self, dict(requests), plans, pending)

    def _assemble(self, requests: Mapping[int, torch.Tensor], plans: dict, answers: dict) -> dict[int, torch.Tensor]:
        out = {}
        for layer, hash_ids in requests.items():
            order, counts = plans[layer]
            if order is None:
                rows = self._rows_of(answers, 0, layer, counts[0])  # [n, head_dim]
                out[layer] = rows.reshape(*hash_ids.shape, rows.shape[-1]).to(hash_ids.device)
                continue
            parts = []
            for i, count in enumerate(counts):
                if count or (not order.numel() and i == 0):
                    parts.append(self._rows_of(answers, i, layer, count))
            rows = torch.cat(parts) if len(parts) > 1 else parts[0]  # [n, head_dim], shard order
            placed = torch.empty_like(rows)
            placed[order] = rows
            out[layer] = placed.reshape(*hash_ids.shape, rows.shape[-1]).to(hash_ids.device)
        return out

    def _rows_of(self, answers: dict, shard: int, layer: int, count: int) -> torch.Tensor:
        rows = answers[shard].get(layer) if isinstance(answers[shard], Mapping) else None
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] != count \
                or rows.dtype != torch.float32:
            raise RuntimeError(f"Engram shard {shard} of model {self.model!r} returned "
                               f"{getattr(rows, 'shape', type(rows).__name__)} {getattr(rows, 'dtype', '')} "
                               f"for {count} ids of layer {layer} (expected fp32 [{count}, head_dim])")
        return rows

    def _check(self, layer_id: int, hash_ids: torch.Tensor) -> None:
        check_lookup(self.model, self.layers_rows, layer_id, hash_ids)

    def close(self) -> None:
        pass
