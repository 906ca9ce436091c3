"""Held-out agent tasks run through the whole embedded runtime, scored: how well does a model do the job?

`evaluate_agent` builds tasks from the held-out split of the training traces (names and facts no
training trace has), runs each as a real session of the built-in `assistant` agent in `LocalRuntime`
(orchestrator, model worker with structured decoding, memory service with the MiniLM embedder, Redis),
and checks the final answers:

- arithmetic: the calculator's result is in the answer; with "Remember the result." a memory holding
  the sentence is written too;
- remember: a memory with the fact is written and the answer confirms it;
- recall (and recall of a computed result): the fact was stored by an earlier *session* of the agent,
  among distractor memories (the same person's other facts, other people's same attribute); the runtime
  is closed and reopened between the storing and the asking session, and half of the storing sessions
  are interrupted after their first step and resumed from Redis by the reopened runtime;
- refusal: asked for a fact never stored, the answer says there is no such memory.

Every tenant is fresh, so memories never leak between tasks; arithmetic tasks start with an empty memory
unless `--arithmetic-with-memories` gives them earlier memories (other results, facts, session summaries),
or `--arithmetic-after-quickstart` has the tenant's agent first run a session that computes and saves a
result of the same form ("What is 17 times 23? Remember the result." before "What is 12 times 11?"), as
after `make demo`.
It deliberately does not judge wording, only the facts an answer must hold.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model_worker.training import traces
from runtime.local import LocalRuntime
from runtime.settings import Settings

RECALL_KINDS = ("recall", "recall_result")
MIX = {"arithmetic": 20, "arithmetic_remember": 15, "remember": 15, "recall": 25, "recall_result": 10,
       "refusal": 15}
NO_MEMORY = "no memory"


@dataclass
class AgentTask:
    kind: str
    tenant: str
    task: str
    expect: str  # a string the final answer must contain
    setup: list[str] = field(default_factory=list)  # distractor memories written before the run
    store_task: str | None = None  # the earlier session storing the fact (recall; arithmetic after the quickstart)
    memory_expect: str | None = None  # a memory of the tenant must contain this after the run
    key: str | None = None  # question kinds: what the question names ("Alice's home city", "17 times 23")


@dataclass
class TaskOutcome:
    task: AgentTask
    status: str
    answer: str
    steps: int
    valid_actions: bool
    correct: bool
    note: str = ""
    transcript: list[dict] = field(default_factory=list)  # per step: memories shown, action, tool results


def _transcript(steps) -> list[dict]:
    """What each step saw and did: the retrieved memories' texts, the action, each tool call's result."""
    return [{"kind": step.kind, "memories": [m.get("text", "") for m in step.retrieved_memories],
             "action": step.action, "results": [o.get("result") for o in step.observations]} for step in steps]


def transcript_line(o: TaskOutcome) -> str:
    """One task of `--transcripts`: a JSON line with the task, the answer, the verdict and the steps."""
    return json.dumps({"kind": o.task.kind, "task": o.task.task, "expect": o.task.expect, "answer": o.answer,
                       "correct": o.correct, "note": o.note, "steps": o.transcript}, ensure_ascii=False) + "\n"


@dataclass
class EvalReport:
    outcomes: list[TaskOutcome]

    @property
    def success_rate(self) -> float:
        return sum(o.correct for o in self.outcomes) / max(1, len(self.outcomes))

    @property
    def all_actions_valid(self) -> bool:
        return all(o.valid_actions for o in self.outcomes)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        total, right = Counter(), Counter()
        for o in self.outcomes:
            total[o.task.kind] += 1
            right[o.task.kind] += o.correct
        return {kind: (right[kind], total[kind]) for kind in total}


def held_out_tasks(count: int = 100, seed: int = 0, *, arithmetic_memories: bool = False,
                    after_quickstart: bool = False, remember_after_quickstart: bool = False) -> list[AgentTask]:
    """`count` tasks in the proportions of MIX, from the held-out split. arithmetic_memories: arithmetic tasks
    start with earlier memories too (other results, facts, session summaries; at least one) instead of an
    empty memory. after_quickstart: an earlier session of the arithmetic task's agent computed and saved a
    result of the same form, as `make demo` does (its memories are what the runtime writes).
    remember_after_quickstart: the same for the tasks that ask to remember a fact, with a computation of
    the quickstart's form ("What is 17 times 23? Remember the result."). Either way the other tasks stay the
    same."""
    gen = traces.TraceGenerator(seed=10_000 + seed, held_out=True)
    earlier = traces.TraceGenerator(seed=20_000 + seed, held_out=True)  # its own draws: the rest is unchanged
    rng = random.Random(seed)
    quickstart_rng = random.Random(30_000 + seed)  # its own draws too
    # interleaved by each kind's share, so that any prefix (fewer than 100 tasks) keeps the proportions
    per_hundred = sorted(((j + 0.5) / n, kind) for kind, n in MIX.items() for j in range(n))
    kinds = [kind for _, kind in per_hundred]
    kinds = (kinds * (count // len(kinds) + 1))[:count]
    tasks = []
    for i, kind in enumerate(kinds):
        tenant = f"eval-{seed}-{i}"
        if kind in ("arithmetic", "arithmetic_remember"):
            key, expression, result = gen.arithmetic()
            task = rng.choice(traces.COMPUTE_PHRASES).format(k=key)
            remember = kind == "arithmetic_remember"
            if remember:
                task += rng.choice(traces.REMEMBER_SUFFIXES)
            setup = []
            while arithmetic_memories and not setup:
                setup = [m.text for m in earlier.prior_store(None)]
            earlier_task = f"What is {earlier.same_form(key, expression)[0]}? Remember the result." \
                if after_quickstart else None
            tasks.append(AgentTask(kind, tenant, task, result, setup=setup, store_task=earlier_task,
                                   memory_expect=f"{key} is {result}." if remember else None))
            continue
        fact = gen.arithmetic_fact() if kind == "recall_result" else gen.person_fact()
        setup = [m.text for m in gen.prior_store(fact)] if kind != "remember" else []
        if kind == "remember":
            subject, attribute = fact.key.split("'s ", 1)
            task = rng.choice(traces.REMEMBER_PHRASES).format(s=subject, a=attribute, v=fact.value)
            quickstart = f"What is {quickstart_rng.randint(11, 99)} times {quickstart_rng.randint(11, 99)}? " \
                         "Remember the result." if remember_after_quickstart else None
            tasks.append(AgentTask(kind, tenant, task, fact.value, store_task=quickstart,
                                   memory_expect=fact.sentence))
        elif kind == "refusal":
            tasks.append(AgentTask(kind, tenant, rng.choice(traces.RECALL_PHRASES).format(k=fact.key), NO_MEMORY,
                                   setup=setup, key=fact.key))
        elif kind == "recall":
            subject, attribute = fact.key.split("'s ", 1)
            store = rng.choice(traces.REMEMBER_PHRASES).format(s=subject, a=attribute, v=fact.value)
            tasks.append(AgentTask(kind, tenant, rng.choice(traces.RECALL_PHRASES).format(k=fact.key), fact.value,
                                   setup=setup, store_task=store, key=fact.key))
        else:
            store = rng.choice(traces.COMPUTE_PHRASES).format(k=fact.key) + rng.choice(traces.REMEMBER_SUFFIXES)
            tasks.append(AgentTask(kind, tenant, rng.choice(traces.RESULT_RECALL_PHRASES).format(k=fact.key),
                                   fact.value, setup=setup, store_task=store, key=fact.key))
    return tasks


class _RecordingModel:
    """A ModelClient passing every call through and keeping, for calls of the asked tasks, the prompt (the
    messages as the orchestrator built them) and the reply, with the task's kind, key and expected answer."""

    def __init__(self, model, tasks: list[AgentTask], sink: list[dict]):
        self.model, self.sink = model, sink
        self.tasks = {task.task: task for task in tasks}
        self.context_window = model.context_window

    def count_tokens(self, messages: list[dict]) -> int:
        return self.model.count_tokens(messages)

    async def complete(self, messages: list[dict], **options):
        reply = await self.model.complete(messages, **options)
        task = self.tasks.get(next((m["content"] for m in messages if m["role"] == "user"), ""))
        if task is not None:
            self.sink.append({"kind": task.kind, "task": task.task, "key": task.key, "expect": task.expect,
                              "messages": messages, "reply": reply.text})
        return reply


