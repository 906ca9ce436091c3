"""Users' own tools reach the runtime: `LocalRuntime(tools=...)` and ENGRAM_TOOLS ("module:attribute") add them
beside the built-ins, agents can list them, and a task calls them (with the call's idempotency key)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import uuid

import pytest

from runtime.local import LocalRuntime
from runtime.settings import Settings
from runtime.tools import BUILTIN_TOOL_NAMES, ToolRegistry, load_tools, runtime_registry, tools_of
from tests.runtime.conftest import delete_keys
from tests.runtime.hardening import ScriptModel

BANK = textwrap.dedent('''
    from runtime.tools import ToolRegistry

    CREDITED = []


    async def credit(account: str, cents: int, idempotency_key: str) -> dict:
        """Credit an account."""
        CREDITED.append((account, cents, idempotency_key))
        return {"credited": cents}


    def balance(account: str) -> dict:
        """An account's balance."""
        return {"cents": sum(c for a, c, _ in CREDITED if a == account)}


    tools = ToolRegistry()
    tools.register_function(credit, timeout_s=30)
    not_a_tool = 42
''')


@pytest.fixture
def bank(tmp_path, monkeypatch):
    """A user's module on the path: `bank_tools_<id>:tools` (a registry), `:balance` (a plain function)."""
    name = f"bank_tools_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(BANK)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_module_in_the_current_directory_loads_as_under_python_dash_m(tmp_path, monkeypatch):
    """`engram` is a console script: its sys.path lacks the directory it runs in, where a user's `bank.py` is.
    ENGRAM_TOOLS finds it there too (after everything on sys.path), as the README's example needs."""
    name = f"bank_cwd_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(BANK)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert [t.name for t in load_tools(f"{name}:tools")] == ["credit"]
    assert sys.path[-1] == str(tmp_path)
    with pytest.raises(ValueError, match="cannot import 'no_such_module_here'"):
        load_tools("no_such_module_here:tools")


def test_the_runtime_offers_the_builtins_and_yours_and_refuses_a_taken_name(bank):
    mine = load_tools(f"{bank}:tools, {bank}:balance")
    assert [t.name for t in mine] == ["credit", "balance"]
    registry = runtime_registry(mine)
    assert registry.names() == [*BUILTIN_TOOL_NAMES, "credit", "balance"]
    assert "idempotency_key" not in str(registry.get("credit").json_schema())  # filled in by the runtime
    with pytest.raises(ValueError, match="'calculator': a tool of that name is already offered"):
        runtime_registry([_named("calculator")])
    with pytest.raises(TypeError, match="not a tool"):
        tools_of(42)


def _named(name: str):
    def tool(x: int) -> dict:
        """A tool."""
        return {"x": x}

    tool.__name__ = name
    return tools_of(tool)[0]


@pytest.mark.parametrize(("spec", "message"), [
    ("no_colon", "expected 'module:attribute', got 'no_colon'"),
    ("no_such_module_xyz:tools", "cannot import 'no_such_module_xyz'"),
    ("{bank}:missing", "has no 'missing'"),
    ("{bank}:not_a_tool", "not a tool: 42"),
])
def test_a_bad_engram_tools_is_one_clear_error(bank, spec, message):
    with pytest.raises(ValueError, match="^ENGRAM_TOOLS: ") as refused:
        load_tools(spec.format(bank=bank))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_task_calls_your_tool_given_to_the_runtime_or_named_in_engram_tools(tmp_path, redis_url, bank):
    import importlib

    module = importlib.import_module(bank)
    model = ScriptModel([
        {"type": "tool_calls", "calls": [{"name": "credit", "arguments": {"account": "alice", "cents": 500}}]},
        {"type": "tool_calls", "calls": [{"name": "balance", "arguments": {"account": "alice"}}]},
        {"type": "final", "answer": "Credited."}])
    prefix = f"user-tools-{uuid.uuid4().hex[:8]}"
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, key_prefix=prefix, embedder="hashing",
                        tools=f"{bank}:balance")

    async def scenario():
        async with LocalRuntime(settings, model=model, tools=module.tools) as rt:
            await rt.agents.create("bank", "Credit accounts when asked.", tools=["credit", "balance"])
            task = await rt.tasks.submit("Credit alice 5 dollars.", agent="bank")
            await rt.orchestrator.run_session(task.id)
            _, steps = await rt.store.load(task.id)
            return await rt.tasks.get(task.id), steps

    try:
        task, steps = asyncio.run(scenario())
    finally:
        delete_keys(redis_url, prefix)
    assert task.status == "completed"
    (account, cents, key), = module.CREDITED
    assert (account, cents) == ("alice", 500) and key == steps[0].observations[0]["idempotency_key"]
    assert steps[1].observations[0]["result"] == {"cents": 500}


def test_an_agent_may_not_list_a_tool_nobody_registered(tmp_path, redis_url):
    from runtime.sdk.errors import InvalidRequestError

    prefix = f"user-tools-{uuid.uuid4().hex[:8]}"

    async def scenario():
        async with LocalRuntime(Settings(data_dir=tmp_path, redis_url=redis_url, key_prefix=prefix,
                                         embedder="hashing"), model=ScriptModel([])) as rt:
            with pytest.raises(InvalidRequestError, match="not registered: credit"):
                await rt.agents.create("bank", "Credit accounts.", tools=["credit"])

    try:
        asyncio.run(scenario())
    finally:
        delete_keys(redis_url, prefix)


def test_the_registry_lists_its_tools_in_order():
    registry = ToolRegistry()
    first, second = _named("first"), _named("second")
    registry.register(first)
    registry.register(second)
    assert registry.tools() == [first, second]
