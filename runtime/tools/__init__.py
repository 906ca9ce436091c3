"""Tools agents can call: the registry, user function tools and the built-ins."""

from runtime.tools.builtins import BUILTIN_TOOL_NAMES, builtin_tools
from runtime.tools.calculator import Calculator, CalculatorError, calculate, evaluate
from runtime.tools.clock import CurrentTime
from runtime.tools.functions import FunctionTool
from runtime.tools.idempotent_sql import SqlEffects
from runtime.tools.memory import MemoryForget, MemorySearch, MemoryWrite
from runtime.tools.registry import (
    Tool,
    ToolArgumentError,
    ToolContext,
    ToolError,
    ToolRegistry,
    UnknownToolError,
    idempotency_key_for,
)
from runtime.tools.schema import bound_schema, inline_schema, parameters_schema

__all__ = [
    "BUILTIN_TOOL_NAMES",
    "Calculator",
    "CalculatorError",
    "CurrentTime",
    "FunctionTool",
    "MemoryForget",
    "MemorySearch",
    "MemoryWrite",
    "SqlEffects",
    "Tool",
    "ToolArgumentError",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "UnknownToolError",
    "bound_schema",
    "builtin_tools",
    "calculate",
    "evaluate",
    "idempotency_key_for",
    "inline_schema",
    "parameters_schema",
]
