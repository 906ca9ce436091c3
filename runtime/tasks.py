"""TaskBoard: tasks and the conversations ("sessions") they belong to, on top of the session store.

A task is one orchestrator run (a durable session in `SessionStore`, its id the task id). A conversation
groups the tasks sent to one agent, in order: each new task sees the earlier ones' inputs and answers as
context. Submissions are idempotent by key: the same `Idempotency-Key` with the same body returns the
same task, with another body it is refused (`IdempotencyConflict`), and only one task of a conversation
runs at a time (`ConversationBusy`). Every read is scoped by tenant: another tenant's id is `TaskNotFound`,
exactly like a missing one.

Deliberately not here: running tasks (the orchestrator), HTTP, agents' definitions (the catalog).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis.asyncio as aioredis

from runtime.orchestrator import Orchestrator
from runtime.resources import (
    TERMINAL_TASK_STATUSES,
    Session,
    StepRecord,
    Task,
    TaskEvent,
    TaskPage,
    TaskTranscript,
)
from runtime.sessions import SessionNotFound, SessionState, SessionStore

CONTEXT_TURNS = 8  # earlier tasks of a conversation shown to the model
CONTEXT_CHARS_PER_TURN = 600
IDEMPOTENCY_TTL_S = 24 * 3600

# KEYS: conversation tasks list. ARGV: state-key prefix, state-key suffix, new task id.
# Appends the task unless the conversation's last task is still pending or running.
_APPEND = r"""
local last = redis.call('LINDEX', KEYS[1], -1)
if last then
  local status = redis.call('HGET', ARGV[1] .. last .. ARGV[2], 'status')
  if status == 'pending' or status == 'running' then return {'busy', last} end
end
redis.call('RPUSH', KEYS[1], ARGV[3])
return {'ok'}
"""


class TaskNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class ConversationNotFound(TaskNotFound):
    pass


class IdempotencyConflict(ValueError):
    """The idempotency key was used before with a different request."""


class ConversationBusy(ValueError):
    """The conversation's previous task has not finished."""


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(12)}"


def task_of(state: SessionState) -> Task:
    return Task(id=state.session_id, session_id=state.thread_id or state.session_id, agent=state.agent,
                input=state.task, status=state.status, final_answer=state.final_answer, error=state.error,
                step_count=state.step_count, created_ms=state.created_ms, updated_ms=state.updated_ms)


def _fingerprint(kind: str, body: dict) -> str:
    return hashlib.sha256(json.dumps([kind, body], sort_keys=True).encode()).hexdigest()


