"""The entry points the docs name import from the package itself (docs/memory-service.md names
`memory_service.MemoryService`), and a light import loads none of the heavy dependencies."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_documented_names_import_from_their_packages():
    from memory_service import AgentMemoryStore, EngramTableStore, MemoryService, ShardedEngramClient
    from memory_service.service import MemoryService as Defined
    from runtime import LocalRuntime, Settings
    from runtime.local import LocalRuntime as DefinedRuntime

    assert MemoryService is Defined and LocalRuntime is DefinedRuntime
    assert {AgentMemoryStore.__name__, EngramTableStore.__name__, ShardedEngramClient.__name__, Settings.__name__}
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        import memory_service

        memory_service.Nothing  # noqa: B018


def test_importing_the_packages_loads_no_heavy_dependency():
    code = ("import sys, memory_service, runtime; "
            "print(sorted(m for m in ('torch', 'faiss', 'sqlalchemy', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
