"""A task that continues a conversation shows the model its earlier turns: each side of a turn cut to
CONTEXT_CHARS_PER_TURN characters, and a cut one marked as cut, so the model does not take a fragment for the
whole (a real model and a real Redis; the model is scripted)."""

from __future__ import annotations

import asyncio

from runtime.local import LocalRuntime
from runtime.settings import Settings
from runtime.tasks import CONTEXT_CHARS_PER_TURN
from tests.runtime.hardening import ScriptModel


def test_an_earlier_turn_longer_than_the_limit_shows_cut_and_marked(tmp_path, redis_url, key_prefix):
    report = "section " * 200  # 1,600 characters
    model = ScriptModel([{"type": "final", "answer": "Short answer."}])

    async def scenario():
        settings = Settings(data_dir=tmp_path, redis_url=redis_url, key_prefix=key_prefix, embedder="hashing")
        async with LocalRuntime(settings, model=model) as rt:
            first, _ = await rt.run_task(f"Read this report: {report}", tenant="t")
            second, _ = await rt.run_task("What did section 3 say?", tenant="t", session_id=first.thread_id)
            return second

    second = asyncio.run(scenario())
    user, assistant = second.context.split("\nAssistant: ")
    assert user == "User: " + f"Read this report: {report}"[:CONTEXT_CHARS_PER_TURN] + " [...]"
    assert assistant == "Short answer."  # short enough: whole, no marker
    system = model.prompts[-1][0]["content"]
    assert f"## Earlier in this conversation\n{second.context}" in system
