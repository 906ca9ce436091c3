"""The built-in tools every registry can start from.

It deliberately does not: register anything by itself (pass `builtin_tools()` to a `ToolRegistry`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from runtime.tools.calculator import Calculator
from runtime.tools.clock import CurrentTime
from runtime.tools.memory import MemoryForget, MemorySearch, MemoryWrite
from runtime.tools.registry import Tool

BUILTIN_TOOL_NAMES = ("memory_write", "memory_search", "memory_forget", "calculator", "current_time")


def builtin_tools(*, clock: Callable[[], datetime] | None = None) -> list[Tool]:
    """Fresh instances of memory_write, memory_search, memory_forget, calculator and current_time."""
    return [MemoryWrite(), MemorySearch(), MemoryForget(), Calculator(), CurrentTime(clock)]
