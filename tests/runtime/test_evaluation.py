"""The held-out agent evaluation (`runtime.evaluation`): its task mix, its expectations against the real
calculator and the training split, and a run through the whole embedded runtime that scores every task."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
from collections import Counter

from model_worker.training import pools
from runtime.evaluation import MIX, RECALL_KINDS, evaluate_agent, held_out_tasks
from runtime.tools.calculator import calculate
from tests.model_worker.engine.engine_fixtures import tiny_checkpoint
from tests.random_model import RANDOM_MODEL_ENV


def test_any_number_of_tasks_keeps_the_mix():
    assert Counter(t.kind for t in held_out_tasks(100)) == Counter(MIX)
    for count in (10, 20, 40):
        got = Counter(t.kind for t in held_out_tasks(count))
        for kind, share in MIX.items():
            assert abs(got[kind] - share * count / 100) <= 1, (count, got)


def test_arithmetic_memories_add_earlier_memories_to_arithmetic_tasks_only():
    plain, seeded = held_out_tasks(100, seed=1), held_out_tasks(100, seed=1, arithmetic_memories=True)
    for before, after in zip(plain, seeded):
        if before.kind.startswith("arithmetic"):
            assert before.setup == [] and after.setup, after  # at least one earlier memory
            assert (after.kind, after.task, after.expect, after.memory_expect) == \
                (before.kind, before.task, before.expect, before.memory_expect)
        else:
            assert after == before
    texts = [text for task in seeded if task.kind.startswith("arithmetic") for text in task.setup]
    assert any(re.search(r"\d+ (times|plus|minus|divided by|multiplied by) \d+ is ", t) for t in texts)  # results
    assert any(t.startswith("Task: ") for t in texts)  # session summaries


def test_after_the_quickstart_an_earlier_session_saved_a_result_of_the_same_form():
    plain, after = held_out_tasks(100, seed=1), held_out_tasks(100, seed=1, after_quickstart=True)
    asked = 0
    for before, task in zip(plain, after):
        if not before.kind.startswith("arithmetic"):
            assert task == before
            continue
        asked += 1
        assert (task.kind, task.task, task.expect, task.memory_expect, task.setup) == \
            (before.kind, before.task, before.expect, before.memory_expect, before.setup)
        earlier = re.fullmatch(r"What is (.+)\? Remember the result\.", task.store_task)
        assert earlier, task.store_task
        words = re.sub(r"\d+", "N", earlier.group(1))
        assert words in re.sub(r"\d+", "N", task.task) and earlier.group(1) not in task.task  # other numbers
    assert asked == 35


def test_remembering_after_the_quickstart_follows_a_session_that_saved_a_product():
    plain, after = held_out_tasks(100, seed=1), held_out_tasks(100, seed=1, remember_after_quickstart=True)
    earlier = []
    for before, task in zip(plain, after):
        if before.kind != "remember":
            assert task == before
            continue
        assert task.store_task is not None and before.store_task is None
        assert task == dataclasses.replace(before, store_task=task.store_task)
        earlier.append(re.fullmatch(r"What is (\d\d) times (\d\d)\? Remember the result\.", task.store_task))
    assert len(earlier) == 15 and all(earlier) and len({m.group(0) for m in earlier}) > 10  # various products


def test_expectations_come_from_the_calculator_and_the_held_out_split():
    tasks = held_out_tasks(100)
    held_out_people = {pools.subject_sampler(True)(random.Random(i)) for i in range(2000)}  # all ~90 of them
    for task in tasks:
        if task.kind.startswith("arithmetic"):
            expression = task.memory_expect.rsplit(" is ", 1)[0] if task.memory_expect else None
            assert task.expect == json.dumps(calculate(_expression_of(task.task, expression))["result"])
        elif task.kind in ("remember", "recall"):
            text = task.memory_expect or task.store_task
            assert any(re.search(rf"\b{re.escape(p)}\b", text) for p in held_out_people), task  # a held-out name
        if task.kind in RECALL_KINDS:
            assert task.store_task and task.expect in task.store_task or task.kind == "recall_result"


def _expression_of(task: str, key: str | None) -> str:
    """The arithmetic a task asks for, in calculator syntax (its words replaced by operators)."""
    text = key or task
    for word, op in (("multiplied by", "*"), ("divided by", "/"), ("times", "*"), ("plus", "+"), ("minus", "-")):
        text = text.replace(word, op)
    prefixes = ("What is ", "Compute ", "Calculate ", "How much is ", "Use the calculator: ", "What do you get for ")
    for prefix in prefixes:
        text = text.removeprefix(prefix)
    return text.split("?")[0].split(". ")[0].rstrip(".").strip()


def test_a_run_through_the_whole_runtime_scores_every_task(tmp_path, redis_url, monkeypatch):
    model = tiny_checkpoint(tmp_path / "model", seed=2)  # random weights: valid actions, wrong answers
    for name, value in RANDOM_MODEL_ENV.items():  # its strings end only at a bound (tests/random_model.py)
        monkeypatch.setenv(name, value)
    tasks = held_out_tasks(6)
    prompts: list[dict] = []
    report = asyncio.run(evaluate_agent(model, tasks, data_dir=tmp_path / "data", redis_url=redis_url,
                                        prompts=prompts))
    assert [o.task for o in report.outcomes] == tasks
    assert report.all_actions_valid  # structured decoding: every action parses, whatever the weights
    assert all(o.status in ("completed", "failed") for o in report.outcomes)
    assert report.success_rate < 0.5  # a random model does not do these tasks
    for outcome in report.outcomes:  # each task's transcript is its session's steps, as the store holds them
        assert len(outcome.transcript) == outcome.steps and outcome.transcript
        last = outcome.transcript[-1]
        if outcome.status == "completed":
            assert last["kind"] == "final" and last["action"]["answer"] == outcome.answer
        for step in outcome.transcript:
            if step["kind"] == "action":
                assert len(step["results"]) == len(step["action"]["calls"])
    # --prompts: every model call of an asked task, in order, with the prompt the orchestrator built for it
    for outcome in report.outcomes:
        calls = [c for c in prompts if c["task"] == outcome.task.task]
        if outcome.note.startswith("storing session"):  # the question was never asked
            assert not calls
            continue
        assert calls and all(c["kind"] == outcome.task.kind and c["expect"] == outcome.task.expect for c in calls)
        actions = [step["action"] for step in outcome.transcript if step["action"] is not None]
        assert [json.loads(c["reply"]) for c in calls[:len(actions)]] == actions
        for i, call in enumerate(calls[:len(actions)]):
            assert [m["content"] for m in call["messages"] if m["role"] == "user"][0] == outcome.task.task
            assert sum(m["role"] == "assistant" for m in call["messages"]) == i  # the steps before it
        if outcome.task.kind in RECALL_KINDS or outcome.task.kind == "refusal":
            assert outcome.task.key and outcome.task.key in outcome.task.task


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    """A bad --transcripts or --prompts path is refused in one line before any task runs, not after."""
    from runtime.evaluation import main

    for argv in (["--prompts", str(tmp_path)], ["--transcripts", str(tmp_path / "missing" / "t.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
