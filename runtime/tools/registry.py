"""The tool registry: pydantic-typed tools, their JSON schemas, and validated calls.

A `Tool` has a name, a description, a pydantic model of its arguments and an async `run`. The
`ToolRegistry` holds the tools an orchestrator may offer, renders their schemas for prompts and action
grammars, and runs one call: validate the arguments (ToolArgumentError naming the field), run the tool
with its `ToolContext`, and return a plain JSON object. Every failure reaches the caller as a
`ToolError`, which the orchestrator records as the call's observation.

Each call's context carries its idempotency key `"{session_id}:{step_index}:{call_index}"`: the
orchestrator re-runs a call whose result was not recorded before a crash with the same key, so a tool
with effects uses the key to apply them once.

A tool may set `timeout_s` (seconds per call); the orchestrator uses it instead of the agent's
`limits.tool_timeout_s`, and cancels a call that runs longer (a sync function's worker thread cannot be
stopped: it runs on, but its late result is ignored).

It deliberately does not: record intents or results (the session store does), retry or time out calls
(the orchestrator does, with the timeouts above), or turn plain Python functions into tools (`functions.py`).
"""

from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from runtime.tools.schema import parameters_schema

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI-style function calling accepts


def idempotency_key_for(session_id: str, step_index: int, call_index: int) -> str:
    """The idempotency key of one tool call: `"{session_id}:{step_index}:{call_index}"`."""
    return f"{session_id}:{step_index}:{call_index}"