async def _run(rt: LocalRuntime, tenant: str, task: str, *, interrupt_after_first_step: bool = False):
    """Run one task to its end; or, interrupted, drive it one step and abandon it (as a crash would)."""
    submitted, _ = await rt.service.tasks.submit(tenant, "assistant", task)
    if not interrupt_after_first_step:
        await rt.orchestrator.run_session(submitted.id)
        return submitted.id
    runner = asyncio.ensure_future(rt.orchestrator.run_session(submitted.id))
    while not runner.done() and (await rt.store.state(submitted.id)).step_count < 1:
        await asyncio.sleep(0.01)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    return submitted.id


def _actions_valid(state, steps) -> bool:
    """Every action the model gave parsed under the schema (a session may still fail on a limit)."""
    return all(step.action is not None for step in steps if step.kind in ("action", "final")) and \
        "could not be parsed" not in (state.error or "")


async def _score(rt: LocalRuntime, task: AgentTask, session_id: str) -> TaskOutcome:
    state, steps = await rt.store.load(session_id)
    answer = state.final_answer or ""
    valid = _actions_valid(state, steps)
    correct = valid and state.status == "completed" and task.expect.lower() in answer.lower()
    note = state.error or ""
    if correct and task.memory_expect is not None:
        memories = (await rt.memory.list(task.tenant, "assistant", limit=50)).items
        correct = any(task.memory_expect in m.text for m in memories)
        note = note or ("" if correct else f"no memory holds {task.memory_expect!r}")
    return TaskOutcome(task, state.status, answer, len(steps), valid, correct, note, _transcript(steps))


