"""`ended_within`: the deadline of `tasks.wait` holds even when the awaited stream is slow to unwind."""

from __future__ import annotations

import asyncio

import pytest

from runtime.sdk.waiting import ended_within


async def _slow_to_cancel(log: list[str]) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        await asyncio.sleep(0.5)  # a stream read that takes its time to give up
        log.append("unwound")
        raise


def test_the_deadline_does_not_wait_for_the_cancellation():
    async def scenario() -> tuple[bool, list[str], list[str]]:
        log: list[str] = []
        ended = await ended_within(_slow_to_cancel(log), 0.05)
        at_deadline = list(log)  # asyncio.wait_for would only return here once the coroutine had unwound
        await asyncio.sleep(0.8)
        return ended, at_deadline, log

    ended, at_deadline, later = asyncio.run(scenario())
    assert ended is False
    assert at_deadline == []
    assert later == ["unwound"]  # it was cancelled, in the background


def test_a_coroutine_that_ends_in_time_counts_and_its_error_is_raised():
    async def fine() -> str:
        return "ok"

    async def broken() -> None:
        raise LookupError("no such task")

    assert asyncio.run(ended_within(fine(), 1.0)) is True
    assert asyncio.run(ended_within(fine(), None)) is True
    with pytest.raises(LookupError, match="no such task"):
        asyncio.run(ended_within(broken(), 1.0))
