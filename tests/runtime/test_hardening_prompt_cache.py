"""The prompt built incrementally (issue 17, item 5): the per-session cache gives exactly the messages
`build_messages` gives for the whole history, at every step, through summaries; and the orchestrator's
prompt work per step (messages rendered and counted) stays flat as the session grows."""

from __future__ import annotations

import asyncio

from runtime.agents import AgentDefinition, AgentLimits
from runtime.prompt_cache import PromptCache
from runtime.prompts import build_messages
from runtime.sessions import SessionState, Step
from runtime.tools import ToolRegistry
from tests.runtime.hardening import FINAL, ScriptModel, agent, call, orchestrator, submit_and_run, tokens

AGENT = AgentDefinition(name="worker", instructions="Do the task.", tools=["echo"],
                        limits=AgentLimits(max_steps=200))
SCHEMAS = [{"name": "echo", "description": "Return the note.",
            "parameters": {"type": "object", "properties": {"note": {"type": "string"}}}}]


def _step(index: int, kind: str) -> Step:
    action = {"type": "tool_calls", "calls": [{"name": "echo", "arguments": {"note": f"n{index}"}}]}
    observations = [{"call_index": 0, "tool": "echo", "arguments": {"note": f"n{index}"},
                     "idempotency_key": f"s:{index}:0",
                     **({"result": {"note": f"n{index} é"}} if index % 3 else {"error": f"failed {index}"})}]
    if kind == "summary":
        return Step(step_id=f"s:{index}", index=index, kind="summary", model_output='{"summary": "x"}',
                    started_ms=1, committed_ms=2)
    return Step(step_id=f"s:{index}", index=index, kind="action", model_output="raw", action=action,
                observations=observations if index % 5 else [], started_ms=1, committed_ms=2)


def test_cached_prompt_equals_build_messages_at_every_step():
    cache = PromptCache(tokens)
    steps: list[Step] = []
    summary, through = None, 0
    for index in range(60):
        if index in (20, 41):  # the history is folded twice
            summary, through = f"summary through {index}", index - 7
            steps.append(_step(index, "summary"))
        else:
            steps.append(_step(index, "action"))
        state = SessionState(session_id="s", tenant="t", agent="worker", status="running", step_count=len(steps),
                             fencing_token=1, created_ms=0, updated_ms=0, task="the task", summary=summary,
                             summarized_through=through, context="User: hi\nAssistant: hello" if index % 2 else None)
        memories = [{"id": f"m{index}", "kind": "fact", "text": f"memory {index}", "score": 0.5}] if index % 4 else []
        expected = build_messages(AGENT, "the task", [s.model_dump() for s in steps], memories, SCHEMAS, summary,
                                  through, max_calls=AGENT.limits.max_tool_calls_per_step, context=state.context)
        messages, counted = cache.messages(AGENT, state, steps, memories, SCHEMAS)
        assert messages == expected, index
        assert counted == tokens(expected)  # exact for a count that adds up per message


class CountingModel(ScriptModel):
    """Records how many messages the orchestrator counts tokens of, per model call."""

    def __init__(self, actions):
        super().__init__(actions)
        self.counted: list[int] = [0]  # messages counted before each action request

    def count_tokens(self, messages):
        self.counted[-1] += len(messages)
        return tokens(messages)

    async def complete(self, messages, **kwargs):
        self.counted.append(0)
        return await super().complete(messages, **kwargs)


def test_prompt_work_per_step_stays_flat_as_the_session_grows(redis_url, key_prefix):
    model = CountingModel([call("echo", note=f"n{i}") for i in range(60)] + [FINAL])
    tools = ToolRegistry()

    async def echo(note: str) -> dict:
        """Return the note."""
        return {"note": note}

    tools.register_function(echo)

    async def scenario():
        orch = orchestrator(redis_url, key_prefix, model, tools, agent(["echo"], max_steps=100))
        final, _steps = await submit_and_run(orch)
        await orch.store.close()
        return final

    assert asyncio.run(scenario()).status == "completed"
    per_step = model.counted[:-1]  # [i]: messages counted to build step i's prompt
    assert len(per_step) == 61
    assert max(per_step[50:]) <= max(per_step[5:10])  # not growing with the history
