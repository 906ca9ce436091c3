"""Orchestrator behaviour against real Redis and a real memory database: parse failures, context
summarization, cancellation, racing orchestrators, and a Redis restart in the middle of a run."""

from __future__ import annotations

import asyncio
import json

import pytest

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

    def __init__(self, cut_summaries: bool = False):
        self.summaries, self.cut_summaries = 0, cut_summaries

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        if json_schema is not None and "summary" in json_schema.get("properties", {}):
            self.summaries += 1
            if self.cut_summaries:  # stopped at summary_max_tokens, mid-string
                return ModelReply('{"summary": "folded pa', "length", {})
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


class CutOffModel(GarbageModel):
    """Answers a long final answer; the first reply stops at the token limit mid-string, as a model does that
    runs out of its step's budget; the repair gets the whole reply. Keeps the schemas and prompts it saw."""

    ANSWER = "The flight to Lisbon leaves at 7:45 on Friday from gate B12; " * 5  # 310 characters

    def __init__(self):
        super().__init__()
        self.schemas, self.prompts = [], []

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        self.calls += 1
        self.schemas.append(json_schema)
        self.prompts.append(messages[-1]["content"])
        whole = json.dumps({"type": "final", "answer": self.ANSWER})
        return ModelReply(whole[:80], "length", {}) if self.calls == 1 else ModelReply(whole, "stop", {})


def test_a_cut_off_reply_is_repaired_and_a_long_answer_kept_whole(tmp_path, redis_url, key_prefix):
    model = CutOffModel()
    parts = _orchestrator(redis_url, key_prefix, f"sqlite:///{tmp_path}/m.db", model)
    final, _ = asyncio.run(_run_one(*parts, "when does the flight leave?"))
    assert final.status == "completed" and final.final_answer == CutOffModel.ANSWER
    assert model.calls == 2
    limit = AGENT.limits.max_tokens_per_step
    assert f"reached this step's limit of {limit} tokens before its JSON ended" in model.prompts[1]
    final_variant = next(v for v in model.schemas[0]["anyOf"] if v["properties"]["type"] == {"const": "final"})
    assert "maxLength" not in final_variant["properties"]["answer"]  # no bound of the runtime's own


@pytest.mark.parametrize("cut_summaries", [False, True], ids=["summarized", "summary-cut-off"])
def test_long_history_is_summarized_not_dropped(tmp_path, redis_url, key_prefix, cut_summaries):
    """Folded steps live on in the summary; when the model's summary is unusable (cut off at its token limit),
    in the steps themselves, not in the broken reply."""
    agent = AgentDefinition(name="counter", instructions="Compute.", tools=["calculator"],
                            limits=AgentLimits(max_steps=30, max_tokens_per_step=64))
    db_url = f"sqlite:///{tmp_path}/m.db"

    async def scenario():
        orch, store, memory = _orchestrator(redis_url, key_prefix, db_url, ChattyModel(cut_summaries), agent=agent)
        state = await orch.submit("t", agent.name, "compute powers")
        final = await orch.run_session(state.session_id)
        _, steps = await store.load(state.session_id)
        episodes = await memory.list("t", agent.name, kinds=["episode"])
        await store.close()
        memory.close()
        return final, steps, episodes

    final, steps, episodes = asyncio.run(scenario())
    assert final.status == "completed", final.error
    kinds = [s.kind for s in steps]
    assert "summary" in kinds and kinds[-1] == "final"
    assert final.summary and final.summarized_through > 0
    if cut_summaries:  # each fold keeps its steps, cut to fit; the broken replies are kept nowhere
        folds = [e.text for e in episodes.items if e.metadata.get("type") == "context_summary"]
        assert folds[0].startswith("steps 0-") and "(not summarized): step 0: action {'type': 'tool_calls'" in folds[0]
        assert all(line.startswith("steps ") for text in [*folds, final.summary] for line in text.split("\n"))
    else:
        assert "folded part" in final.summary
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


def test_memories_that_do_not_fit_are_left_out_least_relevant_first(tmp_path, redis_url, key_prefix):
    """A first step has no history to fold: when its retrieved memories do not all fit, the least relevant go
    and the rest stay (they used to go all at once)."""
    from tests.runtime.hardening import ScriptModel, tokens

    facts = [f"Fact {n} about the launch: " + f"detail{n} " * 120 for n in range(3)]

    async def run(context_window: int):
        model = ScriptModel([{"type": "final", "answer": "ok"}], context_window=context_window)
        orch, store, memory = _orchestrator(redis_url, key_prefix, f"sqlite:///{tmp_path}/m{context_window}.db", model)
        for text in facts:
            await memory.write("t", AGENT.name, text, kind="fact")
        state = await orch.submit("t", AGENT.name, "Tell me about the launch.")
        final = await orch.run_session(state.session_id)
        events = await store.events(state.session_id, count=500)
        await store.close()
        memory.close()
        hits = [data["memories"] for _, kind, data in events if kind == "memory_hits"]
        return final, (hits[0] if hits else []), tokens(model.prompts[0])

    final, everything, whole = asyncio.run(run(100_000))
    assert final.status == "completed" and len(everything) == 3
    per_memory = tokens([{"content": facts[0]}])  # about 240 tokens each
    room_for_one = whole - 2 * per_memory + per_memory // 2  # the prompt with one memory fits; with two it does not
    limits = AGENT.limits.max_tokens_per_step + OrchestratorSettings().context_margin_tokens
    final, kept, _ = asyncio.run(run(room_for_one + limits))
    assert final.status == "completed"
    assert [m["text"] for m in kept] == [everything[0]["text"]]  # the most relevant one
