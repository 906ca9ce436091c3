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
import re
import secrets
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from runtime.catalog import AgentCatalog, AgentNotFound
from runtime.prompts import cut_text
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
from runtime.sessions.lua import CREATE_SESSION, PRELUDE
from runtime.sessions.models import validate_session_id

EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
_STREAM_ID_PART_MAX = 2**64 - 1  # a Redis stream id is two unsigned 64-bit numbers


def is_event_id(text: str) -> bool:
    """Whether `text` can be a task event's id ("<ms>-<seq>", each part a 64-bit unsigned number)."""
    return EVENT_ID.fullmatch(text) is not None and all(int(part) <= _STREAM_ID_PART_MAX for part in text.split("-"))
CONTEXT_TURNS = 8  # earlier tasks of a conversation shown to the model
CONTEXT_CHARS_PER_TURN = 600  # of each side of a turn; a longer one shows cut, marked " [...]"
IDEMPOTENCY_TTL_S = 24 * 3600

# One atomic submission. KEYS: 1 idempotency record, 2 the tenant's agents hash, 3 the new task's state,
# 4 tenant index, 5 runnable set, 6 creation sequence, 7 conversation hash, 8 conversation task list.
# ARGV: 1 task id, 2 tenant, 3 agent, 4 input, 5 request fingerprint ('' without an idempotency key),
# 6 idempotency TTL s, 7 agent is built in ('1'/'0'), 8 conversation id, 9 new conversation ('1'/'0'),
# 10 conversation TTL s, 11/12 state-key prefix/suffix (to read the conversation's last task), 13 context.
# Checks come first and nothing is written unless all pass; a retry of the same call (same task id)
# answers 'replay', so a lost reply never creates a second task.
_SUBMIT = PRELUDE + CREATE_SESSION + r"""
if redis.call('EXISTS', KEYS[3]) == 1 then return {'replay', ARGV[1]} end
if ARGV[5] ~= '' then
  local earlier = redis.call('GET', KEYS[1])
  if earlier then
    local record = cjson.decode(earlier)
    if record.fingerprint ~= ARGV[5] then return {'idempotency_conflict'} end
    return {'replay', record.task_id}
  end
end
if ARGV[7] ~= '1' and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then return {'no_agent'} end
if ARGV[9] == '1' then
  redis.call('HSET', KEYS[7], 'tenant', ARGV[2], 'agent', ARGV[3], 'created_ms', int(now_ms()))
else
  local meta = redis.call('HMGET', KEYS[7], 'tenant', 'agent')
  if meta[1] ~= ARGV[2] then return {'no_conversation'} end
  if meta[2] ~= ARGV[3] then return {'agent_mismatch', meta[2]} end
  local last = redis.call('LINDEX', KEYS[8], -1)
  if last then
    local status = redis.call('HGET', ARGV[11] .. last .. ARGV[12], 'status')
    if status == 'pending' or status == 'running' then return {'busy', last} end
  end
end
redis.call('RPUSH', KEYS[8], ARGV[1])
redis.call('EXPIRE', KEYS[7], ARGV[10])
redis.call('EXPIRE', KEYS[8], ARGV[10])
local extra = {'thread_id', ARGV[8]}
if ARGV[13] ~= '' then extra[3] = 'context'; extra[4] = ARGV[13] end
local created = create_session(KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4], extra)
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[1], cjson.encode({fingerprint = ARGV[5], task_id = ARGV[1]}), 'EX', ARGV[6])
end
return {'ok', created}
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
    def __init__(self, store: SessionStore, catalog: AgentCatalog | None = None, *, key_prefix: str = "engram",
                 on_submit: Callable[[], None] | None = None,
                 check_input: Callable[[str, str, str], Awaitable[None]] | None = None):
        self.store, self.catalog = store, catalog
        self._redis: aioredis.Redis = store.redis
        self._prefix = key_prefix
        self._submit = store.script(_SUBMIT, "submit")
        self.on_submit = on_submit  # called after each new task (wakes the runner)
        self.check_input = check_input  # (tenant, agent, input): raises for an input that cannot run
        # a conversation outlives its last task's own retention by a day
        self.conversation_ttl_s = (store.finished_ttl_s or 30 * 86400) + 86400

    # ---- keys -----------------------------------------------------------------------------------------
    def _conversation(self, conversation_id: str) -> str:
        return f"{self._prefix}:conversation:{conversation_id}"

    def _idempotency(self, tenant: str, key: str) -> str:
        return f"{self._prefix}:tenant:{tenant}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"

    # ---- submission -----------------------------------------------------------------------------------
    async def submit(self, tenant: str, agent: str, text: str, *, conversation_id: str | None = None,
                     idempotency_key: str | None = None) -> tuple[Task, bool]:
        """(task, created): created is False when an earlier submission with this key is returned. One Redis
        round trip for a new conversation (plus the context read when continuing one)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("input: must not be blank")
        if self.check_input is not None:
            await self.check_input(tenant, agent, text)
        fingerprint = "" if idempotency_key is None else _fingerprint(
            "task", {"agent": agent, "input": text, "session_id": conversation_id})
        context = None
        if conversation_id is not None:
            validate_session_id(conversation_id, "session_id")
            context = await self._context(conversation_id)
        new_conversation = conversation_id is None
        conversation_id = conversation_id or new_id("sess")
        task_id = new_id("task")
        state_key = self.store.keys.session(task_id).state
        tenant_keys = self.store.keys
        builtin = self.catalog is not None and agent in self.catalog.builtin
        agents_key = self.catalog.key(tenant) if self.catalog is not None else f"{self._prefix}:no-catalog"
        reply = await self._submit(
            [self._idempotency(tenant, idempotency_key or ""), agents_key, state_key, tenant_keys.tenant_index(tenant),
             tenant_keys.runnable, tenant_keys.creation_seq, self._conversation(conversation_id),
             f"{self._conversation(conversation_id)}:tasks"],
            [task_id, tenant, agent, text, fingerprint, IDEMPOTENCY_TTL_S,
             "1" if builtin or self.catalog is None else "0", conversation_id, "1" if new_conversation else "0",
             self.conversation_ttl_s, *self.store.keys.state_key_affixes(), context or ""])
        code = reply[0]
        if code == "replay":
            return task_of(await self.store.state(reply[1])), False
        if code == "idempotency_conflict":
            raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
        if code == "no_agent":
            raise AgentNotFound(f"agent {agent!r} not found")
        if code == "no_conversation":
            raise ConversationNotFound(f"session {conversation_id!r} not found")
        if code == "agent_mismatch":
            raise ValueError(f"agent: session {conversation_id} talks to agent {reply[1]!r}, not {agent!r}")
        if code == "busy":
            raise ConversationBusy(f"session {conversation_id} is still working on task {reply[1]}; "
                                   "wait for it to finish or cancel it")
        if self.on_submit is not None:
            self.on_submit()
        created_ms = int(reply[1])  # the new task is exactly what the script wrote: no read back
        return Task(id=task_id, session_id=conversation_id, agent=agent, input=text, status="pending",
                    created_ms=created_ms, updated_ms=created_ms), True

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
            turns.append(f"User: {cut_text(state.task, CONTEXT_CHARS_PER_TURN)}\n"
                         f"Assistant: {cut_text(str(outcome), CONTEXT_CHARS_PER_TURN)}")
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
        """Ask the task to stop at its next step boundary (a step in flight is committed first)."""
        state = await self.state(tenant, task_id)
        if state.status not in TERMINAL_TASK_STATUSES:
            await self.store.request_cancel(task_id, "cancelled by request")
        return task_of(state)

    async def events(self, tenant: str, task_id: str, *, after: str = "0-0", block_ms: int | None = None,
                     count: int = 200, tenant_checked: bool = False) -> list[TaskEvent]:
        """Events after id `after`, oldest first (waiting up to block_ms for the first). tenant_checked: the
        caller already confirmed the task is the tenant's (a stream checks once, not per read)."""
        if not tenant_checked:
            await self.state(tenant, task_id)
        if not is_event_id(after):
            raise ValueError(f"Last-Event-ID: not an event id like '1700000000000-0': {after!r}")
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
