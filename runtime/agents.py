"""Agent definitions: who an agent is (instructions, model, tools), what it remembers, and its limits.

An `AgentDefinition` is plain validated data (pydantic, unknown fields refused) that the SDK, the REST
layer and the orchestrator share; bad values raise pydantic's ValidationError (a ValueError) naming the
field. `check_tools` confirms the named tools exist in a registry before a session starts.

It deliberately does not: run anything (the orchestrator does), hold tool implementations (the
`ToolRegistry` does), or persist definitions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runtime.tools.registry import TOOL_NAME

AGENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # a slug: usable in URLs, keys and memory scopes
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


class AgentDefinition(BaseModel):
    """One agent: a slug name, its instructions, the model it runs on, the tools it may call."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=AGENT_NAME_PATTERN)
    instructions: str = Field(min_length=1, max_length=100_000)
    model: str = Field("default", min_length=1, max_length=256)
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
