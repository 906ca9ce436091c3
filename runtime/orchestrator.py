"""The agent loop: run sessions step by step so that a crash at any instant loses and repeats nothing.

A run claims the session's lease and keeps it alive with a heartbeat that survives Redis outages; an
owner that loses it stops the session's work at once (`lease_keeper`). A step: load state and step log
from Redis -> (fold old turns into a summary when the context nears its limit) -> retrieve long-term
memories -> build the prompt -> ask the model for an action under a JSON schema (bounded repairs) -> run
the tool calls -> commit the step atomically with the lease's fencing token -> repeat until a final
answer, a limit, cancellation or a failure.

Tool results recorded exactly once: the parsed action of step N is recorded before any tool runs, so a resumed
run replays the same calls instead of asking the model again; each call records its intent (key
`session:step:call`) before running and its result after. On resume a recorded result is reused, and an
intent without a result runs again with the same key, which built-in tools deduplicate (memory writes
are idempotent by key). The final summary episode is written (idempotently) before the final commit.

Time: every tool call has a timeout (the tool's own `timeout_s`, else the agent's `limits.tool_timeout_s`);
a call that runs out is cancelled and its timeout recorded as its result (an error observation), so its
idempotency key stays reserved and a resume never runs it again. The session's wall-time limit cuts off
tool calls and model calls that are still running, and the session fails with that reason.

Size: a call's result longer than the agent's `limits.max_tool_result_chars` is stored in full (tool record,
then step log) and shown to the model and in events cut, with a marker saying how much was cut. A task
whose first prompt cannot fit the model's context is refused at submission (`check_task`, TaskTooLarge);
a session whose prompt cannot fit even with its history folded into a summary fails at once, saying so.
The prompt is built incrementally (`PromptCache`: each step rendered and counted once), so a step's
orchestrator work does not grow with the session; the exact token count is taken only near the budget.
Each payload is stored once (`sessions.payloads`): events refer to the action and the call outcomes, and
the commit of a step drops its tool records and its streamed `model_tokens` events.
This module holds no Redis or SQL code: that is `sessions` and the memory service.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from runtime.agents import AgentDefinition, AgentSource, agent_source
from runtime.lease_keeper import run_under_lease
from runtime.model_client import ModelClient
from runtime.prompt_cache import PromptCache
from runtime.prompts import (
    ActionParseError,
    action_schema,
    build_messages,
    cut_text,
    parse_action,
    repair_prompt,
    session_summary,
)
from runtime.sessions import LeaseLost, SessionState, SessionStore, Step
from runtime.sessions.payloads import action_key, bounded, call_event, call_key, outcome_event, outcome_of
from runtime.sessions.retry import RETRYABLE_ERRORS
from runtime.tools import ToolContext, ToolRegistry

log = logging.getLogger(__name__)
TERMINAL = ("completed", "failed", "cancelled")
SUMMARY_SCHEMA = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 2000}},
                  "required": ["summary"], "additionalProperties": False}
UNSUMMARIZED_CHARS = 2000  # folded steps kept as they were when the model's summary of them is unusable


def now_ms() -> int:
    return int(time.time() * 1000)


class TaskTooLarge(ValueError):
    """A task whose first prompt cannot fit the model's context window (refused at submission)."""


class _OutOfTime(Exception):
    """The session's wall-time limit passed while the model or memory retrieval was working."""


@dataclass
class OrchestratorSettings:
    lease_ms: int = 15_000
    heartbeat_s: float = 3.0
    max_concurrent_sessions: int = 8
    context_margin_tokens: int = 64  # head-room kept below the context window
    summary_max_tokens: int = 192
    # bounds on a constrained action: every string's length (None: none of its own, the step's token budget
    # ends a reply) and every array's and object's size
    max_string_chars: int | None = None
    max_items: int | None = None
    retry_backoff_s: float = 1.0  # after a dependency failure, before the session is tried again


