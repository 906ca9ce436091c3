"""Engram rows across the split: the memory replica's row-server actor, and the model worker's client.

A memory-service replica that serves Engram tables runs them in an `EngramRowServer` Ray actor it starts on its own
node (`start_row_server`; owned by the replica, so it dies with it). Workers ask the replica once, through the
Serve handle, for the actor (`engram_info`), then send each engine step's lookup to the actor directly: a plain Ray
actor call, about 4x cheaper than a Serve request (no router, no replica queue; docs/capacity.md §7), with ids and
rows as numpy arrays (raw buffers to Ray's serializer) and the rows in the table's FP8 bytes
(`memory_service.engram_wire`, 3.9x fewer bytes than fp32). If the actor is gone (its replica or node lost), the
client asks the Serve handle again, which routes to a live (or restarted) replica, and retries once; past that the
step fails with `MemoryServiceUnavailable`, never computing with missing rows. `transport="serve"` keeps the
per-step Serve request (fp32 rows through the replica), the path measured before, for comparison in
benchmarks/engram_remote.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from memory_service.engram_row_server import EngramRowServer
from memory_service.engram_wire import decode_rows, ids_array
from runtime.serve.handles import call, unwrap

TRANSPORTS = ("direct", "serve")


class MemoryServiceUnavailable(RuntimeError):
    """The memory service serving a model's Engram tables could not be reached (or failed a lookup)."""


def start_row_server(path: str | Path, model: str, *, shard: int, num_shards: int, hot_cache_rows: int):
    """Start this replica's `EngramRowServer` actor on this node (no CPU of its own: the replica reserved
    it) and wait until its tables are mapped (raising what loading raised). -> its ActorHandle."""
    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(EngramRowServer).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        str(path), model, shard=shard, num_shards=num_shards, hot_cache_rows=hot_cache_rows)
    try:
        ray.get(actor.ping.remote())
    except Exception as exc:
        ray.kill(actor)
        raise unwrap(exc) from None
    return actor


def _unavailable(model: str, shard: int, num_shards: int, exc: BaseException) -> MemoryServiceUnavailable:
    cause = unwrap(exc)
    return MemoryServiceUnavailable(
        f"Engram rows: the memory service (shard {shard} of {num_shards}) failed or could not be reached for "
        f"model {model!r}: {type(cause).__name__}: {cause}")


class _PendingServeRows:
    """One shard's `engram_lookup_many` Serve request in flight; `result()` blocks (never an event loop)."""

    def __init__(self, response, shard: _ServeShard, model: str):
        self.response, self.shard, self.model = response, shard, model

    def result(self) -> dict:
        try:
            return self.response.result(timeout_s=self.shard.timeout_s)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.response.cancel()
            raise _unavailable(self.model, self.shard.shard, self.shard.num_shards, exc) from None


class _ServeShard:
    """A BatchedShard (memory_service.engram_batch) sending every step as a Serve request to the replica."""

    def __init__(self, handle: DeploymentHandle, shard: int, num_shards: int, timeout_s: float):
        self.handle, self.shard, self.num_shards, self.timeout_s = handle, shard, num_shards, timeout_s

    def start_many(self, model: str, requests: dict) -> _PendingServeRows:
        try:
            response = self.handle.engram_lookup_many.remote(model, requests)
        except Exception as exc:
            raise _unavailable(model, self.shard, self.num_shards, exc) from None
        return _PendingServeRows(response, self, model)


class _PendingActorRows:
    """One shard's lookup in flight on its row-server actor; `result()` blocks, decodes the FP8 bytes, and
    retries once on a fresh actor when this one is gone."""

    def __init__(self, shard: _DirectShard, model: str, requests: dict, actor, ref):
        self.shard, self.model, self.requests, self.actor, self.ref = shard, model, requests, actor, ref

    def result(self) -> dict:
        shard = self.shard
        try:
            try:
                encoded = ray.get(self.ref, timeout=shard.timeout_s)
            except RayActorError:  # the actor died or is unreachable (ActorUnavailableError too)
                actor = shard.refresh(self.actor)
                encoded = ray.get(actor.lookup_many.remote(self.model, self.requests, True), timeout=shard.timeout_s)
            return {int(layer): decode_rows(rows) for layer, rows in encoded.items()}
        except Exception as exc:
            if isinstance(exc, GetTimeoutError):
                with contextlib.suppress(Exception):
                    ray.cancel(self.ref)
            raise _unavailable(self.model, shard.shard, shard.num_shards, exc) from None


class _DirectShard:
    """A BatchedShard calling the shard's row-server actor directly (found through the Serve handle)."""

    def __init__(self, handle: DeploymentHandle, model: str, shard: int, num_shards: int, timeout_s: float, actor):
        self.handle, self.model, self.shard, self.num_shards = handle, model, shard, num_shards
        self.timeout_s, self.actor = timeout_s, actor
        self.refreshes = 0  # times the actor was looked up again after it was gone
        self._lock = threading.Lock()

    def start_many(self, model: str, requests: dict) -> _PendingActorRows:
        actor = self.actor
        requests = {layer: ids_array(ids) for layer, ids in requests.items()}
        try:
            ref = actor.lookup_many.remote(model, requests, True)
        except Exception as exc:
            raise _unavailable(model, self.shard, self.num_shards, exc) from None
        return _PendingActorRows(self, model, requests, actor, ref)

    def refresh(self, gone) -> Any:
        """The actor to use now that `gone` failed: ask the deployment again (from the engine's thread),
        unless another step already did."""
        with self._lock:
            if self.actor is gone:
                info = self.handle.engram_info.remote(self.model).result(timeout_s=self.timeout_s)
                self.actor = info["row_server"]
                self.refreshes += 1
            return self.actor


