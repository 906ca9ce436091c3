"""No poison sessions (issue 17, item 3): a tool result longer than the agent's bound is stored once in full and
shown to the model truncated with a marker saying how much was cut; a task too large for the model's
context is refused at submission with one clear error; a session whose prompt cannot fit even with its
history folded into a summary fails at once with that reason (instead of retrying until its wall time)."""

from __future__ import annotations

import asyncio
import json

import pytest

from runtime.agents import AgentDefinition, AgentLimits
from runtime.api.errors import classify
from runtime.orchestrator import TaskTooLarge
from runtime.tasks import TaskBoard
from runtime.tools import ToolRegistry
from tests.runtime.hardening import FINAL, ScriptModel, agent, call, orchestrator, submit_and_run

BLOB = "0123456789" * 5000  # a 50,000-character tool result: ~12,500 tokens, far over a 2,000-token context


def _blob_tools() -> ToolRegistry:
    tools = ToolRegistry()

    async def dump(part: str) -> dict:
        """Return a very long text."""
        return {"part": part, "text": BLOB}

    tools.register_function(dump)
    return tools


def test_a_long_tool_result_is_stored_in_full_and_shown_truncated(redis_url, key_prefix):
    model = ScriptModel([call("dump", part="a"), call("dump", part="b"), FINAL], context_window=2000)
    definition = agent(["dump"], max_tool_result_chars=1000)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, _blob_tools(), definition)
        final, steps = await submit_and_run(orch)
        record = await orch.store.tool_record(final.session_id, f"{final.session_id}:0:0")
        await orch.store.close()
        return final, steps, record

    final, steps, record = asyncio.run(scenario())
    assert final.status == "completed", final.error
    full = json.dumps({"part": "a", "text": BLOB}, ensure_ascii=False)
    assert steps[0].observations[0]["result"] == {"part": "a", "text": BLOB}  # the full result, in the step log
    assert record is None  # ... and only there: the commit dropped the tool record
    tool_turns = [m["content"] for m in model.prompts[1] if m["role"] == "tool"]
    shown = json.loads(tool_turns[0])[0]["result"]  # what the model saw of it
    assert shown.startswith(full[:1000])
    assert f"{len(full) - 1000} of {len(full)} characters cut" in shown and len(shown) < 1200


def test_a_task_too_large_for_the_context_is_refused_at_submission(redis_url, key_prefix):
    model = ScriptModel([FINAL], context_window=2000)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, ToolRegistry(), agent([]))
        board = TaskBoard(orch.store, None, key_prefix=key_prefix, check_input=orch.check_task)
        with pytest.raises(TaskTooLarge) as direct:
            await orch.submit("t", "worker", BLOB)
        with pytest.raises(TaskTooLarge) as through_board:
            await board.submit("t", "worker", BLOB)
        small, created = await board.submit("t", "worker", "a short task")
        listed = await orch.store.list_sessions("t")
        await orch.store.close()
        return direct.value, through_board.value, small, created, listed

    direct, through_board, small, created, listed = asyncio.run(scenario())
    status, message, field = classify(through_board)
    assert (status, field) == (422, "input")
    assert "too large for the model's context" in message and "2000-token context window" in message
    assert str(direct) == message
    assert created and [s.session_id for s in listed] == [small.id]  # nothing created for the refused ones


def test_a_prompt_that_cannot_fit_fails_the_session_at_once_with_that_reason(redis_url, key_prefix):
    model = ScriptModel([FINAL], context_window=2000)
    definition = AgentDefinition(name="worker", instructions="Follow these rules. " * 800,  # ~4,000 tokens
                                 limits=AgentLimits(max_tokens_per_step=64))

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, ToolRegistry(), definition)
        with pytest.raises(TaskTooLarge):  # refused at submission ...
            await orch.submit("t", "worker", "a short task")
        # ... and a session that exists anyway (created before its agent's instructions grew) fails at once
        state = await orch.store.create("t", "worker", "a short task")
        final = await asyncio.wait_for(orch.run_session(state.session_id), 30)
        _, steps = await orch.store.load(state.session_id)
        await orch.store.close()
        return final, steps

    final, steps = asyncio.run(scenario())
    assert final.status == "failed" and [s.kind for s in steps] == ["error"]
    assert final.error.startswith("the prompt cannot fit the model's context")
    assert model.calls == 0  # failed at once, without a doomed model call
