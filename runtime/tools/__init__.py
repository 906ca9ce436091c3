"""Tools agents can call: the registry, user function tools and the built-ins.

Names are imported on first use (PEP 562): importing `runtime.tools.registry` or the built-ins does not
load `idempotent_sql` (SQLAlchemy) unless something asks for `SqlEffects`.
"""

from runtime.lazy_exports import lazy_getattr

_EXPORTS = {
    "BUILTIN_TOOL_NAMES": "builtins", "builtin_tools": "builtins",
    "Calculator": "calculator", "CalculatorError": "calculator", "calculate": "calculator", "evaluate": "calculator",
    "CurrentTime": "clock", "FunctionTool": "functions", "SqlEffects": "idempotent_sql",
    "load_tools": "loading", "runtime_registry": "loading", "tools_of": "loading",
    "MemoryForget": "memory", "MemorySearch": "memory", "MemoryWrite": "memory",
    "Tool": "registry", "ToolArgumentError": "registry", "ToolContext": "registry", "ToolError": "registry",
    "ToolRegistry": "registry", "UnknownToolError": "registry", "idempotency_key_for": "registry",
    "bound_schema": "schema", "inline_schema": "schema", "parameters_schema": "schema",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