@dataclass(frozen=True)
class ToolContext:
    """Who is calling and which call this is; `memory` is the MemoryService (None when there is none).

    `idempotency_key` defaults to `idempotency_key_for(session_id, step_index, call_index)`.
    """

    tenant: str
    agent: str
    session_id: str
    step_index: int
    call_index: int
    memory: Any = None
    idempotency_key: str = ""

    def __post_init__(self) -> None:
        for field in ("tenant", "agent", "session_id"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{field} must be a non-empty str, got {value!r}")
        for field in ("step_index", "call_index"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be an int >= 0, got {value!r}")
        if not isinstance(self.idempotency_key, str):
            raise TypeError(f"idempotency_key must be a str, got {type(self.idempotency_key).__name__}")
        if not self.idempotency_key:
            key = idempotency_key_for(self.session_id, self.step_index, self.call_index)
            object.__setattr__(self, "idempotency_key", key)


class ToolError(Exception):
    """A tool call failed; `tool` names the tool (set by the registry when the tool did not)."""

    def __init__(self, message: str, *, tool: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.tool = tool

    def __str__(self) -> str:
        return f"tool {self.tool!r}: {self.message}" if self.tool else self.message


class ToolArgumentError(ToolError, ValueError):
    """The arguments do not fit the tool's schema; `fields` lists the offending argument paths."""

    def __init__(self, message: str, *, tool: str | None = None, fields: list[str] | None = None) -> None:
        super().__init__(message, tool=tool)
        self.fields = fields or []


class UnknownToolError(ToolError, KeyError):
    """No tool of that name is registered."""


class Tool(ABC):
    """A pydantic-typed tool: subclasses set `name`, `description`, `args_model` and implement `run`."""

    name: str
    description: str
    args_model: type[BaseModel]
    timeout_s: float | None = None  # per call; None: the agent's limits.tool_timeout_s

    def json_schema(self) -> dict[str, Any]:
        """`{"name", "description", "parameters"}` with the arguments' self-contained JSON schema (built once
        per tool: the orchestrator asks for it at every step). A fresh copy each call: callers may edit it."""
        cached = self.__dict__.get("_json_schema")
        if cached is None or cached[0] != (self.name, self.description, self.args_model):
            schema = {"name": self.name, "description": self.description,
                      "parameters": parameters_schema(self.args_model)}
            cached = self.__dict__["_json_schema"] = ((self.name, self.description, self.args_model), schema)
        return copy.deepcopy(cached[1])

    @abstractmethod
    async def run(self, args: BaseModel, ctx: ToolContext) -> dict[str, Any]:
        """Run with validated arguments; return a JSON-serialisable dict (raise ToolError on failure)."""


def _check_tool(tool: Any) -> None:
    if not isinstance(tool, Tool):
        raise TypeError(f"tool must be a runtime.tools.Tool, got {type(tool).__name__}")
    if not isinstance(tool.name, str) or not TOOL_NAME.match(tool.name):
        raise ValueError(f"tool name must match {TOOL_NAME.pattern}, got {tool.name!r}")
    if not isinstance(tool.description, str) or not tool.description.strip():
        raise ValueError(f"tool {tool.name!r}: description must be a non-empty str")
    if not (isinstance(tool.args_model, type) and issubclass(tool.args_model, BaseModel)):
        raise TypeError(f"tool {tool.name!r}: args_model must be a pydantic BaseModel subclass")
    timeout = tool.timeout_s
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise ValueError(f"tool {tool.name!r}: timeout_s must be a positive number of seconds or None, "
                         f"got {timeout!r}")
    tool.json_schema()  # fails now, not at the first prompt, for arguments that cannot be described


def _argument_error(tool: str, exc: ValidationError) -> ToolArgumentError:
    problems, fields = [], []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "(arguments)"
        fields.append(path)
        problems.append(f"{path}: {error['msg']}")
    return ToolArgumentError("invalid arguments: " + "; ".join(problems), tool=tool, fields=fields)


def _plain_result(tool: str, result: Any) -> dict[str, Any]:
    """A tool's return value as a plain JSON object; models are dumped, other values wrapped as {"result"}."""
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    if not isinstance(result, dict):
        result = {"result": result}
    try:
        return json.loads(json.dumps(result, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ToolError(f"returned a result that is not JSON-serialisable ({exc})", tool=tool) from exc


class ToolRegistry:
    """The tools an orchestrator can offer, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add a tool; ValueError if its name is taken or invalid."""
        _check_tool(tool)
        if tool.name in self._tools:
            raise ValueError(f"tool name {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def register_function(self, fn: Any, *, name: str | None = None, description: str | None = None,
                          timeout_s: float | None = None) -> Tool:
        """Register a typed (sync or async) Python callable as a tool; see `FunctionTool`. Returns the tool."""
        from runtime.tools.functions import FunctionTool

        tool = FunctionTool(fn, name=name, description=description, timeout_s=timeout_s)
        self.register(tool)
        return tool

    def timeout_s(self, name: str, default: float) -> float:
        """Seconds one call of tool `name` may run: its own `timeout_s`, else `default`."""
        own = self.get(name).timeout_s
        return default if own is None else float(own)

    def get(self, name: str) -> Tool:
        """The tool called `name`; UnknownToolError (a KeyError) listing the registered names otherwise."""
        try:
            return self._tools[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownToolError(f"unknown tool {name!r} (registered: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def tools(self) -> list[Tool]:
        """The registered tools, in registration order."""
        return list(self._tools.values())

    def schemas(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """JSON schemas of the named tools (all by default), in the given order."""
        chosen = self.names() if names is None else list(names)
        return [self.get(name).json_schema() for name in chosen]

    async def call(self, name: str, arguments: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        """Validate `arguments`, run the tool, return its JSON result; raises ToolError (or a subclass)."""
        tool = self.get(name)
        if not isinstance(ctx, ToolContext):
            raise TypeError(f"ctx must be a ToolContext, got {type(ctx).__name__}")
        if not isinstance(arguments, dict):
            raise ToolArgumentError(f"arguments must be a JSON object, got {type(arguments).__name__}",
                                    tool=name, fields=["(arguments)"])
        try:
            args = tool.args_model.model_validate(arguments)
        except ValidationError as exc:
            raise _argument_error(name, exc) from exc
        try:
            result = await tool.run(args, ctx)
        except ToolError as exc:
            exc.tool = exc.tool or name
            raise
        except Exception as exc:  # a tool's own failure becomes the call's observation
            raise ToolError(f"failed with {type(exc).__name__}: {exc}", tool=name) from exc
        return _plain_result(name, result)
