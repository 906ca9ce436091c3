"""A deadline for `tasks.wait` that holds even when the awaited event stream is slow to unwind.

`asyncio.wait_for` waits for the cancelled awaitable to finish before it raises, so a stream read that
takes long to cancel (a blocked Redis read, an HTTP body in flight) stretches a 0.2 s timeout to however
long that takes; a task may even finish meanwhile and be returned as if in time. Here the deadline
returns at once and the stream is cancelled in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def ended_within(coro: Coroutine[Any, Any, Any], timeout: float | None) -> bool:
    """Run `coro` for at most `timeout` seconds (None: until it ends). True if it ended in time (its
    exception, if any, is raised); False at the deadline, with `coro` cancelled but not waited for."""
    runner = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({runner}, timeout=timeout)
    finally:
        if not runner.done():
            runner.cancel()
            runner.add_done_callback(_consume)
    if runner in done:
        runner.result()
        return True
    return False


def _consume(runner: asyncio.Future) -> None:
    """Read a cancelled runner's outcome so asyncio does not log it as never retrieved."""
    if not runner.cancelled():
        runner.exception()
