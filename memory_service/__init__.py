"""The memory service: Engram tables served to model workers (memory-mapped, hot-row cache, row-range shards)
and agents' long-term memory (SQL with a faiss index). No Ray imports anywhere below this package.

Names are imported on first use (PEP 562), so a light submodule loads without torch, faiss or SQLAlchemy.
"""

from importlib import import_module

_HOMES = {"MemoryService": "service", "EngramTableStore": "engram_tables", "ShardedEngramClient": "engram_client",
          "AgentMemoryStore": "agent_memory.store"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
