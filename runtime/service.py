"""RuntimeService: everything a caller can do with the runtime, as tenant-scoped async methods.

One object composes the parts (session store, orchestrator, agent catalog, task board, memory service,
API keys, model worker) and runs submitted tasks in the background (`start_runner`: bounded by the
orchestrator's `max_concurrent_sessions`, and resuming at start-up every session whose owner died: the
leases and fencing tokens decide who runs what). The REST API translates HTTP to these methods, and
`LocalRuntime` offers them in-process; neither adds behaviour of its own.

Deliberately not here: HTTP, auth, rate limits (the api package); how parts are built (`local.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from datetime import datetime
from typing import Any

from memory_service.agent_memory.records import MemoryNotFound
from memory_service.service import MemoryService
from runtime.api_keys import ApiKeyStore
from runtime.catalog import AgentCatalog
from runtime.orchestrator import Orchestrator
from runtime.resources import (
    Agent,
    Memory,
    MemoryCreate,
    MemoryHit,
    MemoryHits,
    MemoryPage,
    MemoryPatch,
    MemorySearch,
)
from runtime.sessions import SessionStore
from runtime.tasks import TaskBoard

log = logging.getLogger(__name__)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def memory_resource(record) -> Memory:
    return Memory(id=record.id, agent=record.agent, kind=record.kind, text=record.text,
                  metadata=record.metadata or {}, source_session=record.source_session,
                  created_ms=_ms(record.created_at), updated_ms=_ms(record.updated_at))


class CountingMemory:
    """The memory service, counting the searches made through it (the orchestrator's and the API's)."""

    def __init__(self, inner: MemoryService, counters: collections.Counter):
        self._inner, self._counters = inner, counters

    async def search(self, *args, **kwargs):
        self._counters["memory_searches"] += 1
        return await self._inner.search(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def _cancel_and_wait(tasks: list[asyncio.Task], *, repeat_s: float = 1.0) -> None:
    """Cancel the tasks and wait until they are done, cancelling again every `repeat_s` while one runs on:
    a single cancel() can be lost (Python 3.11's asyncio.wait_for, which redis-py awaits its I/O through,
    drops it when the awaited operation completes at the same moment), and the task would run on."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=repeat_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a task that failed while stopping is not reported again at exit