@dataclass
class _Run:
    """One claimed session being driven by this orchestrator."""

    state: SessionState
    steps: list[Step]
    agent: AgentDefinition
    token: int
    prompt: PromptCache
    step_started_ms: int = field(default_factory=now_ms)  # when the step in progress began
    streamed: list[str] = field(default_factory=list)  # ids of the step's model_tokens events (dropped at commit)
    tokens_used: int = 0  # prompt + completion tokens of the committed steps

    def __post_init__(self) -> None:
        self.tokens_used = sum(_tokens_of(step) for step in self.steps)

    def step(self, kind: str, **fields) -> Step:
        """The step in progress, committed now."""
        index = self.state.step_count
        return Step(step_id=f"{self.state.session_id}:{index}", index=index, kind=kind,
                    started_ms=self.step_started_ms, committed_ms=now_ms(), **fields)


class Orchestrator:
    def __init__(self, store: SessionStore, model: ModelClient, tools: ToolRegistry,
                 agents: AgentSource | dict[str, AgentDefinition], memory=None, *, owner: str | None = None,
                 settings: OrchestratorSettings | None = None):
        self.store, self.model, self.tools, self.memory = store, model, tools, memory
        self.agents = agent_source(agents)  # per-tenant lookup (a catalog), or a fixed dict for every tenant
        self.owner = owner or f"orchestrator-{uuid.uuid4().hex[:8]}"
        self.settings = settings or OrchestratorSettings()
        self.finished: collections.Counter = collections.Counter()  # sessions this process ended, by status
        self.active: dict[str, asyncio.Task] = {}  # sessions run_pending is driving now
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """A session was submitted: let run_pending look now instead of at its next poll."""
        self._wakeup.set()

    # ---- public API -------------------------------------------------------------------------------
    async def cancel(self, session_id: str, reason: str = "cancelled by request") -> None:
        """Stop a session at its next step boundary (a step in flight finishes and is committed first)."""
        await self.store.request_cancel(session_id, reason)

    async def submit(self, tenant: str, agent: str, task: str, *, session_id: str | None = None,
                     thread_id: str | None = None, context: str | None = None) -> SessionState:
        """Create (idempotently by session_id) a pending session for a registered agent; `thread_id` and
        `context` tie it to the conversation it continues (see SessionStore.create)."""
        definition = await self.agents.resolve(tenant, agent)
        if definition is None:
            raise KeyError(f"unknown agent {agent!r}")
        if not task or not task.strip():
            raise ValueError("task: must not be empty")
        self._check_fits(definition, task)
        return await self.store.create(tenant, agent, task, session_id=session_id, thread_id=thread_id,
                                       context=context)

    async def check_task(self, tenant: str, agent: str, task: str) -> None:
        """TaskTooLarge when the first prompt of `task` for this agent cannot fit the model's context. Cheap
        for ordinary tasks: measured only when the task's UTF-8 bytes exceed half the context window (a
        shorter one that still does not fit fails its session at once, with the reason)."""
        if len(task.encode("utf-8", "replace")) <= self.model.context_window // 2:
            return
        definition = await self.agents.resolve(tenant, agent)
        if definition is not None:  # an unknown agent is the submission's to report
            self._check_fits(definition, task)

    def _check_fits(self, agent: AgentDefinition, task: str) -> None:
        messages = build_messages(agent, task, [], [], self.tools.schemas(agent.tools),
                                  max_calls=agent.limits.max_tool_calls_per_step)
        tokens, budget = self.model.count_tokens(messages), self._budget(agent)
        if tokens > budget:
            raise TaskTooLarge(f"input: the task is too large for the model's context: its first prompt is "
                               f"{tokens} tokens, more than the {budget} that a {self.model.context_window}-token "
                               f"context window leaves ({self._reserve(agent)}); shorten the task")

    def _budget(self, agent: AgentDefinition) -> int:
        """Prompt tokens a step may use: the context window less the reply and a margin."""
        return self.model.context_window - agent.limits.max_tokens_per_step - self.settings.context_margin_tokens

    def _reserve(self, agent: AgentDefinition) -> str:
        return (f"{agent.limits.max_tokens_per_step} tokens for the reply and {self.settings.context_margin_tokens} "
                f"of margin")

    async def run_session(self, session_id: str) -> SessionState:
        """Drive one session to a terminal state. LeaseLost when the lease is lost to another owner, or runs
        out while Redis is unreachable: the session's work here is then cancelled and commits nothing."""
        settings = self.settings
        sent = time.monotonic()
        state = await self.store.claim(session_id, self.owner, settings.lease_ms)
        token = state.fencing_token
        lost = False
        try:
            return await run_under_lease(self.store, session_id, self.owner, token, self._drive(session_id, token),
                                         lease_ms=settings.lease_ms, heartbeat_s=settings.heartbeat_s,
                                         valid_until=sent + settings.lease_ms / 1000)
        except LeaseLost:
            lost = True
            raise
        finally:
            if not lost:
                try:
                    await self.store.release(session_id, self.owner, token)
                except (LeaseLost, *RETRYABLE_ERRORS) as exc:  # the lease then simply expires
                    log.info("session %s: lease not released (%s)", session_id, exc)

    async def _drive(self, session_id: str, token: int) -> SessionState:
        state, steps = await self.store.load(session_id)
        if state.status in TERMINAL:
            return state
        agent = await self.agents.resolve(state.tenant, state.agent)
        run = _Run(state, steps, agent, token, PromptCache(self.model.count_tokens))
        if agent is None:
            await self._fail(run, f"unknown agent {state.agent!r}")
        while run.state.status not in TERMINAL:
            try:
                await self._step(run)
            except _OutOfTime:
                await self._fail(run, self._limit_exceeded(run) or "wall-time limit reached")
        return run.state

    async def run_pending(self, *, stop: asyncio.Event | None = None, poll_s: float = 0.2) -> None:
        """Serve forever: pick up pending sessions and sessions whose owner's lease expired."""
        limit = asyncio.Semaphore(self.settings.max_concurrent_sessions)
        active = self.active
        self._retry_after: dict[str, float] = {}
        while stop is None or not stop.is_set():
            now = time.monotonic()
            for session_id in await self.store.runnable_sessions(limit=self.settings.max_concurrent_sessions * 4):
                if session_id not in active and self._retry_after.get(session_id, 0.0) <= now:
                    active[session_id] = asyncio.create_task(self._run_guarded(session_id, limit))
            done = [sid for sid, task in active.items() if task.done()]
            for sid in done:
                active.pop(sid)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), poll_s)
            self._wakeup.clear()

    async def _run_guarded(self, session_id: str, limit: asyncio.Semaphore) -> None:
        """Run one session; a failure of a dependency (Redis, database, model) leaves the session as it
        is (nothing half-committed) and retries it after a back-off."""
        async with limit:
            try:
                await self.run_session(session_id)
            except LeaseLost:
                pass
            except Exception:
                log.exception("session %s: step failed; will retry", session_id)
                self._retry_after[session_id] = time.monotonic() + self.settings.retry_backoff_s

    # ---- one step ---------------------------------------------------------------------------------
    async def _step(self, run: _Run) -> None:
        run.step_started_ms, run.streamed = now_ms(), []
        run.state = await self.store.state(run.state.session_id)  # picks up a cancellation
        if run.state.status in TERMINAL:
            return
        state = run.state
        index = state.step_count
        cancelled = await self.store.cancel_requested(state.session_id)
        if cancelled is not None:
            await self._fail(run, cancelled, status="cancelled")
            return
        limit_error = self._limit_exceeded(run)
        if limit_error:
            await self._fail(run, limit_error)
            return
        sid = state.session_id
        await self.store.emit(sid, "step_started", {"index": index})
        action = await self._recorded_action(sid, index)
        memories: list[dict] = []
        model_output, usage = None, {}
        if action is None:
            async with self._within_wall_time(run):
                memories = await self._retrieve(run)
            fitted = await self._fit_prompt(run, memories)  # built and measured once, then sent as is
            if fitted is None:
                return  # a summary step was committed instead
            if isinstance(fitted, str):
                await self._fail(run, fitted)
                return
            messages, memories = fitted
            if memories:
                await self.store.emit(sid, "memory_hits", {"index": index, "memories": memories})
            outcome = await self._ask_for_action(run, messages)
            if isinstance(outcome, str):
                await self._fail(run, outcome)
                return
            action, model_output, usage = outcome
            await self.store.record_tool_intent(sid, action_key(sid, index), "__action__", action, self.owner,
                                                run.token)
        if action["type"] == "final":
            await self._finish(run, action, model_output, memories, usage)
            return
        observations = [await self._call_tool(run, index, i, call) for i, call in enumerate(action["calls"])]
        step = run.step("action", model_output=model_output, action=action, observations=observations,
                        retrieved_memories=memories, usage=usage)
        await self._commit(run, step, {"status": "running"})

    def _limit_exceeded(self, run: _Run) -> str | None:
        limits = run.agent.limits
        if run.state.step_count >= limits.max_steps:
            return f"step limit reached ({limits.max_steps} steps)"
        used = run.tokens_used
        if used > limits.max_total_tokens:
            return f"token limit reached ({used} > {limits.max_total_tokens})"
        if self._remaining_s(run) <= 0:
            age_s = (now_ms() - run.state.created_ms) / 1000
            return f"wall-time limit reached ({age_s:.1f}s > {limits.max_wall_time_s:g}s)"
        return None

    def _remaining_s(self, run: _Run) -> float:
        """Seconds left of the session's wall-time limit (counted from its creation)."""
        return run.agent.limits.max_wall_time_s - (now_ms() - run.state.created_ms) / 1000

    @contextlib.asynccontextmanager
    async def _within_wall_time(self, run: _Run):
        """Cancel the body when the session's wall time runs out (raises _OutOfTime). Only for work that
        commits nothing (model calls, retrieval): a commit is never cut in half."""
        deadline = asyncio.timeout(max(0.0, self._remaining_s(run)))
        try:
            async with deadline:
                yield
        except TimeoutError:
            if deadline.expired():
                raise _OutOfTime from None
            raise

    async def _recorded_action(self, session_id: str, index: int) -> dict | None:
        """The action a previous (crashed) run of this step already chose, if any."""
        record = await self.store.tool_record(session_id, action_key(session_id, index))
        return None if record is None else record["intent"]["arguments"]

    async def _retrieve(self, run: _Run) -> list[dict]:
        settings = run.agent.memory
        if self.memory is None or not settings.retrieve:
            return []
        query = run.state.task
        if run.steps and run.steps[-1].observations:
            query = f"{query}\n{run.steps[-1].observations[-1]}"
        hits = await self.memory.search(run.state.tenant, run.state.agent, query[:4000], k=settings.k,
                                        kinds=settings.kinds, min_score=settings.min_score)  # [] before any memory
        return [{"id": h.memory.id, "kind": h.memory.kind, "text": h.memory.text, "score": round(h.score, 4)}
                for h in hits]

    def _messages(self, run: _Run, memories: list[dict]) -> tuple[list[dict], int]:
        """This step's prompt (exactly build_messages over the whole history) and its token count (an upper
        bound), from the steps rendered and counted once each."""
        return run.prompt.messages(run.agent, run.state, run.steps, memories, self.tools.schemas(run.agent.tools))

    async def _ask_for_action(self, run: _Run, messages: list[dict]):
        """-> (action, raw text, usage), or an error string after the bounded repair attempts."""
        agent, sid = run.agent, run.state.session_id
        max_calls = agent.limits.max_tool_calls_per_step
        schema = action_schema(self.tools.schemas(agent.tools), max_calls,
                               max_string_chars=self.settings.max_string_chars, max_items=self.settings.max_items)
        problem = ""
        for _attempt in range(agent.limits.max_parse_repairs + 1):

            async def on_delta(text: str) -> None:
                run.streamed.append(await self.store.emit(sid, "model_tokens",
                                                          {"index": run.state.step_count, "text": text}))

            async with self._within_wall_time(run):
                reply = await self.model.complete(messages, json_schema=schema,
                                                  max_tokens=agent.limits.max_tokens_per_step, on_delta=on_delta)
            try:
                return parse_action(reply.text, agent.tools, max_calls=max_calls), reply.text, reply.usage
            except ActionParseError as exc:
                error = str(exc)
                if reply.finish_reason == "length":  # cut off, not malformed: say so, and ask for less
                    error = (f"it reached this step's limit of {agent.limits.max_tokens_per_step} tokens before "
                             f"its JSON ended ({exc}); reply more briefly")
                problem = f"{error} (output: {reply.text[:200]!r})"
                messages = [*messages, repair_prompt(reply.text, error)]
        return f"model output could not be parsed after {agent.limits.max_parse_repairs} repairs: {problem}"

    async def _call_tool(self, run: _Run, index: int, call_index: int, call: dict) -> dict:
        sid, state = run.state.session_id, run.state
        key = call_key(sid, index, call_index)
        name, arguments = call["name"], call.get("arguments", {})
        observation = {"call_index": call_index, "tool": name, "arguments": arguments, "idempotency_key": key}
        record = await self.store.tool_record(sid, key)
        limit = run.agent.limits.max_tool_result_chars
        if record is not None and record.get("result") is not None:
            return {**observation, **record["result"]}  # done before a crash: never re-run
        if record is None:
            await self.store.record_tool_intent(sid, key, name, arguments, self.owner, run.token)
        await self.store.emit(sid, "tool_call", call_event(index, call_index))
        ctx = ToolContext(tenant=state.tenant, agent=state.agent, session_id=sid, step_index=index,
                          call_index=call_index, idempotency_key=key, memory=self.memory)
        outcome = await self._run_tool(run, name, arguments, ctx)
        await self.store.record_tool_result(sid, key, outcome, self.owner, run.token)  # in full, once
        await self.store.emit(sid, "tool_result", outcome_event(index, call_index, limit))
        return {**observation, **outcome}

    async def _run_tool(self, run: _Run, name: str, arguments: dict, ctx: ToolContext) -> dict:
        """{"result": ...} or {"error": ...}: a failing, timed-out or cut-off call becomes an observation the
        model can react to. The call may run for its tool's timeout, and never past the session's wall time
        (the step is then committed with the error and the next step fails the session)."""
        default_s = run.agent.limits.tool_timeout_s
        limit_s = self.tools.timeout_s(name, default_s) if name in self.tools else default_s
        remaining_s = self._remaining_s(run)
        deadline = asyncio.timeout(max(0.0, min(limit_s, remaining_s)))
        try:
            async with deadline:
                return {"result": await self.tools.call(name, arguments, ctx)}
        except TimeoutError as exc:
            if not deadline.expired():
                return {"error": f"{type(exc).__name__}: {exc}"}
            if remaining_s < limit_s:
                return {"error": f"ToolTimeout: tool {name!r} was cut off: the session's wall-time limit "
                                 f"({run.agent.limits.max_wall_time_s:g} s) was reached while it ran"}
            return {"error": f"ToolTimeout: tool {name!r} timed out after {limit_s:g} s"}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def _fit_prompt(self, run: _Run, memories: list[dict]) -> tuple[list[dict], list[dict]] | str | None:
        """This step's (messages, memories) within the context budget; None when the oldest unsummarized
        turns were folded into a summary step instead (the caller's step is then over; the next one builds
        its prompt again); the reason, when nothing is left to fold and even without the retrieved
        memories the prompt does not fit (the session cannot go on). With nothing left to fold, retrieved
        memories are left out, the least relevant first, until it fits."""
        budget = self._budget(run.agent)
        messages, tokens = self._messages(run, memories)
        if tokens > budget:  # the cached count is an upper bound: decide on the exact one
            tokens = self.model.count_tokens(messages)
        if tokens <= budget:
            return messages, memories
        if await self._summarize(run):
            return None
        for keep in range(len(memories) - 1, -1, -1):  # the least relevant retrieved memories go first
            messages, _ = self._messages(run, memories[:keep])
            tokens = self.model.count_tokens(messages)
            if tokens <= budget:
                return messages, memories[:keep]
        return (f"the prompt cannot fit the model's context: {tokens} tokens, more than the {budget} that a "
                f"{self.model.context_window}-token context window leaves ({self._reserve(run.agent)}), with "
                f"the history already folded into a summary")

    async def _summarize(self, run: _Run) -> bool:
        """Fold the oldest half of the unsummarized turns into the summary; False when fewer than two are left."""
        state = run.state
        pending = [s for s in run.steps if s.index >= state.summarized_through and s.kind == "action"]
        if len(pending) < 2:
            return False
        fold = pending[: max(1, len(pending) // 2)]
        through = fold[-1].index + 1
        limit = run.agent.limits.max_tool_result_chars
        transcript = "\n".join(f"step {s.index}: action {s.action} -> "
                               f"{[bounded(outcome_of(o), limit, o['idempotency_key']) for o in s.observations]}"
                               for s in fold)
        request = [{"role": "system", "content": "Summarize these agent steps in a few sentences. Keep every "
                    "fact, number and decision needed to continue the task."},
                   {"role": "user", "content": f"Earlier summary: {state.summary or '(none)'}\n{transcript}"}]
        async with self._within_wall_time(run):
            reply = await self.model.complete(request, json_schema=SUMMARY_SCHEMA,
                                              max_tokens=self.settings.summary_max_tokens)
        try:
            new = json.loads(reply.text)["summary"]
        except (ValueError, KeyError, TypeError):  # cut off at summary_max_tokens, or not JSON: keep the steps
            summary = self._unsummarized(run, fold, transcript)
        else:
            summary = f"{state.summary}\n{new}" if state.summary else new
        if self.memory is not None:
            await self.memory.write(state.tenant, state.agent, summary[:7000], kind="episode",
                                    idempotency_key=f"{state.session_id}:summary:{state.step_count}",
                                    source_session=state.session_id, source_step=state.step_count,
                                    metadata={"type": "context_summary", "through_step": through})
        step = run.step("summary", model_output=reply.text, usage=reply.usage)
        await self._commit(run, step, {"summary": summary, "summarized_through": through})
        return True

    def _unsummarized(self, run: _Run, fold: list[Step], transcript: str) -> str:
        """The whole summary when the model's summary of `fold` is unusable: the earlier summary, then the folded
        steps as they were, cut to UNSUMMARIZED_CHARS at most and so that all of it stays within an eighth of a
        step's prompt budget (the steps cut further first, then the oldest lines of the earlier summary go)."""
        lines = run.state.summary.split("\n") if run.state.summary else []
        head = f"steps {fold[0].index}-{fold[-1].index} (not summarized): "
        budget = self._budget(run.agent) // 8

        def fits(parts: list[str]) -> bool:
            return self.model.count_tokens([{"role": "user", "content": "\n".join(parts)}]) <= budget

        limit = UNSUMMARIZED_CHARS
        while limit > 50 and not fits([*lines, head + cut_text(transcript, limit)]):
            limit //= 2
        new = head + cut_text(transcript, limit if limit > 50 else 0)
        while lines and not fits([*lines, new]):
            lines.pop(0)
        return "\n".join([*lines, new])

    async def _finish(self, run: _Run, action: dict, model_output, memories, usage) -> None:
        state = run.state
        if self.memory is not None and run.agent.memory.write_summary:
            answer = str(action.get("answer", ""))
            text = session_summary(state.task, state.step_count + 1, answer)
            await self.memory.write(state.tenant, state.agent, text[:7000], kind="episode",
                                    idempotency_key=f"{state.session_id}:final", source_session=state.session_id,
                                    source_step=state.step_count, metadata={"type": "session_summary"})
        step = run.step("final", model_output=model_output, action=action, retrieved_memories=memories, usage=usage)
        await self._commit(run, step, {"status": "completed", "final_answer": str(action.get("answer", ""))})

    async def _fail(self, run: _Run, reason: str, *, status: str = "failed") -> None:
        await self._commit(run, run.step("error"), {"status": status, "error": reason})

    async def _commit(self, run: _Run, step: Step, patch: dict) -> None:
        await self.store.append_step(run.state.session_id, step, self.owner, run.token, state_patch=patch,
                                     transient_events=run.streamed)
        if patch.get("status") in TERMINAL:
            self.finished[patch["status"]] += 1
        run.steps.append(step)
        run.tokens_used += _tokens_of(step)
        run.state = await self.store.state(run.state.session_id)  # the commit also emitted its events


def _tokens_of(step: Step) -> int:
    return step.usage.get("prompt_tokens", 0) + step.usage.get("completion_tokens", 0)
