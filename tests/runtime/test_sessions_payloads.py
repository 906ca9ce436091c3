"""Each payload of a session is stored once (issue: a 400-step session took 3.3x its payload in Redis).

The stored form of a step drops what it can derive and loads back equal; events refer to payloads and
resolve to them before and after the commit; the commit drops the step's tool records and streamed tokens;
and, through the real orchestrator on a real Redis, a session's bytes grow by about one byte per payload
byte (the old layout: tool record + step observation + event, and the action four times)."""

from __future__ import annotations

import asyncio
import json

import pytest

from runtime.sessions import Step, step_id_for
from runtime.sessions.payloads import pack_step, unpack_step
from runtime.tools import ToolRegistry

from .hardening import FINAL, ScriptModel, agent, call, orchestrator, submit_and_run

SID = "s1"


def _step(index: int, **fields) -> Step:
    return Step(step_id=step_id_for(SID, index), index=index, started_ms=5, committed_ms=9, **fields)


def _observation(index: int, position: int, name: str, arguments: dict, **outcome) -> dict:
    return {"call_index": position, "tool": name, "arguments": arguments,
            "idempotency_key": f"{SID}:{index}:{position}", **outcome}


ACTION = {"type": "tool_calls", "calls": [{"name": "echo", "arguments": {"note": "a"}},
                                         {"name": "calculator", "arguments": {"expression": "1.5 * 2"}}]}
CASES = {
    "output is the action's JSON": _step(0, kind="action", model_output=json.dumps(ACTION), action=ACTION,
                                         observations=[_observation(0, 0, "echo", {"note": "a"}, result={"x": 1}),
                                                       _observation(0, 1, "calculator", {"expression": "1.5 * 2"},
                                                                    error="boom")]),
    "output differs from the action": _step(1, kind="action", model_output='{"type": "tool_calls"} junk',
                                            action=ACTION, observations=[]),
    "a number written differently": _step(2, kind="final", model_output='{"type": "final", "answer": 1}',
                                          action={"type": "final", "answer": 1.0}),
    "an observation with extra fields": _step(3, kind="action", model_output=json.dumps(ACTION), action=ACTION,
                                              observations=[{**_observation(3, 0, "echo", {"note": "a"},
                                                                            result=2), "extra": True}]),
    "a summary step": _step(4, kind="summary", model_output='{"summary": "s"}', usage={"prompt_tokens": 3}),
    "an error step": _step(5, kind="error"),
    "memories and usage": _step(6, kind="final", model_output='{"type":"final","answer":"ok"}',
                                action={"type": "final", "answer": "ok"},
                                retrieved_memories=[{"id": "m", "text": "t", "score": 0.5}], usage={"cached": 2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_stored_step_loads_back_equal(name):
    step = CASES[name]
    assert unpack_step(pack_step(step), SID) == step
    assert unpack_step(step.model_dump_json(), SID) == step  # entries stored whole (older layout) still load


def test_the_stored_form_keeps_each_payload_once():
    stored = json.loads(pack_step(CASES["output is the action's JSON"]))
    assert "action" not in stored and "step_id" not in stored  # derived from model_output / the session id
    assert stored["observations"] == [{"result": {"x": 1}}, {"error": "boom"}]  # the rest comes from the action
    kept = json.loads(pack_step(CASES["a number written differently"]))
    assert kept["action"] == {"type": "final", "answer": 1.0}  # 1 and 1.0 are not the same JSON: both kept


def _echo_tools(size: int) -> ToolRegistry:
    tools = ToolRegistry()

    async def echo(note: str) -> dict:
        """Echo a note with a fixed-size body."""
        return {"note": note, "body": "y" * size}

    tools.register_function(echo)
    return tools


async def _session(redis_url: str, prefix: str, size: int, steps: int = 12, stream_chunks: int = 0,
                   shown_chars: int = 1000):
    model = ScriptModel([call("echo", note=f"n{i}") for i in range(steps)] + [FINAL], stream_chunks=stream_chunks)
    orch = orchestrator(redis_url, prefix, model, _echo_tools(size),
                        agent(["echo"], max_tool_result_chars=shown_chars))
    final, logged = await submit_and_run(orch)
    keys = orch.store.keys.session(final.session_id)
    events, after = [], "0-0"
    while batch := await orch.store.events(final.session_id, after_id=after, count=500):
        events, after = events + batch, batch[-1][0]
    tools_left = await orch.store.redis.hgetall(keys.tools)
    used = await orch.store.bytes_used(final.session_id)
    await orch.store.close()
    return final, logged, events, tools_left, used


def test_commit_drops_tool_records_and_events_resolve_to_the_payloads(redis_url, key_prefix):
    final, steps, events, tools_left, _ = asyncio.run(_session(redis_url, key_prefix, 3000, steps=3,
                                                               stream_chunks=4))
    assert final.status == "completed"
    assert tools_left == {}  # every intent and result was folded into the step log by its commit
    assert not [e for e in events if e[1] == "model_tokens"]  # streamed tokens are dropped with the commit
    calls = [e[2] for e in events if e[1] == "tool_call"]
    results = [e[2] for e in events if e[1] == "tool_result"]
    assert calls == [{"index": i, "call_index": 0, "tool": "echo", "arguments": {"note": f"n{i}"}} for i in range(3)]
    for i, data in enumerate(results):
        full = steps[i].observations[0]["result"]
        assert full == {"note": f"n{i}", "body": "y" * 3000}  # the step log has it in full
        assert data["result"].startswith(json.dumps(full)[:1000]) and "characters cut" in data["result"]


def test_events_resolve_before_the_commit_from_the_tool_records(redis_url, key_prefix):
    """A reader during a step (tool ran, step not committed) sees the call and its result."""
    seen: list = []

    async def scenario():
        tools = ToolRegistry()

        async def probe(note: str) -> dict:
            """Echo the note."""
            return {"note": note}

        tools.register_function(probe)
        model = ScriptModel([call("probe", note="a"), FINAL], stream_chunks=2)
        orch = orchestrator(redis_url, key_prefix, model, tools, agent(["probe"]))
        commit = orch._commit

        async def spying_commit(run, step, patch):
            if step.kind == "action":
                seen.extend(await orch.store.events(run.state.session_id, count=100))
            await commit(run, step, patch)

        orch._commit = spying_commit
        final, _ = await submit_and_run(orch)
        await orch.store.close()
        return final

    assert asyncio.run(scenario()).status == "completed"
    kinds = [kind for _, kind, _ in seen]
    assert "model_tokens" in kinds  # still there while the step is open
    assert [d for _, k, d in seen if k == "tool_call"] == [{"index": 0, "call_index": 0, "tool": "probe",
                                                            "arguments": {"note": "a"}}]
    assert [d for _, k, d in seen if k == "tool_result"] == [{"index": 0, "call_index": 0, "result": {"note": "a"}}]


def test_session_bytes_grow_by_about_one_byte_per_payload_byte(redis_url, key_prefix):
    """Two sessions that differ only in the size of each tool result: the extra bytes Redis holds are the
    extra payload about once (the old layout stored each result three times)."""
    small, big, steps = 100, 5100, 12
    *_, used_small = asyncio.run(_session(redis_url, key_prefix, small, steps, shown_chars=10_000))
    *_, used_big = asyncio.run(_session(redis_url, key_prefix, big, steps, shown_chars=10_000))
    copies = (used_big - used_small) / ((big - small) * steps)
    assert 0.9 <= copies <= 1.2, f"{copies:.2f} copies of each extra payload byte"
