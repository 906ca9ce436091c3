"""Users' own tools in the runtime. `runtime_registry(extra)` is the registry a runtime offers: the built-in
tools plus the user's (`LocalRuntime(tools=...)`), and `load_tools(spec)` imports them from `ENGRAM_TOOLS`
("package.module:attribute", several comma-separated), so `engram run`, `engram serve` and the Ray Serve
ingress offer them with no code of their own. An attribute may be a `ToolRegistry`, a `Tool`, a typed
function (registered as `FunctionTool`), or a list of those."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from typing import Any

from runtime.tools.builtins import builtin_tools
from runtime.tools.registry import Tool, ToolRegistry


def tools_of(value: Any) -> list[Tool]:
    """The tools a registry, a tool, a function or a list of them stands for."""
    from runtime.tools.functions import FunctionTool

    if isinstance(value, ToolRegistry):
        return list(value.tools())
    if isinstance(value, Tool):
        return [value]
    if callable(value):
        return [FunctionTool(value)]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        return [tool for item in value for tool in tools_of(item)]
    raise TypeError(f"not a tool: {value!r} (expected a ToolRegistry, a Tool, a function, or a list of them)")


def _import_from_path_or_cwd(module_name: str):
    """Import `module_name`; one not found on sys.path is looked for in the current directory too (last, so it
    shadows nothing), as `python -m` would: `engram` is a console script, whose path lacks the directory it
    is run from, where a user's `bank.py` sits."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != module_name.partition(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def load_tools(spec: str) -> list[Tool]:
    """Import the tools `spec` names ("module:attribute[,module:attribute...]"); ValueError in one line."""
    out: list[Tool] = []
    for part in (p.strip() for p in spec.split(",")):
        module_name, _, attribute = part.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"ENGRAM_TOOLS: expected 'module:attribute', got {part!r}")
        try:
            module = _import_from_path_or_cwd(module_name)
        except ImportError as exc:
            raise ValueError(f"ENGRAM_TOOLS: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
        try:
            value = getattr(module, attribute)
        except AttributeError:
            raise ValueError(f"ENGRAM_TOOLS: module {module_name!r} has no {attribute!r}") from None
        try:
            out.extend(tools_of(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ENGRAM_TOOLS: {part}: {exc}") from None
    return out


def runtime_registry(extra: Iterable[Tool] = ()) -> ToolRegistry:
    """The built-in tools and `extra`; ValueError when one of `extra` takes a built-in's name (or another's)."""
    registry = ToolRegistry(builtin_tools())
    for tool in extra:
        if tool.name in registry:
            raise ValueError(f"tool {tool.name!r}: a tool of that name is already offered; register yours under "
                             f"another name")
        registry.register(tool)
    return registry
