"""AgentCatalog: each tenant's agent definitions, kept in Redis beside the sessions that use them.

A tenant sees its own agents plus the built-in ones (shipped with the runtime, read-only, e.g.
`assistant`); a tenant's agent may not take a built-in's name. Definitions are validated on the way in
(`AgentDefinition`: unknown fields, bad limits and tools missing from the registry are refused, naming the
field). It is also the orchestrator's `AgentSource`: a session runs the definition its agent has when the
session's step starts.

Deliberately not here: running agents (the orchestrator) or HTTP (the api package).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis.asyncio as aioredis

from runtime.agents import DEFAULT_MODEL, AgentDefinition
from runtime.resources import Agent, AgentUpdate


class AgentNotFound(KeyError):
    """No agent of this name for the tenant."""


class AgentConflict(ValueError):
    """The agent exists already, or is built in and cannot be changed."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class AgentCatalog:
    def __init__(self, redis: aioredis.Redis, *, key_prefix: str = "engram",
                 builtin: Iterable[AgentDefinition] = (), tool_names: Iterable[str] | None = None,
                 model_names: Iterable[str] | None = None):
        """tool_names / model_names: what this runtime offers, so that an agent naming anything else is refused
        when it is defined (None: not checked)."""
        self._redis = redis
        self._prefix = key_prefix
        self.builtin = {agent.name: Agent(**agent.model_dump(), builtin=True) for agent in builtin}
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self.model_names = None if model_names is None else frozenset(model_names)

    def key(self, tenant: str) -> str:
        """The Redis hash of the tenant's own agents (name -> Agent JSON)."""
        return f"{self._prefix}:tenant:{tenant}:agents"

    def _check_tools(self, tools: list[str]) -> None:
        if self.tool_names is None:
            return
        missing = [name for name in tools if name not in self.tool_names]
        if missing:
            raise ValueError(f"tools: not registered: {', '.join(missing)} "
                             f"(available: {', '.join(sorted(self.tool_names)) or 'none'})")

    def _check_model(self, model: str) -> None:
        if self.model_names is None or model == DEFAULT_MODEL or model in self.model_names:
            return
        raise ValueError(f"model: {model!r} is not served here (served: {', '.join(sorted(self.model_names))}; "
                         f"{DEFAULT_MODEL!r} names the served one)")

    async def create(self, tenant: str, definition: AgentDefinition) -> Agent:
        self._check_tools(definition.tools)
        self._check_model(definition.model)
        if definition.name in self.builtin:
            raise AgentConflict(f"agent {definition.name!r} is built in; choose another name")
        now = _now_ms()
        agent = Agent(**definition.model_dump(), created_ms=now, updated_ms=now)
        if not await self._redis.hsetnx(self.key(tenant), definition.name, agent.model_dump_json()):
            raise AgentConflict(f"agent {definition.name!r} already exists")
        return agent

    async def get(self, tenant: str, name: str) -> Agent:
        raw = await self._redis.hget(self.key(tenant), name)
        if raw is not None:
            return Agent.model_validate_json(raw)
        if name in self.builtin:
            return self.builtin[name]
        raise AgentNotFound(f"agent {name!r} not found")

    async def list(self, tenant: str) -> list[Agent]:
        own = [Agent.model_validate_json(raw) for raw in (await self._redis.hgetall(self.key(tenant))).values()]
        return sorted([*self.builtin.values(), *own], key=lambda agent: agent.name)

    async def update(self, tenant: str, name: str, change: AgentUpdate) -> Agent:
        current = await self.get(tenant, name)
        if current.builtin:
            raise AgentConflict(f"agent {name!r} is built in and cannot be changed; create your own")
        fields = {k: v for k, v in change.model_dump(exclude_unset=True).items() if v is not None}
        merged = {**current.model_dump(include=set(AgentDefinition.model_fields)), **fields}
        definition = AgentDefinition.model_validate(merged)  # the whole definition stays valid
        self._check_tools(definition.tools)
        self._check_model(definition.model)
        agent = Agent(**definition.model_dump(), created_ms=current.created_ms, updated_ms=_now_ms())
        await self._redis.hset(self.key(tenant), name, agent.model_dump_json())
        return agent

    async def check_deletable(self, tenant: str, name: str) -> None:
        """AgentConflict for a built-in agent, AgentNotFound for no agent of that name."""
        if name in self.builtin:
            raise AgentConflict(f"agent {name!r} is built in and cannot be deleted")
        if not await self._redis.hexists(self.key(tenant), name):
            raise AgentNotFound(f"agent {name!r} not found")

    async def delete(self, tenant: str, name: str) -> None:
        if not await self._redis.hdel(self.key(tenant), name):
            await self.check_deletable(tenant, name)

    async def resolve(self, tenant: str, name: str) -> AgentDefinition | None:
        """The orchestrator's lookup: the definition, or None."""
        try:
            agent = await self.get(tenant, name)
        except AgentNotFound:
            return None
        return AgentDefinition.model_validate(agent.model_dump(include=set(AgentDefinition.model_fields)))

