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
    """Events of one task from `after` on, until its terminal event (the caller checked the tenant)."""
    wait_ms: int | None = None  # the first read does not block: a finished task's stream ends at once
    while True:
        events = await tasks.events(tenant, task_id, after=after, block_ms=wait_ms, tenant_checked=True)
        if not events:
            state = await tasks.state(tenant, task_id)
            if state.finished:
                # The terminal commit writes the state and the final event in one script, so a read made
                # after seeing the state finished has every event: nothing there means the stream was
                # resumed after its terminal event (or trimmed, or expired).
                events = await tasks.events(tenant, task_id, after=after, tenant_checked=True)
                if not events:
                    return
            else:
                if wait_ms is not None:
                    yield KEEPALIVE
                wait_ms = block_ms
                continue
        for event in events:
            yield frame(event)
            after = event.id
            if event.terminal:
                return
