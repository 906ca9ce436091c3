"""One session's prompt, built incrementally: each committed step is rendered (and its tokens counted) once,
so a step's prompt costs the same at step 400 as at step 10.

`build_messages` lays out the system message and the task, then each unfolded step's messages, each
step rendered on its own. `PromptCache.messages` builds the head (system + task: memories and summary
change between steps) through `build_messages` with no steps, and appends the cached messages of the
steps the summary does not cover: the result is exactly `build_messages` of the whole history (a test
pins this). Its token count is the head's plus the sum of the steps' counts, each counted alone: an upper
bound of the prompt's count (equal for a counter that adds up per message), so a budget check on it never
lets a prompt through that does not fit.

Deliberately not here: what a prompt contains (`prompts`), when to summarize (the orchestrator).
"""

from __future__ import annotations

from collections.abc import Callable

from runtime.agents import AgentDefinition
from runtime.prompts import build_messages
from runtime.sessions import SessionState, Step

NOT_REPLAYED = ("summary", "error")  # step kinds build_messages leaves out


class PromptCache:
    """The rendered messages and token count of one session's unfolded steps, extended step by step and
    rebuilt only when the summary moves (which folds steps out)."""

    def __init__(self, count_tokens: Callable[[list[dict]], int]):
        self.count_tokens = count_tokens
        self._from = self._upto = 0  # the tail renders steps[_from:_upto]
        self._tail: list[dict] = []
        self._tail_tokens = 0

    def _tail_for(self, agent: AgentDefinition, task: str, steps: list[Step], start: int) -> None:
        if start != self._from or self._upto > len(steps):
            self._from, self._upto, self._tail, self._tail_tokens = start, start, [], 0
        for step in steps[max(self._upto, start):]:
            if step.kind not in NOT_REPLAYED:
                rendered = build_messages(agent, task, [step.model_dump()], [], [])[2:]
                self._tail.extend(rendered)
                self._tail_tokens += self.count_tokens(rendered)
        self._upto = len(steps)

    def messages(self, agent: AgentDefinition, state: SessionState, steps: list[Step], memories: list[dict],
                 tool_schemas: list[dict]) -> tuple[list[dict], int]:
        """(messages, token upper bound) for the next step: equal to `build_messages` over all `steps`."""
        messages = build_messages(agent, state.task, [], memories, tool_schemas, state.summary,
                                  state.summarized_through, max_calls=agent.limits.max_tool_calls_per_step,
                                  context=state.context)
        self._tail_for(agent, state.task, steps, state.summarized_through)
        return messages + self._tail, self.count_tokens(messages) + self._tail_tokens
