"""User tools from plain Python callables: the arguments model is built from the signature's type hints.

`FunctionTool(fn)` turns `def lookup(city: str, days: int = 3) -> dict` (sync or async) into a `Tool`:
every parameter becomes a field of a pydantic model (its type hint, its default; `Annotated[..., Field(
description=...)]` adds per-argument descriptions), extra arguments are refused, and the description
is the docstring's first paragraph unless one is given. Two kinds of parameter are injected rather than
exposed to the model:
- `ctx` / `context` (or any parameter annotated `ToolContext`): the call's `ToolContext`;
- `idempotency_key: str`: the call's idempotency key, so the function can apply its effect once when the
  orchestrator re-runs a call after a crash.
Sync functions run in a worker thread so they never block the orchestrator's event loop. `timeout_s` bounds
one call (see `Tool.timeout_s`).

It deliberately does not: accept `*args`, `**kwargs` or positional-only parameters, guess types for
parameters without hints, or parse per-argument descriptions out of docstrings.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from runtime.tools.registry import TOOL_NAME, Tool, ToolContext

_CONTEXT_NAMES = frozenset({"ctx", "context"})
_KEY_NAME = "idempotency_key"
_UNSUPPORTED_KINDS = {
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
    inspect.Parameter.POSITIONAL_ONLY: "positional-only parameters",
}


def _type_hints(fn: Any) -> dict[str, Any]:
    """Resolved type hints of a function or callable object (string annotations evaluated)."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "func", None)
    if target is None:  # a callable instance: its class's __call__
        target = type(fn).__call__
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception as exc:  # NameError for unresolvable forward references, TypeError for odd objects
        raise TypeError(f"fn: could not resolve the type hints of {fn!r} ({exc})") from exc


def _summary(fn: Any) -> str:
    """The first paragraph of fn's docstring, on one line ('' without a docstring)."""
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


class FunctionTool(Tool):
    """A Tool that calls a plain Python function with the validated arguments as keyword arguments."""

    def __init__(self, fn: Any, *, name: str | None = None, description: str | None = None,
                 timeout_s: float | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        tool_name = getattr(fn, "__name__", None) if name is None else name
        if not isinstance(tool_name, str) or not TOOL_NAME.match(tool_name):
            raise ValueError(f"name must match {TOOL_NAME.pattern}, got {tool_name!r} (pass name=... explicitly)")
        text = _summary(fn) if description is None else description
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"description: tool {tool_name!r} needs a description (pass description= or a docstring)")
        self.name, self.description, self.timeout_s = tool_name, text.strip(), timeout_s
        self._fn, self._async = fn, _is_async(fn)
        self._context_params: list[str] = []
        self._key_params: list[str] = []
        self.args_model = self._arguments_model(fn)

    def _arguments_model(self, fn: Any) -> type[BaseModel]:
        hints = _type_hints(fn)
        fields: dict[str, Any] = {}
        for param in inspect.signature(fn).parameters.values():
            if param.kind in _UNSUPPORTED_KINDS:
                raise TypeError(f"fn: tool {self.name!r} cannot take {_UNSUPPORTED_KINDS[param.kind]} ({param.name})")
            hint = hints.get(param.name, inspect.Parameter.empty)
            if hint is ToolContext or (param.name in _CONTEXT_NAMES and hint is inspect.Parameter.empty):
                self._context_params.append(param.name)
            elif param.name in _CONTEXT_NAMES:
                raise TypeError(f"fn: parameter {param.name!r} is reserved for the ToolContext; annotate it "
                                f"as ToolContext or rename it")
            elif param.name == _KEY_NAME:
                if hint not in (str, inspect.Parameter.empty):
                    raise TypeError(f"fn: parameter {_KEY_NAME!r} receives the idempotency key and must be a str")
                self._key_params.append(param.name)
            elif hint is inspect.Parameter.empty:
                raise TypeError(f"fn: parameter {param.name!r} of tool {self.name!r} needs a type hint")
            else:
                default = ... if param.default is inspect.Parameter.empty else param.default
                fields[param.name] = (hint, default)
        try:
            return create_model(f"{self.name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
        except Exception as exc:  # pydantic: unsupported types, reserved field names
            raise TypeError(f"fn: cannot build an arguments model for tool {self.name!r} ({exc})") from exc

    async def run(self, args: BaseModel, ctx: ToolContext) -> Any:
        """Call the function with the arguments plus the injected context / idempotency key."""
        kwargs = {field: getattr(args, field) for field in type(args).model_fields}
        kwargs.update({param: ctx for param in self._context_params})
        kwargs.update({param: ctx.idempotency_key for param in self._key_params})
        if self._async:
            result = await self._fn(**kwargs)
        else:
            result = await asyncio.to_thread(self._fn, **kwargs)
        if inspect.isawaitable(result):  # e.g. a sync wrapper that returns a coroutine
            result = await result
        return result
