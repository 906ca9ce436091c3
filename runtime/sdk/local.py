"""The SDK's interface in-process: `LocalRuntime.agents / tasks / sessions / memories` call the
`RuntimeService` directly (no HTTP, no API key) for the runtime's tenant, with the same resources, the
same defaults and the same typed errors as `AsyncClient`, so one piece of async agent code runs against
either. Submitting a task starts the runtime's background runner, as a server would.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator

from runtime.agents import AgentDefinition
from runtime.api.errors import classify
from runtime.resources import (
    AgentUpdate,
    MemoryCreate,
    MemoryPatch,
    MemorySearch,
    MessageCreate,
    Task,
    TaskCreate,
    TaskEvent,
    TaskQuery,
)
from runtime.sdk.errors import TaskTimeout, error_for_status
from runtime.sdk.waiting import ended_within


def _sdk_errors(method):
    """Raise the runtime's own exceptions as the SDK's typed errors (what the HTTP client would raise)."""

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            known = classify(exc)
            if known is None:
                raise
            raise error_for_status(*known) from exc

    return wrapper


class _Scoped:
    def __init__(self, runtime):
        self._runtime = runtime

    @property
    def _service(self):
        return self._runtime.service

    @property
    def _tenant(self) -> str:
        return self._runtime.tenant


class LocalAgents(_Scoped):
    @_sdk_errors
    async def create(self, name: str, instructions: str, *, tools: list[str] | None = None, model: str = "default",
                     memory: dict | None = None, limits: dict | None = None):
        fields = {"name": name, "instructions": instructions, "tools": list(tools or []), "model": model,
                  "memory": memory, "limits": limits}
        definition = AgentDefinition.model_validate({k: v for k, v in fields.items() if v is not None})
        return await self._service.catalog.create(self._tenant, definition)

    @_sdk_errors
    async def get(self, name: str):
        return await self._service.catalog.get(self._tenant, name)

    @_sdk_errors
    async def list(self):
        return await self._service.catalog.list(self._tenant)

    @_sdk_errors
    async def update(self, name: str, **fields):
        return await self._service.catalog.update(self._tenant, name, AgentUpdate.model_validate(fields))

    @_sdk_errors
    async def delete(self, name: str) -> None:
        await self._service.delete_agent(self._tenant, name)


class LocalTasks(_Scoped):
    @_sdk_errors
    async def submit(self, input: str, *, agent: str = "assistant", session_id: str | None = None,
                     idempotency_key: str | None = None) -> Task:
        TaskCreate(agent=agent, input=input, session_id=session_id)  # the HTTP API's checks of the body
        self._service.start_runner()
        task, _ = await self._service.tasks.submit(self._tenant, agent, input, conversation_id=session_id,
                                                   idempotency_key=idempotency_key or f"sdk-{uuid.uuid4().hex}")
        return task

    @_sdk_errors
    async def get(self, task_id: str) -> Task:
        return await self._service.tasks.get(self._tenant, task_id)

    @_sdk_errors
    async def list(self, *, status: str | None = None, agent: str | None = None, created_after_ms: int | None = None,
                   created_before_ms: int | None = None, limit: int = 20, cursor: str | None = None):
        query = TaskQuery(status=status, agent=agent, created_after_ms=created_after_ms,
                          created_before_ms=created_before_ms, limit=limit, cursor=cursor)  # the API's checks
        return await self._service.tasks.list(self._tenant, **query.model_dump())

    @_sdk_errors
    async def steps(self, task_id: str):
        return await self._service.tasks.transcript(self._tenant, task_id)

    @_sdk_errors
    async def cancel(self, task_id: str) -> Task:
        return await self._service.tasks.cancel(self._tenant, task_id)

    @_sdk_errors
    async def _events(self, task_id: str, after: str) -> list[TaskEvent]:
        return await self._service.tasks.events(self._tenant, task_id, after=after, block_ms=1000)

    async def events(self, task_id: str, *, after: str | None = None) -> AsyncIterator[TaskEvent]:
        after = after or "0-0"
        while True:
            batch = await self._events(task_id, after)
            if not batch and (await self.get(task_id)).done:
                # its last events, if it ended between the two reads (no wait: nothing more comes)
                batch = await self._service.tasks.events(self._tenant, task_id, after=after)
                if not batch:
                    return
            for event in batch:
                yield event
                after = event.id
                if event.terminal:
                    return

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (task := await self.get(task_id)).done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TaskTimeout(f"task {task_id} did not finish within {timeout}s")
            await ended_within(self._until_terminal(task_id), 1.0 if remaining is None else min(1.0, remaining))
        return task

    async def _until_terminal(self, task_id: str) -> None:
        async for _event in self.events(task_id):
            pass


class LocalSessions(_Scoped):
    @_sdk_errors
    async def get(self, session_id: str):
        return await self._service.tasks.conversation(self._tenant, session_id)

    @_sdk_errors
    async def send(self, session_id: str, input: str, *, idempotency_key: str | None = None) -> Task:
        MessageCreate(input=input)  # the HTTP API's checks of the body, before the session is looked up
        agent = await self._service.tasks.conversation_agent(self._tenant, session_id)
        return await self._runtime.tasks.submit(input, agent=agent, session_id=session_id,
                                                idempotency_key=idempotency_key)


class LocalMemories(_Scoped):
    @_sdk_errors
    async def add(self, agent: str, text: str, *, kind: str = "fact", metadata: dict | None = None):
        body = MemoryCreate(text=text, kind=kind, metadata=metadata)
        return await self._service.add_memory(self._tenant, agent, body)

    @_sdk_errors
    async def search(self, agent: str, query: str, *, k: int = 5, kinds: list[str] | None = None,
                     metadata: dict | None = None, min_score: float | None = None, hybrid: bool = False):
        body = MemorySearch(query=query, k=k, kinds=kinds, metadata=metadata, min_score=min_score, hybrid=hybrid)
        return (await self._service.search_memories(self._tenant, agent, body)).data

    @_sdk_errors
    async def list(self, agent: str, *, kind: str | None = None, limit: int = 50, cursor: str | None = None):
        return await self._service.list_memories(self._tenant, agent, kinds=[kind] if kind else None, limit=limit,
                                                 cursor=cursor)

    @_sdk_errors
    async def get(self, agent: str, memory_id: str):
        return await self._service.get_memory(self._tenant, agent, memory_id)

    @_sdk_errors
    async def update(self, agent: str, memory_id: str, *, text: str | None = None, metadata: dict | None = None):
        return await self._service.update_memory(self._tenant, agent, memory_id,
                                                 MemoryPatch(text=text, metadata=metadata))

    @_sdk_errors
    async def delete(self, agent: str, memory_id: str) -> None:
        await self._service.delete_memory(self._tenant, agent, memory_id)


def bind_namespaces(runtime) -> None:
    """Give a started LocalRuntime the SDK's namespaces."""
    runtime.agents = LocalAgents(runtime)
    runtime.tasks = LocalTasks(runtime)
    runtime.sessions = LocalSessions(runtime)
    runtime.memories = LocalMemories(runtime)
