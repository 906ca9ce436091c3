"""The SDK's resource namespaces (`agents`, `tasks`, `sessions`, `memories`), written once for both HTTP
clients: each method builds a `Call` and returns whatever the client's `_send` returns, the parsed
resource for `Client` and an awaitable of it for `AsyncClient`. Event streams and `wait` loop, so each
client implements those itself.

Deliberately not here: transport, retries, error mapping (the clients).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from runtime.resources import (
    Agent,
    AgentList,
    Memory,
    MemoryHits,
    MemoryPage,
    Session,
    Task,
    TaskPage,
    TaskTranscript,
)


@dataclass
class Call:
    method: str
    path: str
    parse: Callable[[Any], Any] | None = None  # JSON body -> result (None: no body, e.g. 204)
    json: dict | None = None
    params: dict | None = None
    headers: dict = field(default_factory=dict)
    retry_safe: bool = False  # a 5xx may be retried (reads, and writes with an idempotency key)


def _p(value: str) -> str:
    return quote(str(value), safe="")


def _drop_none(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


class Agents:
    def __init__(self, send):
        self._send = send

    def create(self, name: str, instructions: str, *, tools: list[str] | None = None, model: str = "default",
               memory: dict | None = None, limits: dict | None = None):
        body = _drop_none({"name": name, "instructions": instructions, "tools": list(tools or []), "model": model,
                           "memory": memory, "limits": limits})
        return self._send(Call("POST", "/v1/agents", Agent.model_validate, json=body))

    def get(self, name: str):
        return self._send(Call("GET", f"/v1/agents/{_p(name)}", Agent.model_validate, retry_safe=True))

    def list(self):
        return self._send(Call("GET", "/v1/agents", lambda body: AgentList.model_validate(body).data, retry_safe=True))

    def update(self, name: str, **fields):
        """Replace only the given fields: instructions, model, tools, memory, limits."""
        return self._send(Call("PATCH", f"/v1/agents/{_p(name)}", Agent.model_validate, json=fields,
                               retry_safe=True))

    def delete(self, name: str):
        return self._send(Call("DELETE", f"/v1/agents/{_p(name)}"))


class Tasks:
    def __init__(self, send):
        self._send = send

    def submit(self, input: str, *, agent: str = "assistant", session_id: str | None = None,
               idempotency_key: str | None = None):
        """Submit a task. A retried submission reuses one idempotency key (generated when not given), so it
        never creates a second task."""
        body = _drop_none({"agent": agent, "input": input, "session_id": session_id})
        key = idempotency_key or f"sdk-{uuid.uuid4().hex}"
        return self._send(Call("POST", "/v1/tasks", Task.model_validate, json=body,
                               headers={"Idempotency-Key": key}, retry_safe=True))

    def get(self, task_id: str):
        return self._send(Call("GET", f"/v1/tasks/{_p(task_id)}", Task.model_validate, retry_safe=True))

    def list(self, *, status: str | None = None, agent: str | None = None, created_after_ms: int | None = None,
             created_before_ms: int | None = None, limit: int = 20, cursor: str | None = None):
        params = _drop_none({"status": status, "agent": agent, "created_after_ms": created_after_ms,
                             "created_before_ms": created_before_ms, "limit": limit, "cursor": cursor})
        return self._send(Call("GET", "/v1/tasks", TaskPage.model_validate, params=params, retry_safe=True))

    def steps(self, task_id: str):
        """The task with every committed step (actions, tool calls and results, memories, usage)."""
        return self._send(Call("GET", f"/v1/tasks/{_p(task_id)}/steps", TaskTranscript.model_validate,
                               retry_safe=True))

    def cancel(self, task_id: str):
        return self._send(Call("POST", f"/v1/tasks/{_p(task_id)}/cancel", Task.model_validate, retry_safe=True))


class Sessions:
    def __init__(self, send):
        self._send = send

    def get(self, session_id: str):
        """The conversation: its tasks in order, each with its steps."""
        return self._send(Call("GET", f"/v1/sessions/{_p(session_id)}", Session.model_validate, retry_safe=True))

    def send(self, session_id: str, input: str, *, idempotency_key: str | None = None):
        """Continue the conversation with a new task (it sees the earlier tasks and their answers)."""
        key = idempotency_key or f"sdk-{uuid.uuid4().hex}"
        return self._send(Call("POST", f"/v1/sessions/{_p(session_id)}/messages", Task.model_validate,
                               json={"input": input}, headers={"Idempotency-Key": key}, retry_safe=True))


class Memories:
    def __init__(self, send):
        self._send = send

    def add(self, agent: str, text: str, *, kind: str = "fact", metadata: dict | None = None):
        body = _drop_none({"text": text, "kind": kind, "metadata": metadata})
        return self._send(Call("POST", f"/v1/agents/{_p(agent)}/memories", Memory.model_validate, json=body))

    def search(self, agent: str, query: str, *, k: int = 5, kinds: list[str] | None = None,
               metadata: dict | None = None, min_score: float | None = None, hybrid: bool = False):
        """The agent's k memories most similar to the query, best first (a list of MemoryHit)."""
        body = _drop_none({"query": query, "k": k, "kinds": kinds, "metadata": metadata, "min_score": min_score,
                           "hybrid": hybrid})
        return self._send(Call("POST", f"/v1/agents/{_p(agent)}/memories/search",
                               lambda b: MemoryHits.model_validate(b).data, json=body, retry_safe=True))

    def list(self, agent: str, *, kind: str | None = None, limit: int = 50, cursor: str | None = None):
        params = _drop_none({"kind": kind, "limit": limit, "cursor": cursor})
        return self._send(Call("GET", f"/v1/agents/{_p(agent)}/memories", MemoryPage.model_validate, params=params,
                               retry_safe=True))

    def get(self, agent: str, memory_id: str):
        return self._send(Call("GET", f"/v1/agents/{_p(agent)}/memories/{_p(memory_id)}", Memory.model_validate,
                               retry_safe=True))

    def update(self, agent: str, memory_id: str, *, text: str | None = None, metadata: dict | None = None):
        body = _drop_none({"text": text, "metadata": metadata})
        return self._send(Call("PATCH", f"/v1/agents/{_p(agent)}/memories/{_p(memory_id)}", Memory.model_validate,
                               json=body, retry_safe=True))

    def delete(self, agent: str, memory_id: str):
        return self._send(Call("DELETE", f"/v1/agents/{_p(agent)}/memories/{_p(memory_id)}"))
