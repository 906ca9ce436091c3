"""Orchestrator behaviour against real Redis and a real memory database: parse failures, context
summarization, cancellation, racing orchestrators, and a Redis restart in the middle of a run."""

from __future__ import annotations

import asyncio
import json

from memory_service.agent_memory.embedder import HashingEmbedder
from memory_service.agent_memory.store import AgentMemoryStore
from memory_service.service import MemoryService
from runtime.agents import AgentDefinition, AgentLimits
from runtime.model_client import ModelReply
from runtime.orchestrator import Orchestrator, OrchestratorSettings
from runtime.sessions import SessionStore
from runtime.tools import ToolRegistry, builtin_tools
from tests.runtime.crash_worker import AGENT, CALLS_PER_STEP, TOOL_STEPS, ScriptedModel, expected_memory_texts


class GarbageModel:
    """An external model that keeps answering with text that is not an action."""

    context_window = 100_000

    def __init__(self):
        self.calls = 0

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        self.calls += 1
        return ModelReply("I think the answer is 42", "stop", {})

    def count_tokens(self, messages) -> int:
        return 10


class ChattyModel(ScriptedModel):
    """Scripted actions with long observations and a tiny context window, so history must be folded."""

    context_window = 450

    def __init__(self):
        self.summaries = 0

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        if json_schema is not None and "summary" in json_schema.get("properties", {}):
            self.summaries += 1
            return ModelReply(json.dumps({"summary": f"folded part {self.summaries}"}), "stop", {})
        done = sum(1 for m in messages if m["role"] == "assistant")
        if done + self.summaries * 2 < 8:
            action = {"type": "tool_calls", "calls": [{"name": "calculator", "arguments": {"expression": "2**40"}}]}
        else:
            action = {"type": "final", "answer": "done"}
        return ModelReply(json.dumps(action), "stop", {})


def _orchestrator(redis_url, prefix, db_url, model, agent=AGENT, owner=None, **settings):
    store = SessionStore(redis_url, key_prefix=prefix)
    memory = MemoryService(AgentMemoryStore(db_url, HashingEmbedder(64)))
    tools = ToolRegistry(builtin_tools())
    defaults = dict(lease_ms=1000, heartbeat_s=0.2, retry_backoff_s=0.2)
    orchestrator = Orchestrator(store, model, tools, {agent.name: agent}, memory, owner=owner,
                                settings=OrchestratorSettings(**{**defaults, **settings}))
    return orchestrator, store, memory


async def _run_one(orch, store, memory, task: str, *, cancel: str | None = None):
    """Submit one session, (optionally request cancellation,) run it; -> (final state, steps)."""
    state = await orch.submit("t", AGENT.name, task)
    if cancel is not None:
        await orch.cancel(state.session_id, cancel)
    final = await orch.run_session(state.session_id)
    _, steps = await store.load(state.session_id)
    await store.close()
    memory.close()
    return final, steps


def test_unparseable_output_fails_cleanly_after_bounded_repairs(tmp_path, redis_url, key_prefix):
    model = GarbageModel()

    parts = _orchestrator(redis_url, key_prefix, f"sqlite:///{tmp_path}/m.db", model)
    final, steps = asyncio.run(_run_one(*parts, "say hi"))
    assert final.status == "failed"
    assert "could not be parsed after 2 repairs" in final.error and "not valid JSON" in final.error
    assert model.calls == 1 + AGENT.limits.max_parse_repairs
    assert [s.kind for s in steps] == ["error"]


