"""How the CLI shows tasks and their events: one line per step, tool call, result and answer, printed
as they happen (model tokens as a live character count on a terminal)."""

from __future__ import annotations

import json
import sys

from runtime.resources import Session, Task, TaskEvent, TaskTranscript


def _short(value, limit: int = 100) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EventPrinter:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.live = self.out.isatty()
        self._chars = 0

    def _line(self, text: str) -> None:
        if self._chars and self.live:
            self.out.write("\r\033[K")
        self._chars = 0
        print(text, file=self.out, flush=True)

    def show(self, event: TaskEvent) -> None:
        data = event.data
        if event.type == "model_tokens":
            self._chars += len(data.get("text", ""))
            if self.live:
                self.out.write(f"\r  step {data.get('index')}: model writing ({self._chars} chars)")
                self.out.flush()
        elif event.type == "memory_hits":
            texts = "; ".join(_short(m.get("text", ""), 40) for m in data.get("memories", [])[:3])
            count = len(data.get("memories", []))
            self._line(f"  step {data.get('index')}: recalled {count} memor{'y' if count == 1 else 'ies'}: {texts}")
        elif event.type == "tool_call":
            self._line(f"  step {data.get('index')}: {data.get('tool')}({_short(data.get('arguments'), 80)})")
        elif event.type == "tool_result":
            outcome = data.get("result", data.get("error"))
            label = "->" if "result" in data else "-> error:"
            self._line(f"  step {data.get('index')}:   {label} {_short(outcome)}")
        elif event.type == "final":
            self._line(f"  final answer: {data.get('answer')}")
        elif event.type == "error":
            self._line(f"  ended {data.get('status')}: {data.get('error')}")


def task_line(task: Task) -> str:
    outcome = task.final_answer if task.status == "completed" else task.error
    tail = f": {_short(outcome, 60)}" if outcome else ""
    return f"{task.id}  {task.status:<9}  {task.agent:<12}  {_short(task.input, 50)}{tail}"


def print_transcript(task: TaskTranscript, out=None) -> None:
    out = out or sys.stdout
    print(f"task {task.id} (session {task.session_id}, agent {task.agent}): {task.status}", file=out)
    print(f"  input: {_short(task.input, 200)}", file=out)
    for step in task.steps:
        if step.kind == "action":
            for obs in step.observations:
                outcome = obs.get("result", obs.get("error"))
                print(f"  step {step.index}: {obs['tool']}({_short(obs['arguments'], 80)}) -> {_short(outcome)}",
                      file=out)
        elif step.kind == "summary":
            print(f"  step {step.index}: summarized earlier turns", file=out)
        elif step.kind == "final":
            print(f"  step {step.index}: final answer: {task.final_answer}", file=out)
        else:
            print(f"  step {step.index}: {task.status}: {task.error}", file=out)


def print_session(session: Session, out=None) -> None:
    out = out or sys.stdout
    print(f"session {session.id} (agent {session.agent}): {len(session.tasks)} task(s)", file=out)
    for task in session.tasks:
        print_transcript(task, out)
