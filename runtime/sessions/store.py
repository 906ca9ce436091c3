"""SessionStore: durable agent sessions in Redis - an append-only step log and a small state hash per
session, leases with fencing tokens, tool intent/result records, and a per-session event stream.

Every write is one idempotent Lua script (`lua.py`), and every call retries transport errors with bounded
exponential backoff, so a connection lost mid-call (or a Redis restart with AOF) neither loses nor doubles
a write. A commit stores only the new step, never the history again: bytes per step stay flat.

Protocol for an orchestrator: `claim` a session (gets a fencing token), `heartbeat` while working, pass
owner + token to every `append_step` / tool record (a stale token raises LeaseLost: stop at once), and
commit the last step with a terminal `status` in `state_patch` (or `finish`), which releases the lease,
publishes `final`/`error`, and gives the session's keys `finished_ttl_s`. `append_step` publishes
`step_committed` (and `final`/`error`) itself; the orchestrator emits the other event types.
`owner` must be unique per process incarnation (e.g. host:pid:uuid).

Events are at-least-once only in one corner: a call that timed out against a stalled (not restarted)
server may still run after its retry did.

Deliberately not here: the agent loop, tools, prompts (see `runtime.orchestrator`, `runtime.tools`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import lua
from .keys import KeySpace, SessionKeys
from .models import (
    TERMINAL_STATUSES,
    LeaseLost,
    SessionFinished,
    SessionNotFound,
    SessionState,
    Step,
    validate_patch,
    validate_session_id,
)
from .payloads import action_key, call_key, committed_record_fields, outcome_of, pack_step, resolve_event, unpack_step
from .retry import with_retry

T = TypeVar("T")
_PAGE = 256
_BLOCK_CHUNK_MS = 1000  # a long blocking read is split so it never outlives the socket timeout


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2]))


def _check_name(value: Any, name: str, max_len: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ValueError(f"{name} must be a non-empty string of at most {max_len} characters, got {value!r}")
    return value


def _check_positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_token(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"fencing_token must be a non-negative int, got {value!r}")
    return value


def _dumps(value: Any, name: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from exc


class SessionStore:
    """Durable sessions in Redis (async). See the module docstring for the protocol."""

    def __init__(self, redis_url: str, *, key_prefix: str = "engram", finished_ttl_s: int | None = 7 * 86400,
                 event_maxlen: int = 10_000, retry_attempts: int = 8, retry_base_s: float = 0.05,
                 retry_cap_s: float = 2.0, socket_timeout_s: float = 10.0) -> None:
        if not isinstance(redis_url, str) or not redis_url:
            raise ValueError(f"redis_url must be a non-empty string, got {redis_url!r}")
        _check_name(key_prefix, "key_prefix")
        if finished_ttl_s is not None:
            _check_positive_int(finished_ttl_s, "finished_ttl_s")
        _check_positive_int(event_maxlen, "event_maxlen")
        _check_positive_int(retry_attempts, "retry_attempts")
        if not retry_base_s > 0 or not retry_cap_s >= retry_base_s:
            raise ValueError("retry_base_s must be > 0 and retry_cap_s >= retry_base_s")
        self.keys = KeySpace(key_prefix)
        self.finished_ttl_s = finished_ttl_s
        self.event_maxlen = event_maxlen
        self._retry = dict(attempts=retry_attempts, base_s=retry_base_s, cap_s=retry_cap_s)
        # Our own retry loop replaces redis-py's, whose default backoff is seconds long.
        self._redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, retry=Retry(NoBackoff(), 0),
            socket_timeout=socket_timeout_s, socket_connect_timeout=min(socket_timeout_s, 2.0))
        self._scripts = {name: self._redis.register_script(getattr(lua, name)) for name in (
            "CREATE", "CLAIM", "HEARTBEAT", "RELEASE", "APPEND_STEP", "TOOL_INTENT", "TOOL_RESULT", "EMIT",
            "RUNNABLE")}
        self._tenants: dict[str, str] = {}  # session id -> tenant (immutable, so safe to cache)

    # -- plumbing -------------------------------------------------------------------------------------
    async def _retrying(self, what: str, operation: Callable[[int], Awaitable[T]]) -> T:
        return await with_retry(operation, what=what, **self._retry)

    async def _run(self, script: str, what: str, keys: list[str], args: list[Any]) -> list:
        return await self._retrying(what, lambda _attempt: self._scripts[script](keys=keys, args=args))

    @staticmethod
    def _raise_for(reply: list, session_id: str) -> None:
        code = reply[0]
        if code == "not_found":
            raise SessionNotFound(session_id)
        if code == "finished":
            raise SessionFinished(f"session {session_id} is {reply[1]}")
        if code == "lease_lost":
            raise LeaseLost(f"session {session_id}: {reply[1]}")

    def _session(self, session_id: str) -> SessionKeys:
        return self.keys.session(validate_session_id(session_id))

    def _remember(self, state: SessionState) -> SessionState:
        if len(self._tenants) > 100_000:
            self._tenants.clear()
        self._tenants[state.session_id] = state.tenant
        return state

    async def _tenant_of(self, session_id: str) -> str:
        if session_id not in self._tenants:
            await self.state(session_id)
        return self._tenants[session_id]

    # -- lifecycle ------------------------------------------------------------------------------------
    async def create(self, tenant: str, agent: str, task: str, *, session_id: str | None = None,
                     thread_id: str | None = None, context: str | None = None) -> SessionState:
        """A new pending session; the same `session_id` again returns the existing one (no duplicate).
        `thread_id` names the conversation it continues and `context` its earlier turns (both fixed here)."""
        _check_name(tenant, "tenant")
        _check_name(agent, "agent")
        if not isinstance(task, str):
            raise TypeError(f"task must be a str, got {type(task).__name__}")
        extra: list[str] = []
        if thread_id is not None:
            extra += ["thread_id", validate_session_id(thread_id, "thread_id")]
        if context is not None:
            if not isinstance(context, str):
                raise TypeError(f"context must be a str, got {type(context).__name__}")
            extra += ["context", context]
        session_id = uuid.uuid4().hex if session_id is None else session_id
        keys = self._session(session_id)
        indexes = [self.keys.tenant_index(tenant), self.keys.runnable, self.keys.creation_seq]
        code, fields = await self._run("CREATE", "create", [keys.state, *indexes],
                                       [session_id, tenant, agent, task, *extra])
        state = SessionState.from_fields(_pairs(fields))
        if code == "exists" and (state.tenant, state.agent) != (tenant, agent):
            raise ValueError(f"session_id {session_id!r} already belongs to tenant {state.tenant!r}, "
                             f"agent {state.agent!r}")
        return self._remember(state)

    async def state(self, session_id: str) -> SessionState:
        keys = self._session(session_id)
        fields = await self._retrying("state", lambda _a: self._redis.hgetall(keys.state))
        if not fields:
            raise SessionNotFound(session_id)
        return self._remember(SessionState.from_fields(fields))

    async def load(self, session_id: str) -> tuple[SessionState, list[Step]]:
        """The state and every committed step, read as one consistent snapshot (MULTI/EXEC)."""
        keys = self._session(session_id)

        async def read(_attempt: int) -> tuple[dict, list[str]]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys.state)
                pipe.lrange(keys.steps, 0, -1)
                return tuple(await pipe.execute())

        fields, raw_steps = await self._retrying("load", read)
        if not fields:
            raise SessionNotFound(session_id)
        state = self._remember(SessionState.from_fields(fields))
        steps = [unpack_step(raw, session_id) for raw in raw_steps]
        if len(steps) != state.step_count or any(step.index != i for i, step in enumerate(steps)):
            raise RuntimeError(f"session {session_id}: step log ({len(steps)} entries) disagrees with "
                               f"step_count {state.step_count}")
        return state, steps

    # -- leases ---------------------------------------------------------------------------------------
    async def claim(self, session_id: str, owner: str, lease_ms: int) -> SessionState:
        """Take the lease if it is free or expired (new fencing token), or extend our own live one (same
        token). LeaseLost if someone else holds a live lease; SessionFinished if the session is over."""
        _check_name(owner, "owner")
        _check_positive_int(lease_ms, "lease_ms")
        keys = self._session(session_id)
        reply = await self._run("CLAIM", "claim", [keys.state], [owner, lease_ms])
        self._raise_for(reply, session_id)
        return self._remember(SessionState.from_fields(_pairs(reply[1])))

    async def heartbeat(self, session_id: str, owner: str, fencing_token: int, lease_ms: int) -> int:
        """Extend our live lease by `lease_ms` from now; returns the new expiry (server ms). LeaseLost if
        the token is stale or the lease already expired."""
        _check_name(owner, "owner")
        _check_token(fencing_token)
        _check_positive_int(lease_ms, "lease_ms")
        keys = self._session(session_id)
        reply = await self._run("HEARTBEAT", "heartbeat", [keys.state], [owner, fencing_token, lease_ms])
        self._raise_for(reply, session_id)
        return int(reply[1])

    async def release(self, session_id: str, owner: str, fencing_token: int) -> None:
        """Give the lease up (no-op if we no longer hold it)."""
        _check_name(owner, "owner")
        _check_token(fencing_token)
        keys = self._session(session_id)
        self._raise_for(await self._run("RELEASE", "release", [keys.state], [owner, fencing_token]), session_id)

    # -- the step log ---------------------------------------------------------------------------------
    async def append_step(self, session_id: str, step: Step, owner: str, fencing_token: int, *,
                          state_patch: dict | None = None, transient_events: list[str] = ()) -> bool:
        """Commit `step` atomically: True when written now, False when it was already committed (a retry).

        The commit also deletes the step's tool records and the `transient_events` (ids of the step's
        streamed `model_tokens` events): the step log holds their payloads from then on (see payloads.py).
        LeaseLost for a stale token / lost lease, SessionFinished after a terminal commit, ValueError when
        `step.index` is not the next index. A terminal `status` in `state_patch` ends the session."""
        if not isinstance(step, Step):
            raise TypeError(f"step must be a Step, got {type(step).__name__}")
        if step.session_id != session_id:
            raise ValueError(f"step.step_id {step.step_id!r} does not belong to session {session_id!r}")
        _check_name(owner, "owner")
        _check_token(fencing_token)
        patch = validate_patch(state_patch)
        keys = self._session(session_id)
        tenant = await self._tenant_of(session_id)
        status = patch.get("status")
        committed = {"index": step.index, "kind": step.kind}  # the step id is the session id + index
        if status == "completed":
            terminal_type, terminal = "final", {"status": status, "answer": patch.get("final_answer")}
        else:
            terminal_type, terminal = "error", {"status": status, "error": patch.get("error")}
        ttl_ms = self.finished_ttl_s * 1000 if self.finished_ttl_s else 0
        reply = await self._run(
            "APPEND_STEP", "append_step",
            [keys.state, keys.steps, self.keys.runnable, keys.events, keys.tools,
             self.keys.tenant_index(tenant), self.keys.tenant_finished(tenant)],
            [owner, fencing_token, step.index, pack_step(step), _dumps(patch, "state_patch"), ttl_ms,
             self.event_maxlen, _dumps(committed, "event"), terminal_type, _dumps(terminal, "event"),
             session_id, json.dumps(committed_record_fields(step)), json.dumps(list(transient_events))])
        self._raise_for(reply, session_id)
        if reply[0] == "gap":
            raise ValueError(f"step.index {step.index} is not the next index of session {session_id} "
                             f"({reply[1]} steps committed): the step log must stay gap-free")
        return reply[0] == "ok"

    async def finish(self, session_id: str, step: Step, owner: str, fencing_token: int, *,
                     status: str = "completed", final_answer: str | None = None,
                     error: str | None = None) -> bool:
        """Commit the last step with a terminal status (append_step with the matching state_patch)."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {sorted(TERMINAL_STATUSES)}, got {status!r}")
        patch = {"status": status, "final_answer": final_answer, "error": error}
        return await self.append_step(session_id, step, owner, fencing_token, state_patch=patch)

    # -- tool effects ---------------------------------------------------------------------------------
    async def _tool_write(self, script: str, session_id: str, idempotency_key: str, payload: Any,
                          owner: str, fencing_token: int) -> dict:
        _check_name(idempotency_key, "idempotency_key", 512)
        _check_name(owner, "owner")
        _check_token(fencing_token)
        keys = self._session(session_id)
        reply = await self._run(script, script.lower(), [keys.state, keys.tools],
                                [owner, fencing_token, idempotency_key, _dumps(payload, "tool record")])
        self._raise_for(reply, session_id)
        if reply[0] == "no_intent":
            raise ValueError(f"no tool intent recorded for idempotency_key {idempotency_key!r}")
        return json.loads(reply[1])

    async def record_tool_intent(self, session_id: str, idempotency_key: str, tool: str, arguments: dict,
                                 owner: str, fencing_token: int) -> dict:
        """Record that a tool call is about to run (before running it). The first intent for a key wins;
        returns the recorded intent."""
        _check_name(tool, "tool")
        if not isinstance(arguments, dict):
            raise TypeError(f"arguments must be a dict, got {type(arguments).__name__}")
        intent = {"tool": tool, "arguments": arguments}
        return await self._tool_write("TOOL_INTENT", session_id, idempotency_key, intent, owner, fencing_token)

    async def record_tool_result(self, session_id: str, idempotency_key: str, result: dict, owner: str,
                                 fencing_token: int) -> dict:
        """Record a tool call's result (its intent must exist). The first result wins; returns it."""
        if not isinstance(result, dict):
            raise TypeError(f"result must be a dict, got {type(result).__name__}")
        return await self._tool_write("TOOL_RESULT", session_id, idempotency_key, result, owner, fencing_token)

    async def tool_record(self, session_id: str, idempotency_key: str) -> dict | None:
        """{"intent": {...}, "result": {...} | None}, or None if no intent was recorded."""
        _check_name(idempotency_key, "idempotency_key", 512)
        keys = self._session(session_id)
        intent, result = await self._retrying("tool_record", lambda _a: self._redis.hmget(
            keys.tools, f"intent:{idempotency_key}", f"result:{idempotency_key}"))
        if intent is None:
            return None
        return {"intent": json.loads(intent), "result": None if result is None else json.loads(result)}

    # -- cancellation ---------------------------------------------------------------------------------
    async def request_cancel(self, session_id: str, reason: str = "cancelled by request") -> None:
        """Ask for the session to stop: the orchestrator running it (or the next to pick it up) commits a
        terminal `cancelled` step before its next step. Stored beside the tool records, so it expires with
        the session's other keys."""
        keys = self._session(session_id)
        await self.state(session_id)  # SessionNotFound for an unknown id
        payload = json.dumps({"reason": str(reason)[:500]})
        await self._retrying("request_cancel", lambda _a: self._redis.hsetnx(keys.tools, "cancel", payload))

    async def cancel_requested(self, session_id: str) -> str | None:
        """The cancellation reason, or None."""
        keys = self._session(session_id)
        raw = await self._retrying("cancel_requested", lambda _a: self._redis.hget(keys.tools, "cancel"))
        return None if raw is None else json.loads(raw)["reason"]

    # -- events ---------------------------------------------------------------------------------------
    async def emit(self, session_id: str, event_type: str, data: dict) -> str:
        """Append an event to the session's stream; returns its id (usable as SSE Last-Event-ID)."""
        _check_name(event_type, "event_type", 64)
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        keys = self._session(session_id)
        payload, nonce = _dumps(data, "data"), uuid.uuid4().hex[:8]  # told apart among the newest 256 entries
        reply = await self._retrying("emit", lambda attempt: self._scripts["EMIT"](
            keys=[keys.state, keys.events],
            args=[event_type, payload, self.event_maxlen, nonce, "1" if attempt else "0"]))
        self._raise_for(reply, session_id)
        return reply[1]

    async def events(self, session_id: str, after_id: str = "0-0", block_ms: int | None = None,
                     count: int = 100) -> list[tuple[str, str, dict]]:
        """Up to `count` events with ids after `after_id`, oldest first, as (id, type, data). With
        `block_ms`, waits up to that long for the first one when none is there yet."""
        keys = self._session(session_id)
        if not isinstance(after_id, str) or not after_id:
            raise ValueError(f"after_id must be a stream id like '1700000000000-0', got {after_id!r}")
        _check_positive_int(count, "count")
        if block_ms is not None and (not isinstance(block_ms, int) or block_ms < 0):
            raise ValueError(f"block_ms must be None or an int >= 0, got {block_ms!r}")
        remaining = block_ms
        while True:
            chunk = None if remaining is None else max(1, min(remaining, _BLOCK_CHUNK_MS))
            reply = await self._retrying("events", lambda _a, chunk=chunk: self._redis.xread(
                {keys.events: after_id}, count=count, block=chunk))
            entries = reply[0][1] if reply else []
            if entries or remaining is None or remaining <= chunk:
                events = [(entry_id, fields.get("type", ""), json.loads(fields.get("data", "{}")))
                          for entry_id, fields in entries]
                return await self._resolve_references(session_id, keys, events)
            remaining -= chunk

    async def _resolve_references(self, session_id: str, keys: SessionKeys,
                                  events: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
        """Events whose data refers to a payload (tool calls and results) with the payload filled in, read in
        one transaction from the tool records (step not yet committed) or the step log (committed)."""
        wanted = [data for _, _, data in events if "ref" in data]
        if not wanted:
            return events
        indexes = sorted({data["index"] for data in wanted})
        calls = sorted({(data["index"], data["call_index"]) for data in wanted})

        async def read(_attempt: int) -> list:
            async with self._redis.pipeline(transaction=True) as pipe:
                for index in indexes:
                    pipe.hget(keys.tools, f"intent:{action_key(session_id, index)}")
                    pipe.lindex(keys.steps, index)
                for index, call_index in calls:
                    pipe.hget(keys.tools, f"result:{call_key(session_id, index, call_index)}")
                return await pipe.execute()

        replies = await self._retrying("resolve events", read)
        actions, steps = {}, {}
        for n, index in enumerate(indexes):
            intent, raw_step = replies[2 * n], replies[2 * n + 1]
            actions[index] = json.loads(intent)["arguments"] if intent else None
            steps[index] = unpack_step(raw_step, session_id) if raw_step else None
        outcomes: dict[int, dict[int, dict]] = {}
        for (index, call_index), raw in zip(calls, replies[2 * len(indexes):]):
            if raw:
                outcomes.setdefault(index, {})[call_index] = outcome_of(json.loads(raw))
        return [(event_id, kind, resolve_event(data, session_id, actions[data["index"]],
                                               outcomes.get(data["index"], {}), steps[data["index"]])
                 if "ref" in data else data) for event_id, kind, data in events]

    # -- listings -------------------------------------------------------------------------------------
    async def list_sessions(self, tenant: str, *, status: str | None = None, limit: int = 100) -> list[SessionState]:
        """The tenant's sessions, newest first, optionally only those with `status`."""
        _check_name(tenant, "tenant")
        _check_positive_int(limit, "limit")
        index = self.keys.tenant_index(tenant)
        found: list[SessionState] = []
        start = 0
        while len(found) < limit:
            ids = await self._retrying("list_sessions", lambda _a, s=start: self._redis.zrevrange(
                index, s, s + _PAGE - 1))
            if not ids:
                break
            for fields in await self._states(ids):
                if not fields:
                    continue  # expired after finishing; pruned from the index by later finishes
                state = self._remember(SessionState.from_fields(fields))
                if status is None or state.status == status:
                    found.append(state)
            start += _PAGE
        return found[:limit]

    async def page_sessions(self, tenant: str, *, before: int | None = None, limit: int = 100,
                            ) -> tuple[list[tuple[int, SessionState]], int | None]:
        """One page of the tenant's sessions, newest first, as (creation sequence number, state), starting
        below sequence number `before` (a cursor from a previous page); and the cursor of the next page
        (None at the end). Expired sessions are skipped."""
        _check_name(tenant, "tenant")
        _check_positive_int(limit, "limit")
        index = self.keys.tenant_index(tenant)
        top = "+inf" if before is None else f"({int(before)}"
        raw = await self._retrying("page_sessions", lambda _a: self._redis.zrevrangebyscore(
            index, top, "-inf", start=0, num=limit, withscores=True))
        ids = [session_id for session_id, _ in raw]
        page = [(int(score), self._remember(SessionState.from_fields(fields)))
                for (_, score), fields in zip(raw, await self._states(ids) if ids else []) if fields]
        next_cursor = int(raw[-1][1]) if len(raw) == limit else None
        return page, next_cursor

    async def runnable_count(self) -> int:
        """How many sessions are not finished (pending, or running under some lease): the queue depth."""
        return await self._retrying("runnable_count", lambda _a: self._redis.zcard(self.keys.runnable))

    async def ping(self) -> None:
        """Raise if Redis does not answer (one attempt, no retries: a readiness check)."""
        await self._redis.ping()

    def script(self, source: str, what: str) -> Callable[[list[str], list[Any]], Awaitable[list]]:
        """A Lua script of another module over this store's keys, run like the store's own: retried on
        transport errors, so it must be idempotent."""
        registered = self._redis.register_script(source)

        async def run(keys: list[str], args: list[Any]) -> list:
            return await self._retrying(what, lambda _attempt: registered(keys=keys, args=args))

        return run

    @property
    def redis(self) -> aioredis.Redis:
        """The client, for stores that keep their own keys under the same prefix (agents, API keys)."""
        return self._redis

    async def runnable_sessions(self, limit: int = 100, *, scan: int = 10_000) -> list[str]:
        """Ids of sessions that are pending, or running with no live lease (their owner died), oldest first:
        one script reading two fields per session, among the `scan` oldest unfinished sessions."""
        _check_positive_int(limit, "limit")
        _check_positive_int(scan, "scan")
        prefix, suffix = self.keys.state_key_affixes()
        return await self._run("RUNNABLE", "runnable_sessions", [self.keys.runnable], [limit, prefix, suffix, scan])

    async def _states(self, session_ids: list[str]) -> list[dict[str, str]]:
        async def read(_attempt: int) -> list[dict[str, str]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    pipe.hgetall(self.keys.session(session_id).state)
                return await pipe.execute()

        return await self._retrying("read states", read)

    # -- accounting -----------------------------------------------------------------------------------
    async def bytes_used(self, session_id: str) -> int:
        """Bytes Redis uses for the session's keys (MEMORY USAGE, every element counted)."""
        keys = self._session(session_id)

        async def measure(_attempt: int) -> int:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys.all():
                    pipe.memory_usage(key, samples=0)
                return sum(size or 0 for size in await pipe.execute())

        return await self._retrying("bytes_used", measure)

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
