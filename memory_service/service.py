"""MemoryService: one front for both kinds of memory the runtime uses.

- Engram tables (parametric, read-only while serving): `engram_lookup(model, layer, hash_ids)`, backed by
  an `EngramTableStore` (memory-mapped safetensors, hot-row cache, optional shard of a row range). The
  service is itself an `EngramShard` (`lookup(model, layer, hash_ids, out_dtype)`, `models()`), so a
  `ShardedEngramClient` can take MemoryService instances (or handles to them) as its shards.
- Long-term agent memory (facts, episodes, summaries): async `write/write_many/search/get/list/update/
  delete/forget_agent`, backed by an `AgentMemoryStore` (SQL source of truth + faiss index per agent).

The SQL/faiss work is synchronous; the async methods run it on a small thread pool so the event loop
of the orchestrator (or a Serve replica) never blocks on the database or the embedder. No Ray here:
`runtime/serve/` wraps this class in a deployment.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

import torch

from memory_service.agent_memory.store import AgentMemoryStore

if TYPE_CHECKING:
    from memory_service.engram_tables import EngramTableStore


class MemoryService:
    def __init__(self, agent_memory: AgentMemoryStore | None = None, engram: EngramTableStore | None = None,
                 *, threads: int = 4):
        self.agent_memory = agent_memory
        self.engram = engram
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memory-service")

    # ---- Engram ----------------------------------------------------------------------------------
    def engram_lookup(self, model: str, layer: int, hash_ids: torch.Tensor) -> torch.Tensor:
        """hash_ids int64 [...] -> rows [..., head_dim] fp32 (synchronous: called from engine threads)."""
        return self._engram().lookup(model, layer, hash_ids)

    # The EngramShard protocol, so that a MemoryService can be a shard of `ShardedEngramClient` directly.
    def lookup(self, model: str, layer: int, hash_ids: torch.Tensor,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Global row ids of this service's shard, int64 [...] -> rows [..., head_dim] of out_dtype."""
        return self._engram().lookup(model, layer, hash_ids, out_dtype)

    def models(self) -> list[str]:
        """The models whose Engram tables this service holds (none without an Engram store)."""
        return [] if self.engram is None else self.engram.models()

    def layer_rows(self, model: str) -> dict[int, int]:
        return self._engram().layer_rows(model)

    def _engram(self) -> EngramTableStore:
        if self.engram is None:
            raise RuntimeError("this memory service serves no Engram tables")
        return self.engram

    # ---- agent memory ----------------------------------------------------------------------------
    async def _run(self, fn, *args, **kwargs):
        if self.agent_memory is None:
            raise RuntimeError("this memory service has no agent-memory store")
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    async def write(self, tenant: str, agent: str, text: str, **kwargs):
        return await self._run(self.agent_memory.write, tenant, agent, text, **kwargs)

    async def write_many(self, tenant: str, agent: str, items, **kwargs):
        return await self._run(self.agent_memory.write_many, tenant, agent, items, **kwargs)

    async def search(self, tenant: str, agent: str, query: str, **kwargs):
        return await self._run(self.agent_memory.search, tenant, agent, query, **kwargs)

    async def get(self, tenant: str, memory_id: str):
        return await self._run(self.agent_memory.get, tenant, memory_id)

    async def list(self, tenant: str, agent: str | None = None, **kwargs):
        return await self._run(self.agent_memory.list, tenant, agent, **kwargs)

    async def update(self, tenant: str, memory_id: str, **kwargs):
        return await self._run(self.agent_memory.update, tenant, memory_id, **kwargs)

    async def delete(self, tenant: str, memory_id: str) -> None:
        await self._run(self.agent_memory.delete, tenant, memory_id)

    async def forget_agent(self, tenant: str, agent: str) -> int:
        return await self._run(self.agent_memory.forget_agent, tenant, agent)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.agent_memory is not None:
            self.agent_memory.close()
