"""Tool timeouts and the session's wall-time limit, enforced while tools and the model run (issue 17, item 1):
a hanging tool becomes an error observation the model sees, its idempotency key stays reserved (the
timeout is its recorded result, so a resume never runs it again), and a session past its wall time fails
even while a tool or the model is still busy."""

from __future__ import annotations

import asyncio

import pytest

from runtime.tools import FunctionTool, ToolRegistry
from tests.runtime.hardening import FINAL, ScriptModel, agent, call, orchestrator, submit_and_run


def _hanging_tools(started: list[str], tool_timeout_s: float | None = None) -> ToolRegistry:
    async def hang(note: str) -> dict:
        """Wait for something that never happens."""
        started.append(note)
        await asyncio.sleep(3600)
        return {"never": True}

    async def echo(note: str) -> dict:
        """Return the note."""
        return {"note": note}

    tools = ToolRegistry([FunctionTool(hang, timeout_s=tool_timeout_s)])
    tools.register_function(echo)
    return tools


def test_hanging_tool_times_out_into_an_error_observation_and_stays_reserved(redis_url, key_prefix):
    started: list[str] = []
    model = ScriptModel([call("hang", note="a"), call("echo", note="b"), FINAL])
    definition = agent(["hang", "echo"], tool_timeout_s=0.3)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, _hanging_tools(started), definition)
        final, steps = await submit_and_run(orch)
        record = await orch.store.tool_record(final.session_id, f"{final.session_id}:0:0")
        await orch.store.close()
        return final, steps, record

    final, steps, record = asyncio.run(scenario())
    assert final.status == "completed" and started == ["a"]
    timed_out = steps[0].observations[0]
    assert "timed out after 0.3 s" in timed_out["error"] and "result" not in timed_out
    assert record is None  # recorded until the step committed; the step log holds the outcome now
    assert steps[1].observations[0]["result"] == {"note": "b"}  # the model saw the error and went on


def test_a_tool_timeout_of_its_own_overrides_the_agent_default(redis_url, key_prefix):
    started: list[str] = []
    model = ScriptModel([call("hang", note="a"), FINAL])
    definition = agent(["hang", "echo"], tool_timeout_s=3600)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, _hanging_tools(started, tool_timeout_s=0.2), definition)
        final, steps = await submit_and_run(orch)
        await orch.store.close()
        return final, steps

    final, steps = asyncio.run(scenario())
    assert final.status == "completed"
    assert "timed out after 0.2 s" in steps[0].observations[0]["error"]


def test_wall_time_limit_stops_a_session_whose_tool_is_still_running(redis_url, key_prefix):
    started: list[str] = []
    model = ScriptModel([call("hang", note="a"), FINAL])
    definition = agent(["hang", "echo"], tool_timeout_s=3600, max_wall_time_s=0.5)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, _hanging_tools(started), definition)
        final, steps = await submit_and_run(orch)
        await orch.store.close()
        return final, steps

    final, steps = asyncio.run(scenario())
    assert final.status == "failed" and final.error.startswith("wall-time limit reached")
    assert [s.kind for s in steps] == ["action", "error"]
    assert "wall-time limit" in steps[0].observations[0]["error"]  # the cut-off call is recorded, not lost


def test_wall_time_limit_stops_a_session_whose_model_call_hangs(redis_url, key_prefix):
    model = ScriptModel([FINAL], delay_s=3600)
    definition = agent([], max_wall_time_s=0.5)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, ToolRegistry(), definition)
        final, steps = await submit_and_run(orch)
        await orch.store.close()
        return final, steps

    final, steps = asyncio.run(scenario())
    assert final.status == "failed" and final.error.startswith("wall-time limit reached")
    assert [s.kind for s in steps] == ["error"]


def test_a_tool_timeout_must_be_a_positive_number():
    async def tool() -> dict:
        """Do nothing."""
        return {}

    for bad in (0, -1, float("inf"), True, "5"):
        with pytest.raises(ValueError, match="timeout_s"):
            ToolRegistry([FunctionTool(tool, timeout_s=bad)])
    assert ToolRegistry([FunctionTool(tool, timeout_s=2)]).timeout_s("tool", 60.0) == 2.0
    assert ToolRegistry([FunctionTool(tool)]).timeout_s("tool", 60.0) == 60.0
