"""Shared pieces of the orchestrator hardening tests: a model that follows a fixed script of actions, and an
orchestrator over real Redis with the tools a test gives it (no memory service: these tests are about the
loop, the leases and the store)."""

from __future__ import annotations

import asyncio
import json
import time

from runtime.agents import AgentDefinition, AgentLimits
from runtime.model_client import ModelError, ModelReply
from runtime.orchestrator import Orchestrator, OrchestratorSettings
from runtime.sessions import SessionStore
from runtime.tools import ToolRegistry


def call(name: str, **arguments) -> dict:
    return {"type": "tool_calls", "calls": [{"name": name, "arguments": arguments}]}


FINAL = {"type": "final", "answer": "done"}


def tokens(messages: list[dict]) -> int:
    """~4 characters per token, plus 4 per message (adds up per message, like a chat template)."""
    return sum(len(str(m.get("content") or "")) // 4 + 4 for m in messages)


class ScriptModel:
    """Answers step N with `actions[N]` (N = assistant turns in the prompt, summaries counted), like a
    real model refuses prompts longer than its context window, and counts ~4 characters per token."""

    def __init__(self, actions: list[dict], *, context_window: int = 100_000, delay_s: float = 0.0,
                 stream_chunks: int = 0):
        self.actions, self.context_window, self.delay_s = actions, context_window, delay_s
        self.stream_chunks = stream_chunks  # > 0: stream each action's text in this many on_delta pieces
        self.calls = 0
        self.summaries = 0
        self.called_ms: list[int] = []  # wall-clock time of each action request
        self.prompts: list[list[dict]] = []  # the messages of each action request

    def count_tokens(self, messages: list[dict]) -> int:
        return tokens(messages)

    async def complete(self, messages, *, json_schema, max_tokens, seed=None, on_delta=None) -> ModelReply:
        if tokens(messages) + max_tokens > self.context_window:
            raise ModelError(f"prompt of {tokens(messages)} tokens does not fit {self.context_window}")
        if json_schema is not None and "summary" in json_schema.get("properties", {}):
            self.summaries += 1
            return ModelReply(json.dumps({"summary": f"folded {self.summaries}"}), "stop", {})
        self.calls += 1
        self.called_ms.append(int(time.time() * 1000))
        self.prompts.append(messages)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        done = sum(1 for m in messages if m["role"] == "assistant")
        action = self.actions[min(done, len(self.actions) - 1)]
        text = json.dumps(action)
        if self.stream_chunks and on_delta is not None:
            size = -(-len(text) // self.stream_chunks)
            for start in range(0, len(text), size):
                await on_delta(text[start:start + size])
        return ModelReply(text, "stop", {"prompt_tokens": 1, "completion_tokens": 1})


def agent(tools: list[str], **limits) -> AgentDefinition:
    return AgentDefinition(name="worker", instructions="Do the task.", tools=tools,
                           limits=AgentLimits(**{"max_steps": 20, "max_tokens_per_step": 64, **limits}))


def orchestrator(redis_url: str, prefix: str, model, tools: ToolRegistry, definition: AgentDefinition, *,
                 owner: str | None = None, store: SessionStore | None = None, **settings) -> Orchestrator:
    store = store or SessionStore(redis_url, key_prefix=prefix)
    defaults = dict(lease_ms=2000, heartbeat_s=0.1, retry_backoff_s=0.1)
    return Orchestrator(store, model, tools, {definition.name: definition}, owner=owner,
                        settings=OrchestratorSettings(**{**defaults, **settings}))


async def submit_and_run(orch: Orchestrator, task: str = "do it", *, guard_s: float = 30.0):
    """Submit one session and drive it; -> (final state, steps). `guard_s` bounds a run that would hang."""
    state = await orch.submit("t", "worker", task)
    final = await asyncio.wait_for(orch.run_session(state.session_id), guard_s)
    _, steps = await orch.store.load(state.session_id)
    return final, steps