class TaskBoard:
    def __init__(self, store: SessionStore, orchestrator: Orchestrator, *, key_prefix: str = "engram"):
        self.store, self.orchestrator = store, orchestrator
        self._redis: aioredis.Redis = store.redis
        self._prefix = key_prefix
        self._append = self._redis.register_script(_APPEND)

    # ---- keys -----------------------------------------------------------------------------------------
    def _conversation(self, conversation_id: str) -> str:
        return f"{self._prefix}:conversation:{conversation_id}"

    def _idempotency(self, tenant: str, key: str) -> str:
        return f"{self._prefix}:tenant:{tenant}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"

    # ---- submission -----------------------------------------------------------------------------------
    async def submit(self, tenant: str, agent: str, text: str, *, conversation_id: str | None = None,
                     idempotency_key: str | None = None) -> tuple[Task, bool]:
        """(task, created): created is False when an earlier submission with this key is returned."""
        body = {"agent": agent, "input": text, "session_id": conversation_id}
        task_id = new_id("task")
        if idempotency_key is not None:
            record = json.dumps({"fingerprint": _fingerprint("task", body), "task_id": task_id})
            key = self._idempotency(tenant, idempotency_key)
            if not await self._redis.set(key, record, nx=True, ex=IDEMPOTENCY_TTL_S):
                earlier = json.loads(await self._redis.get(key) or "{}")
                if earlier.get("fingerprint") != _fingerprint("task", body):
                    raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
                task_id = earlier["task_id"]
                try:
                    return task_of(await self.store.state(task_id)), False
                except SessionNotFound:
                    pass  # the first attempt died before creating it: create it now, under the same id
        if conversation_id is None:
            conversation_id = new_id("sess")
            await self._redis.hset(self._conversation(conversation_id), mapping={
                "tenant": tenant, "agent": agent, "created_ms": int(time.time() * 1000)})
        else:
            meta = await self._conversation_meta(tenant, conversation_id)
            if meta["agent"] != agent:
                raise ValueError(f"agent: session {conversation_id} talks to agent {meta['agent']!r}, not {agent!r}")
        context = await self._context(conversation_id)
        state_key = self.store.keys.session(task_id).state
        prefix, suffix = state_key[: -len(task_id) - len(":state")], ":state"
        reply = await self._append(keys=[f"{self._conversation(conversation_id)}:tasks"],
                                   args=[prefix, suffix, task_id])
        if reply[0] == "busy" and reply[1] != task_id:
            raise ConversationBusy(f"session {conversation_id} is still working on task {reply[1]}; "
                                   "wait for it to finish or cancel it")
        state = await self.orchestrator.submit(tenant, agent, text, session_id=task_id, thread_id=conversation_id,
                                               context=context)
        return task_of(state), True

    async def _context(self, conversation_id: str) -> str | None:
        """Earlier turns of the conversation, oldest first, for the next task's prompt."""
        ids = await self._redis.lrange(f"{self._conversation(conversation_id)}:tasks", -CONTEXT_TURNS, -1)
        turns = []
        for task_id in ids:
            try:
                state = await self.store.state(task_id)
            except SessionNotFound:
                continue  # expired
            outcome = state.final_answer if state.status == "completed" else f"({state.status}: {state.error})"
            turns.append(f"User: {state.task[:CONTEXT_CHARS_PER_TURN]}\n"
                         f"Assistant: {str(outcome)[:CONTEXT_CHARS_PER_TURN]}")
        return "\n".join(turns) or None

    async def _conversation_meta(self, tenant: str, conversation_id: str) -> dict[str, str]:
        meta = await self._redis.hgetall(self._conversation(conversation_id))
        if not meta or meta.get("tenant") != tenant:
            raise ConversationNotFound(f"session {conversation_id!r} not found")
        return meta

    # ---- reads ----------------------------------------------------------------------------------------
    async def state(self, tenant: str, task_id: str) -> SessionState:
        try:
            state = await self.store.state(task_id)
        except (SessionNotFound, ValueError):
            raise TaskNotFound(f"task {task_id!r} not found") from None
        if state.tenant != tenant:
            raise TaskNotFound(f"task {task_id!r} not found")
        return state

    async def get(self, tenant: str, task_id: str) -> Task:
        return task_of(await self.state(tenant, task_id))

    async def list(self, tenant: str, *, status: str | None = None, agent: str | None = None,
                   created_after_ms: int | None = None, created_before_ms: int | None = None, limit: int = 20,
                   cursor: str | None = None) -> TaskPage:
        """Newest first. The cursor is opaque to callers (a creation sequence number)."""
        before = None
        if cursor is not None:
            if not cursor.isdigit():
                raise ValueError(f"cursor: not a cursor from a previous page: {cursor!r}")
            before = int(cursor)
        found: list[Task] = []
        while True:
            page, before = await self.store.page_sessions(tenant, before=before, limit=max(limit, 50))
            for seq, state in page:
                if created_before_ms is not None and state.created_ms >= created_before_ms:
                    continue
                if created_after_ms is not None and state.created_ms < created_after_ms:
                    return TaskPage(data=found)  # newest first: nothing older can match
                if (status is None or state.status == status) and (agent is None or state.agent == agent):
                    found.append(task_of(state))
                    if len(found) == limit:
                        return TaskPage(data=found, next_cursor=str(seq))
            if before is None:
                return TaskPage(data=found)

    async def cancel(self, tenant: str, task_id: str) -> Task:
        state = await self.state(tenant, task_id)
        if state.status not in TERMINAL_TASK_STATUSES:
            await self.orchestrator.cancel(task_id, "cancelled by request")
        return task_of(state)

    async def events(self, tenant: str, task_id: str, *, after: str = "0-0", block_ms: int | None = None,
                     count: int = 200) -> list[TaskEvent]:
        await self.state(tenant, task_id)
        try:
            raw = await self.store.events(task_id, after_id=after, block_ms=block_ms, count=count)
        except Exception as exc:  # redis rejects ids that are not stream ids
            if "Invalid stream ID" in str(exc):
                raise ValueError(f"Last-Event-ID: not an event id: {after!r}") from None
            raise
        return [TaskEvent(id=event_id, type=kind, data=data, task_id=task_id) for event_id, kind, data in raw]

    async def transcript(self, tenant: str, task_id: str) -> TaskTranscript:
        await self.state(tenant, task_id)
        state, steps = await self.store.load(task_id)
        return TaskTranscript(**task_of(state).model_dump(), summary=state.summary,
                              steps=[StepRecord(**step.model_dump()) for step in steps])

    async def conversation(self, tenant: str, conversation_id: str) -> Session:
        meta = await self._conversation_meta(tenant, conversation_id)
        ids = await self._redis.lrange(f"{self._conversation(conversation_id)}:tasks", 0, -1)
        tasks = []
        for task_id in dict.fromkeys(ids):  # a retried submission may have appended its id twice
            try:
                tasks.append(await self.transcript(tenant, task_id))
            except TaskNotFound:
                continue  # expired, or its creation never completed
        return Session(id=conversation_id, agent=meta["agent"], created_ms=int(meta["created_ms"]), tasks=tasks)

    async def conversation_agent(self, tenant: str, conversation_id: str) -> str:
        return (await self._conversation_meta(tenant, conversation_id))["agent"]
