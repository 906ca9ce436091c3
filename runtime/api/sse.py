"""Server-Sent Events framing for task event streams: `id:`, `event:` and `data:` lines per event, and a
comment line as keep-alive while the task is quiet, so proxies and clients keep the connection.

A stream ends after the task's terminal event (`final` or `error`). Resuming with `Last-Event-ID`
starts after that id: Redis stream ids are ordered, so nothing is lost or repeated.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from runtime.resources import TaskEvent

KEEPALIVE = ": keep-alive\n\n"


def frame(event: TaskEvent) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data, ensure_ascii=False)}\n\n"


async def task_stream(tasks, tenant: str, task_id: str, after: str, *, block_ms: int = 15_000,
                      ) -> AsyncIterator[str]:
    """Events of one task from `after` on, until its terminal event."""
    while True:
        events = await tasks.events(tenant, task_id, after=after, block_ms=block_ms)
        if not events:
            state = await tasks.state(tenant, task_id)
            if state.finished:  # the terminal event was trimmed away or the stream expired
                return
            yield KEEPALIVE
            continue
        for event in events:
            yield frame(event)
            after = event.id
            if event.terminal:
                return
