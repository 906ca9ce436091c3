"""Each committed step records when it really started (issue 17, item 7): before its model call, not at its
commit."""

from __future__ import annotations

import asyncio

from runtime.tools import ToolRegistry
from tests.runtime.hardening import FINAL, ScriptModel, agent, call, orchestrator, submit_and_run


def test_started_ms_is_when_the_step_began_not_when_it_was_committed(redis_url, key_prefix):
    model = ScriptModel([call("echo", note="a"), FINAL], delay_s=0.05)
    tools = ToolRegistry()

    async def echo(note: str) -> dict:
        """Return the note."""
        return {"note": note}

    tools.register_function(echo)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, tools, agent(["echo"]))
        final, steps = await submit_and_run(orch)
        await orch.store.close()
        return final, steps

    final, steps = asyncio.run(scenario())
    assert final.status == "completed" and len(steps) == 2 == len(model.called_ms)
    for step, asked_ms in zip(steps, model.called_ms):
        # the model was asked (and took 50 ms) between the step's start and its commit
        assert step.started_ms <= asked_ms < step.committed_ms
    assert steps[0].committed_ms <= steps[1].started_ms