class RuntimeService:
    def __init__(self, store: SessionStore, orchestrator: Orchestrator, catalog: AgentCatalog,
                 memory: CountingMemory, keys: ApiKeyStore, *, worker=None, database_check=None,
                 counters: collections.Counter | None = None):
        self.store, self.orchestrator, self.catalog, self.memory, self.keys = store, orchestrator, catalog, memory, keys
        self.worker = worker
        self.tasks = TaskBoard(store, catalog, key_prefix=store.keys.prefix, on_submit=orchestrator.wake,
                               check_input=orchestrator.check_task)
        self.database_check = database_check  # () -> None, raises when the database is unreachable
        self.counters = counters if counters is not None else collections.Counter()
        self._runner: asyncio.Task | None = None
        self._stop = asyncio.Event()

    # ---- background runner --------------------------------------------------------------------------
    def start_runner(self, *, poll_s: float = 0.1) -> None:
        """Run submitted tasks (and resume orphaned ones) in the background until `stop_runner`."""
        if self._runner is None:
            self._stop.clear()
            self._runner = asyncio.create_task(self._serve(poll_s), name="engram-task-runner")

    async def _serve(self, poll_s: float) -> None:
        backoff = poll_s
        while not self._stop.is_set():
            try:
                await self.orchestrator.run_pending(stop=self._stop, poll_s=poll_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep the server up and try again
                log.warning("task runner: %s; retrying in %.1fs", exc, backoff)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = poll_s

    async def stop_runner(self) -> None:
        """Stop taking tasks and cancel the ones running here (each releases its lease; nothing half-done is
        committed, and the next runner resumes them)."""
        self._stop.set()
        if self._runner is not None:
            await _cancel_and_wait([self._runner])  # first the runner, so that it starts no more sessions
            await _cancel_and_wait(list(self.orchestrator.active.values()))
        self._runner = None

    # ---- agents -------------------------------------------------------------------------------------
    async def agent(self, tenant: str, name: str) -> Agent:
        return await self.catalog.get(tenant, name)

    async def delete_agent(self, tenant: str, name: str) -> None:
        """Delete the agent and forget its long-term memories (a new agent of the same name starts empty). The
        memories go first: if that fails the agent is still there, so deleting again finishes the job."""
        await self.catalog.check_deletable(tenant, name)
        await self.memory.forget_agent(tenant, name)
        await self.catalog.delete(tenant, name)

    # ---- memories -----------------------------------------------------------------------------------
    async def _owned_memory(self, tenant: str, agent: str, memory_id: str):
        await self.catalog.get(tenant, agent)
        record = await self.memory.get(tenant, memory_id)
        if record.agent != agent:
            raise MemoryNotFound(f"memory {memory_id!r} not found")
        return record

    async def add_memory(self, tenant: str, agent: str, body: MemoryCreate) -> Memory:
        await self.catalog.get(tenant, agent)
        record = await self.memory.write(tenant, agent, body.text, kind=body.kind, metadata=body.metadata)
        return memory_resource(record)

    async def search_memories(self, tenant: str, agent: str, body: MemorySearch) -> MemoryHits:
        await self.catalog.get(tenant, agent)
        hits = await self.memory.search(tenant, agent, body.query, k=body.k, kinds=body.kinds,
                                        metadata=body.metadata, min_score=body.min_score, hybrid=body.hybrid)
        return MemoryHits(data=[MemoryHit(memory=memory_resource(h.memory), score=h.score) for h in hits])

    async def list_memories(self, tenant: str, agent: str, *, kinds: list[str] | None = None, limit: int = 50,
                            cursor: str | None = None) -> MemoryPage:
        await self.catalog.get(tenant, agent)
        try:
            page = await self.memory.list(tenant, agent, kinds=kinds, limit=limit, cursor=cursor)
        except MemoryNotFound:
            return MemoryPage(data=[])
        return MemoryPage(data=[memory_resource(r) for r in page.items], next_cursor=page.next_cursor)

    async def get_memory(self, tenant: str, agent: str, memory_id: str) -> Memory:
        return memory_resource(await self._owned_memory(tenant, agent, memory_id))

    async def update_memory(self, tenant: str, agent: str, memory_id: str, body: MemoryPatch) -> Memory:
        await self._owned_memory(tenant, agent, memory_id)
        return memory_resource(await self.memory.update(tenant, memory_id, text=body.text, metadata=body.metadata))

    async def delete_memory(self, tenant: str, agent: str, memory_id: str) -> None:
        await self._owned_memory(tenant, agent, memory_id)
        await self.memory.delete(tenant, memory_id)

    # ---- health -------------------------------------------------------------------------------------
    async def readiness(self) -> dict[str, str]:
        """{component: "ok" | the reason it failed} for Redis, the database and the model worker."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"{type(exc).__name__}: {exc}" or "unreachable"
        try:
            if self.database_check is not None:
                await asyncio.wait_for(asyncio.to_thread(self.database_check), 2.0)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"{type(exc).__name__}: {exc}"
        worker = self.worker
        if worker is None:
            checks["model_worker"] = "ok" if self.orchestrator.model is not None else "no model"
        elif getattr(worker, "_closed", False):
            checks["model_worker"] = "closed"
        else:
            thread = getattr(worker, "_thread", None)
            checks["model_worker"] = "ok" if thread is None or thread.is_alive() else "engine thread died"
        return checks

    def model_stats(self) -> dict[str, float]:
        """The model worker's counters (tokens computed, prefix-cache hits), empty without a worker."""
        engine = getattr(self.worker, "engine", None)
        return dict(engine.stats) if engine is not None else {}

    async def close(self) -> None:
        await self.stop_runner()

