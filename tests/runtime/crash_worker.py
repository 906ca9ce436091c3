"""An orchestrator process for the crash test: serves every runnable session until killed.

The model here is `ScriptedModel`, a deterministic stand-in for the language model: the crash test is
about the orchestrator, Redis and the memory database, so each session's actions must be known in
advance (three steps that each write memories through the built-in `memory_write` tool, then a final
answer). It sleeps a little inside model calls so that SIGKILLs land at every point of a step.
Run as: python -m tests.runtime.crash_worker REDIS_URL KEY_PREFIX DATABASE_URL
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from memory_service.agent_memory.embedder import HashingEmbedder
from memory_service.agent_memory.store import AgentMemoryStore
from memory_service.service import MemoryService
from runtime.agents import AgentDefinition, AgentLimits
from runtime.model_client import ModelReply
from runtime.orchestrator import Orchestrator, OrchestratorSettings
from runtime.sessions import SessionStore
from runtime.tools import ToolRegistry, builtin_tools

TOOL_STEPS = 3
CALLS_PER_STEP = 2
AGENT = AgentDefinition(name="scribe", instructions="Record facts about the task, then answer.",
                        tools=["memory_write", "calculator"], limits=AgentLimits(max_steps=10))


def expected_memory_texts(task: str) -> list[str]:
    return [f"{task} / fact {step}.{call}" for step in range(TOOL_STEPS) for call in range(CALLS_PER_STEP)]


class ScriptedModel:
    """Chooses actions from the transcript: TOOL_STEPS steps of memory writes, then a final answer."""

    context_window = 100_000

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        await asyncio.sleep(random.uniform(0.005, 0.05))
        task = next(m["content"] for m in messages if m["role"] == "user")
        done = sum(1 for m in messages if m["role"] == "assistant")
        if done < TOOL_STEPS:
            calls = [{"name": "memory_write", "arguments": {"text": f"{task} / fact {done}.{c}"}}
                     for c in range(CALLS_PER_STEP)]
            action = {"type": "tool_calls", "calls": calls}
        else:
            action = {"type": "final", "answer": f"recorded {TOOL_STEPS * CALLS_PER_STEP} facts"}
        text = json.dumps(action)
        if on_delta is not None:
            await on_delta(text)
        return ModelReply(text, "stop", {"prompt_tokens": 10, "completion_tokens": 10, "cached_tokens": 0})

    def count_tokens(self, messages) -> int:
        return sum(len(str(m.get("content", ""))) // 4 for m in messages)


def build(redis_url: str, prefix: str, database_url: str):
    store = SessionStore(redis_url, key_prefix=prefix)
    memory = MemoryService(AgentMemoryStore(database_url, HashingEmbedder(64)))
    tools = ToolRegistry(builtin_tools())
    settings = OrchestratorSettings(lease_ms=800, heartbeat_s=0.2, max_concurrent_sessions=8)
    return Orchestrator(store, ScriptedModel(), tools, {AGENT.name: AGENT}, memory, settings=settings), store, memory


async def main(redis_url: str, prefix: str, database_url: str) -> None:
    orchestrator, store, memory = build(redis_url, prefix, database_url)
    print("ready", flush=True)  # the harness kills only after this, so every kill lands mid-work
    try:
        await orchestrator.run_pending(poll_s=0.05)
    finally:
        await store.close()
        memory.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
