"""Calls across replicas: errors raised in another replica re-raised as themselves, OpenAIError carried as
data, streaming through handles; and the Engram table client that fetches a step's rows from the memory
service deployment(s) (used in the model-worker replica)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from model_worker.openai_protocol import OpenAIError


# ---- errors across replicas ----------------------------------------------------------------------------
@dataclass
class ErrorRecord:
    """An OpenAIError as data (it cannot be pickled as an exception)."""

    status_code: int
    message: str
    param: str | None = None
    code: str | None = None

    @classmethod
    def of(cls, exc: OpenAIError) -> ErrorRecord:
        return cls(exc.status_code, exc.message, exc.param, exc.code)

    def error(self) -> OpenAIError:
        return OpenAIError(self.status_code, self.message, param=self.param, code=self.code)


def unwrap(exc: BaseException) -> BaseException:
    """The exception a replica raised, from the RayTaskError a handle call raised with it."""
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


async def call(method, *args, **kwargs):
    """`await handle.method.remote(...)`, raising what the replica raised."""
    try:
        return await method.remote(*args, **kwargs)
    except RayTaskError as exc:
        raise unwrap(exc) from None


@contextlib.asynccontextmanager
async def streaming(method, *args, **kwargs):
    """An async iterator over a generator method's items (handle `stream=True`), raising what the replica
    raised; leaving early cancels the call in the replica (closing its generator)."""
    gen = method.options(stream=True).remote(*args, **kwargs)

    async def items():
        try:
            async for item in gen:
                yield item
        except RayTaskError as exc:
            raise unwrap(exc) from None

    it = items()
    try:
        yield it
    finally:
        await it.aclose()
        gen.cancel()  # no-op when the generator finished


# ---- Engram rows from the memory service (used in the model-worker replica) -----------------------------
class MemoryServiceUnavailable(RuntimeError):
    """The memory service serving a model's Engram tables could not be reached (or failed a lookup)."""


class _PendingShardRows:
    """One shard's `engram_lookup_many` in flight; `result()` blocks (engine thread, never an event loop)."""

    def __init__(self, response, shard: int, num_shards: int, model: str, timeout_s: float):
        self.response, self.shard, self.num_shards = response, shard, num_shards
        self.model, self.timeout_s = model, timeout_s

    def result(self) -> dict:
        try:
            return self.response.result(timeout_s=self.timeout_s)
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.response.cancel()
            cause = unwrap(exc)
            raise MemoryServiceUnavailable(
                f"Engram rows: the memory service (shard {self.shard} of {self.num_shards}) failed or could not "
                f"be reached for model {self.model!r}: {type(cause).__name__}: {cause}") from None


class _HandleShard:
    """A BatchedShard over one memory deployment's handle: `start_many` sends the request and returns."""

    def __init__(self, handle: DeploymentHandle, shard: int, num_shards: int, timeout_s: float):
        self.handle, self.shard, self.num_shards, self.timeout_s = handle, shard, num_shards, timeout_s

    def start_many(self, model: str, requests: dict) -> _PendingShardRows:
        try:
            response = self.handle.engram_lookup_many.remote(model, requests)
        except Exception as exc:
            raise MemoryServiceUnavailable(
                f"Engram rows: the memory service (shard {self.shard} of {self.num_shards}) could not be reached "
                f"for model {model!r}: {type(exc).__name__}: {exc}") from None
        return _PendingShardRows(response, self.shard, self.num_shards, model, self.timeout_s)


class HandleEngramClient:
    """The worker's EngramTableClient over the memory deployments' handles (shard i at index i):
    `lookup_many` sends one request per shard for all Engram layers of a step and waits (from the engine's
    fetch thread) for the rows, which come back as tensors. Any failure to get them raises
    `MemoryServiceUnavailable` (a RuntimeError naming the memory service)."""

    def __init__(self, model: str, handles: list[DeploymentHandle], layers_rows: dict[int, int], *,
                 timeout_s: float = 30.0):
        from memory_service.engram_batch import BatchedEngramClient

        n = len(handles)
        self.model, self.handles, self.timeout_s = model, list(handles), timeout_s
        self.client = BatchedEngramClient(
            model, [_HandleShard(h, i, n, timeout_s) for i, h in enumerate(handles)], layers_rows)
        self.layers_rows = self.client.layers_rows
        self.last_error: str | None = None

    @classmethod
    async def connect(cls, model: str, handles: list[DeploymentHandle], *, timeout_s: float = 30.0):
        """Ask every shard what it serves; checks that shard i of len(handles) is at index i and that all
        agree on the table sizes."""
        infos = await cls._infos(model, handles, timeout_s)
        return cls(model, handles, infos[0]["layer_rows"], timeout_s=timeout_s)

    @staticmethod
    async def _infos(model: str, handles: list[DeploymentHandle], timeout_s: float) -> list[dict]:
        n = len(handles)
        infos = []
        for i, handle in enumerate(handles):
            try:
                info = await asyncio.wait_for(call(handle.engram_info, model), timeout_s)
            except Exception as exc:
                raise MemoryServiceUnavailable(
                    f"Engram rows: the memory service (shard {i} of {n}) failed or could not be reached for "
                    f"model {model!r}: {type(exc).__name__}: {exc}") from None
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
        try:
            rows = self.client.lookup_many(requests)
        except MemoryServiceUnavailable as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        return rows

    async def check(self) -> None:
        """Raises MemoryServiceUnavailable unless every shard answers (the worker's health check)."""
        await self._infos(self.model, self.handles, min(self.timeout_s, 10.0))