class _PendingStep:
    """A step's lookup in flight on every shard; `result()` -> {layer: rows fp32}, noting the last error."""

    def __init__(self, client: HandleEngramClient, pending) -> None:
        self.client, self.pending = client, pending

    def result(self) -> dict:
        try:
            rows = self.pending.result()
        except MemoryServiceUnavailable as exc:
            self.client.last_error = str(exc)
            raise
        self.client.last_error = None
        return rows


class HandleEngramClient:
    """The worker's EngramTableClient over the memory deployments' handles (shard i at index i):
    `lookup_many` sends one request per shard for all Engram layers of a step (to each shard's row-server
    actor with transport "direct", as a Serve request with "serve") and waits (from the engine's fetch
    thread) for the rows. Any failure to get them raises `MemoryServiceUnavailable` (a RuntimeError naming
    the memory service)."""

    def __init__(self, model: str, handles: list[DeploymentHandle], infos: list[dict], *, timeout_s: float = 30.0,
                 transport: str = "direct"):
        from memory_service.engram_batch import BatchedEngramClient

        if transport not in TRANSPORTS:
            raise ValueError(f"transport: one of {TRANSPORTS}, got {transport!r}")
        n = len(handles)
        self.model, self.handles, self.timeout_s, self.transport = model, list(handles), timeout_s, transport
        if transport == "direct":
            shards: list[Any] = [_DirectShard(h, model, i, n, timeout_s, info["row_server"])
                                 for i, (h, info) in enumerate(zip(handles, infos))]
        else:
            shards = [_ServeShard(h, i, n, timeout_s) for i, h in enumerate(handles)]
        self.shards = shards
        self.client = BatchedEngramClient(model, shards, infos[0]["layer_rows"])
        self.layers_rows = self.client.layers_rows
        self.last_error: str | None = None

    @classmethod
    async def connect(cls, model: str, handles: list[DeploymentHandle], *, timeout_s: float = 30.0,
                      transport: str = "direct"):
        """Ask every shard what it serves; checks that shard i of len(handles) is at index i and that all
        agree on the table sizes."""
        infos = await cls._infos(model, handles, timeout_s)
        return cls(model, handles, infos, timeout_s=timeout_s, transport=transport)

    @staticmethod
    async def _infos(model: str, handles: list[DeploymentHandle], timeout_s: float) -> list[dict]:
        n = len(handles)
        infos = []
        for i, handle in enumerate(handles):
            try:
                info = await asyncio.wait_for(call(handle.engram_info, model), timeout_s)
            except Exception as exc:
                raise _unavailable(model, i, n, exc) from None
            if (info["shard"], info["num_shards"]) != (i, n):
                raise ValueError(f"engram_shards[{i}]: serves shard {info['shard']} of {info['num_shards']}, "
                                 f"expected shard {i} of {n}")
            if infos and info["layer_rows"] != infos[0]["layer_rows"]:
                raise ValueError(f"engram_shards[{i}]: table rows {info['layer_rows']} differ from shard 0's "
                                 f"{infos[0]['layer_rows']}")
            infos.append(info)
        return infos

    def check_config(self, config) -> None:
        """ValueError unless the served tables are the ones this model's Engram hash addresses."""
        from model_worker.engram_hashing import EngramHasher

        hasher = EngramHasher(config.engram_layer_ids, config.engram_max_ngram_size, config.engram_n_heads,
                              config.engram_vocab_size, config.engram_num_embeddings, 0)
        want = {layer: hasher.table_rows(layer) for layer in config.engram_layer_ids}
        if self.layers_rows != want:
            raise ValueError(f"engram_shards: the memory service serves tables {self.layers_rows} for model "
                             f"{self.model!r}; the checkpoint's Engram layers need {want}")

    def lookup(self, layer_id: int, hash_ids):
        return self.lookup_many({layer_id: hash_ids})[layer_id]

    def lookup_many(self, requests: dict) -> dict:
        return self.start_lookup_many(requests).result()

    def start_lookup_many(self, requests: dict) -> _PendingStep:
        """Send a step's requests to the shards and return at once; `.result()` waits for the rows. Sending
        does not block on either transport, so the engine calls this itself (no fetch thread) and computes
        the layers below the first Engram layer meanwhile."""
        try:
            return _PendingStep(self, self.client.start_lookup_many(requests))
        except MemoryServiceUnavailable as exc:
            self.last_error = str(exc)
            raise

    async def check(self) -> None:
        """Raises MemoryServiceUnavailable unless every shard answers (the worker's health check)."""
        await self._infos(self.model, self.handles, min(self.timeout_s, 10.0))
