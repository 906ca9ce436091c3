"""Agent definitions: who an agent is (instructions, model, tools), what it remembers, and its limits.

An `AgentDefinition` is plain validated data (pydantic, unknown fields refused) that the SDK, the REST
layer and the orchestrator share; bad values raise pydantic's ValidationError (a ValueError) naming the
field. `check_tools` confirms the named tools exist in a registry before a session starts.

It deliberately does not: run anything (the orchestrator does), hold tool implementations (the
`ToolRegistry` does), or persist definitions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.tools.registry import TOOL_NAME

AGENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # a slug: usable in URLs, keys and memory scopes
DEFAULT_MODEL = "default"  # an agent's model when it names none: whichever model the runtime serves
MemoryKind = Literal["fact", "episode", "summary"]


class MemorySettings(BaseModel):
    """What long-term memory a step retrieves into its prompt, and whether the session's end is recorded."""

    model_config = ConfigDict(extra="forbid")

    retrieve: bool = True  # search memory for the latest turn at every step
    k: int = Field(5, ge=1, le=50)  # memories per step
    kinds: list[MemoryKind] | None = None  # None = every kind
    min_score: float | None = Field(None, ge=-1.0, le=1.0)  # cosine-similarity floor
    write_summary: bool = True  # write a summary episode when the session ends


class AgentLimits(BaseModel):
    """When a session stops short of a final answer (each limit ends it in a failed state with the reason)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(20, ge=1)
    max_tokens_per_step: int = Field(256, ge=1)  # completion tokens of one model call
    max_total_tokens: int = Field(100_000, ge=1)  # prompt + completion tokens over the session
    max_wall_time_s: float = Field(600.0, gt=0, allow_inf_nan=False)
    max_parse_repairs: int = Field(2, ge=0)  # re-asks after unparseable model output, per step
    max_tool_calls_per_step: int = Field(4, ge=1, le=32)
    max_tool_result_chars: int = Field(8000, ge=100)
    tool_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)  # per call, unless the tool sets its own


class AgentDefinition(BaseModel):
    """One agent: a slug name, its instructions, the model it runs on, the tools it may call."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=AGENT_NAME_PATTERN)
    instructions: str = Field(min_length=1, max_length=100_000)
    model: str = Field(DEFAULT_MODEL, min_length=1, max_length=256)  # a served model's name, or the served one
    tools: list[str] = Field(default_factory=list)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    limits: AgentLimits = Field(default_factory=AgentLimits)

    @field_validator("instructions")
    @classmethod
    def _instructions_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("instructions must not be blank")
        return value

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not TOOL_NAME.match(name):
                raise ValueError(f"tool name {name!r} must match {TOOL_NAME.pattern}")
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"tools listed more than once: {', '.join(duplicates)}")
        return value

    def check_tools(self, available: Iterable[str]) -> None:
        """ValueError naming every tool of this agent that is not in `available` (e.g. registry.names())."""
        known = set(available)
        missing = [name for name in self.tools if name not in known]
        if missing:
            raise ValueError(f"agent {self.name!r}: tools not registered: {', '.join(missing)} "
                             f"(registered: {', '.join(sorted(known)) or 'none'})")


class AgentSource(Protocol):
    """Where the orchestrator finds a session's agent: by tenant and name, None when there is none."""

    async def resolve(self, tenant: str, name: str) -> AgentDefinition | None: ...


class StaticAgents:
    """A fixed set of agents, the same for every tenant (embedded use and tests)."""

    def __init__(self, agents: Mapping[str, AgentDefinition] | Iterable[AgentDefinition]):
        items = agents.values() if isinstance(agents, Mapping) else agents
        self.by_name = {agent.name: agent for agent in items}

    async def resolve(self, tenant: str, name: str) -> AgentDefinition | None:
        return self.by_name.get(name)


def agent_source(agents: AgentSource | Mapping[str, AgentDefinition] | Iterable[AgentDefinition]) -> AgentSource:
    """An AgentSource as given, or a StaticAgents over a dict/list of definitions."""
    return agents if hasattr(agents, "resolve") else StaticAgents(agents)


DEFAULT_AGENT = AgentDefinition(
    name="assistant",
    instructions="You are a careful assistant. Use the calculator for arithmetic, remember useful facts with "
                 "memory_write, look things up with memory_search, and give a short final answer.",
    tools=["calculator", "memory_write", "memory_search", "current_time"],
    memory=MemorySettings(k=4),
    limits=AgentLimits(max_steps=6, max_tokens_per_step=384, max_tool_calls_per_step=2),
)