def test_long_history_is_summarized_not_dropped(tmp_path, redis_url, key_prefix):
    agent = AgentDefinition(name="counter", instructions="Compute.", tools=["calculator"],
                            limits=AgentLimits(max_steps=30, max_tokens_per_step=64))
    db_url = f"sqlite:///{tmp_path}/m.db"

    async def scenario():
        orch, store, memory = _orchestrator(redis_url, key_prefix, db_url, ChattyModel(), agent=agent)
        state = await orch.submit("t", agent.name, "compute powers")
        final = await orch.run_session(state.session_id)
        _, steps = await store.load(state.session_id)
        episodes = await memory.list("t", agent.name, kinds=["episode"])
        await store.close()
        memory.close()
        return final, steps, episodes

    final, steps, episodes = asyncio.run(scenario())
    assert final.status == "completed"
    kinds = [s.kind for s in steps]
    assert "summary" in kinds and kinds[-1] == "final"
    assert final.summary and "folded part" in final.summary and final.summarized_through > 0
    assert [s.index for s in steps] == list(range(len(steps)))  # the full transcript stays retrievable
    assert all(obs["result"]["result"] == str(2**40) or obs["result"]["result"] == 2**40
               for s in steps if s.kind == "action" for obs in s.observations)
    types = sorted(e.metadata.get("type") for e in episodes.items)
    assert "context_summary" in types and "session_summary" in types


def test_cancel_stops_the_session_at_a_step_boundary(tmp_path, redis_url, key_prefix):
    parts = _orchestrator(redis_url, key_prefix, f"sqlite:///{tmp_path}/m.db", ScriptedModel())
    final, steps = asyncio.run(_run_one(*parts, "task-cancel", cancel="user pressed stop"))
    assert final.status == "cancelled" and final.error == "user pressed stop"
    assert [s.kind for s in steps] == ["error"]


async def _all_completed(store, ids) -> bool:
    return all([(await store.state(sid)).status == "completed" for sid in ids])


def _check_exactly_once(db_url, tasks, logs):
    from sqlalchemy import create_engine, text

    with create_engine(db_url).connect() as conn:
        facts = sorted(r.text for r in conn.execute(text("SELECT text FROM memories WHERE kind = 'fact'")))
    assert facts == sorted(t for task in tasks for t in expected_memory_texts(task))
    for steps in logs:
        assert [s.index for s in steps] == list(range(TOOL_STEPS + 1))


def test_two_orchestrators_racing_run_each_session_once(tmp_path, redis_url, key_prefix):
    db_url = f"sqlite:///{tmp_path}/m.db"
    tasks = [f"race-{i}" for i in range(10)]

    async def scenario():
        a, store, mem_a = _orchestrator(redis_url, key_prefix, db_url, ScriptedModel(), owner="orch-a")
        b, _store_b, mem_b = _orchestrator(redis_url, key_prefix, db_url, ScriptedModel(), owner="orch-b")
        ids = [(await a.submit("t", AGENT.name, task, session_id=f"r{i}")).session_id for i, task in enumerate(tasks)]
        stop = asyncio.Event()
        runners = [asyncio.create_task(o.run_pending(stop=stop, poll_s=0.02)) for o in (a, b)]
        for _ in range(600):
            if await _all_completed(store, ids):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*runners)
        logs = [(await store.load(sid))[1] for sid in ids]
        for resource in (store, _store_b):
            await resource.close()
        mem_a.close()
        mem_b.close()
        return logs

    logs = asyncio.run(scenario())
    assert len(logs[0]) == TOOL_STEPS + 1
    _check_exactly_once(db_url, tasks, logs)
    assert CALLS_PER_STEP >= 1


def test_sessions_complete_across_a_redis_restart(tmp_path, own_redis):
    db_url = f"sqlite:///{tmp_path}/m.db"
    tasks = [f"restart-{i}" for i in range(6)]

    async def scenario():
        orch, store, memory = _orchestrator(own_redis.url, "restart", db_url, ScriptedModel())
        ids = [(await orch.submit("t", AGENT.name, task, session_id=f"x{i}")).session_id
               for i, task in enumerate(tasks)]
        stop = asyncio.Event()
        runner = asyncio.create_task(orch.run_pending(stop=stop, poll_s=0.02))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_redis.restart, kill=True)  # SIGKILL; AOF brings the data back
        for _ in range(600):
            try:
                if await _all_completed(store, ids):
                    break
            except Exception:  # Redis still coming back
                pass
            await asyncio.sleep(0.05)
        stop.set()
        await runner
        logs = [(await store.load(sid))[1] for sid in ids]
        await store.close()
        memory.close()
        return logs

    logs = asyncio.run(scenario())
    _check_exactly_once(db_url, tasks, logs)