async def evaluate_agent(model_path: Path | None, tasks: list[AgentTask], *, data_dir: Path | None = None,
                         progress: Callable[[TaskOutcome], None] | None = None,
                         redis_url: str | None = None, prompts: list[dict] | None = None) -> EvalReport:
    """Run `tasks` through LocalRuntime on `model_path` (None: the shipped demo model) and score them;
    `prompts` (when given) receives every model call of the asked tasks (_RecordingModel)."""
    with tempfile.TemporaryDirectory(prefix="engram-eval-") as tmp:
        settings = Settings(data_dir=data_dir or Path(tmp), model_path=model_path, redis_url=redis_url,
                            key_prefix=f"engram-eval-{random.getrandbits(32):08x}", lease_ms=1500, heartbeat_s=0.5)
        stored: dict[int, str] = {}
        async with LocalRuntime(settings) as rt:  # first life: distractors and the storing sessions
            for i, task in enumerate(tasks):
                for text in task.setup:
                    await rt.memory.write(task.tenant, "assistant", text, kind="fact")
                if task.store_task is not None:
                    stored[i] = await _run(rt, task.tenant, task.store_task, interrupt_after_first_step=i % 2 == 0)
        outcomes = []
        async with LocalRuntime(settings) as rt:  # second life: resume the interrupted ones, then ask
            await asyncio.sleep(settings.lease_ms / 1000)  # the abandoned leases run out
            if prompts is not None:
                rt.orchestrator.model = _RecordingModel(rt.orchestrator.model, tasks, prompts)
            for i, task in enumerate(tasks):
                if i in stored:
                    state = await rt.store.state(stored[i])
                    if not state.finished:  # interrupted in the first life: resumed from Redis now
                        await rt.orchestrator.run_session(stored[i])
                        state = await rt.store.state(stored[i])
                    if state.status != "completed":
                        _, steps = await rt.store.load(stored[i])
                        outcomes.append(TaskOutcome(task, state.status, "", len(steps),
                                                    _actions_valid(state, steps), False,
                                                    f"storing session {state.status}: {state.error}",
                                                    _transcript(steps)))
                        continue
                outcome = await _score(rt, task, await _run(rt, task.tenant, task.task))
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
        return EvalReport(outcomes)


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.evaluation [--model PATH] [--tasks N] [--seed S] [--transcripts FILE]`: score a
    checkpoint (default: the demo model); the transcripts show why a task failed."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m runtime.evaluation", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arithmetic-with-memories", action="store_true",
                        help="arithmetic tasks start with earlier memories (other results, facts, session "
                             "summaries) instead of an empty memory; the other tasks are unchanged")
    parser.add_argument("--arithmetic-after-quickstart", action="store_true",
                        help="each arithmetic task's agent first ran an earlier session that computed and saved "
                             "a result of the same form ('What is 17 times 23? Remember the result.'), as after "
                             "`make demo`; the other tasks are unchanged")
    parser.add_argument("--remember-after-quickstart", action="store_true",
                        help="each task asking to remember a fact comes after an earlier session of its agent "
                             "that computed and saved a product ('What is 17 times 23? Remember the result.'), "
                             "as after `make demo`; the other tasks are unchanged")
    parser.add_argument("--transcripts", type=Path, default=None, metavar="FILE",
                        help="write every task's session (memories shown, actions, tool results) as JSON lines")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="write every model call of the asked tasks (the prompt's messages, the reply, the "
                             "task's kind, key and expected answer) as JSON lines")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be positive")
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"error: no checkpoint at {args.model} (config.json missing)", file=sys.stderr)
        return 2

    def show(outcome: TaskOutcome) -> None:
        mark = "ok  " if outcome.correct else "FAIL"
        print(f"{mark} {outcome.task.kind:<20} {outcome.task.task[:60]!r} -> {outcome.answer[:70]!r} "
              f"{outcome.note[:60]}".rstrip(), flush=True)

    for option, path in (("--transcripts", args.transcripts), ("--prompts", args.prompts)):
        if path is not None and not path.parent.is_dir():
            print(f"error: no directory {path.parent} for {option}", file=sys.stderr)
            return 2
        if path is not None and path.is_dir():  # found now, not after the whole run when the file is written
            print(f"error: {option} {path} is a directory; give a file name", file=sys.stderr)
            return 2
    prompts: list[dict] | None = [] if args.prompts is not None else None
    tasks = held_out_tasks(args.tasks, args.seed, arithmetic_memories=args.arithmetic_with_memories,
                           after_quickstart=args.arithmetic_after_quickstart,
                           remember_after_quickstart=args.remember_after_quickstart)
    report = asyncio.run(evaluate_agent(args.model, tasks, progress=show, prompts=prompts))
    if args.transcripts is not None:
        with args.transcripts.open("w") as out:
            out.writelines(transcript_line(o) for o in report.outcomes)
    if args.prompts is not None:
        with args.prompts.open("w") as out:
            out.writelines(json.dumps(call, ensure_ascii=False) + "\n" for call in prompts)
    figures = ", ".join(f"{kind} {right}/{total}" for kind, (right, total) in sorted(report.by_kind().items()))
    print(f"{report.success_rate:.0%} of {len(report.outcomes)} held-out tasks correct ({figures}); every action "
          f"valid: {'yes' if report.all_actions_valid else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
