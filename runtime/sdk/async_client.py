"""AsyncClient: the runtime's REST API from async Python (httpx), with typed resources and errors.

Retries: connection failures and 5xx answers are retried with exponential backoff where that is safe
(reads, and writes that carry an idempotency key: task submissions always do, so a retried submit never
creates a second task); a request that may have reached the server is otherwise not repeated. Event
streams reconnect by themselves with `Last-Event-ID`, so a dropped connection loses and repeats nothing.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator

import httpx

from runtime.resources import Task, TaskEvent
from runtime.sdk.calls import Agents, Call, Memories, Sessions, Tasks, _p
from runtime.sdk.errors import ConnectionFailed, EngramError, TaskTimeout, error_for_status
from runtime.sdk.sse import EventParser
from runtime.sdk.waiting import ended_within

DEFAULT_URL = "http://127.0.0.1:8080"


def backoff_s(attempt: int, base_s: float) -> float:
    return min(base_s * 2**attempt, 8.0) * (0.5 + random.random() / 2)


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, field = str(error.get("message")), error.get("field")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, field = response.text[:500] or response.reason_phrase, None
    retry_after = response.headers.get("Retry-After")
    raise error_for_status(response.status_code, message, field,
                           float(retry_after) if retry_after and retry_after.isdigit() else None)


class AsyncTasks(Tasks):
    def __init__(self, client: AsyncClient):
        super().__init__(client._send)
        self._client = client

    async def events(self, task_id: str, *, after: str | None = None) -> AsyncIterator[TaskEvent]:
        """The task's events from the start (or after event id `after`) until its final/error event,
        reconnecting with Last-Event-ID whenever the connection drops."""
        last, failures = after, 0
        path = f"/v1/tasks/{_p(task_id)}/events"
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with self._client.http.stream("GET", path, headers=headers,
                                                    timeout=httpx.Timeout(10.0, read=60.0)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for(response)
                    parser = EventParser(task_id)
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        last, failures = event.id, 0
                        yield event
                        if event.terminal:
                            return
                if (await self.get(task_id)).done:
                    return  # finished and its terminal event already read (or expired)
            except httpx.TransportError as exc:
                failures += 1
                if failures > self._client.max_retries + 5:
                    raise ConnectionFailed(f"event stream of {task_id} lost: {exc}") from None
                await asyncio.sleep(backoff_s(failures - 1, self._client.backoff_base_s))

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Block until the task finishes; returns it (TaskTimeout after `timeout` seconds)."""

        async def follow() -> None:
            async for _event in self.events(task_id):
                pass

        if not await ended_within(follow(), timeout):
            raise TaskTimeout(f"task {task_id} did not finish within {timeout}s")
        return await self.get(task_id)


def default_url() -> str:
    """$ENGRAM_URL, else the server `engram serve` starts with the same environment: $ENGRAM_HOST:$ENGRAM_PORT
    (127.0.0.1:8080 unless set; a server on every interface is reached on loopback)."""
    if os.environ.get("ENGRAM_URL"):
        return os.environ["ENGRAM_URL"]
    host = os.environ.get("ENGRAM_HOST") or "127.0.0.1"
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{os.environ.get('ENGRAM_PORT') or 8080}"


class AsyncClient:
    """`AsyncClient(base_url, api_key)`; they default to `default_url()` and $ENGRAM_API_KEY."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 3, backoff_base_s: float = 0.25, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = (base_url or default_url()).rstrip("/")
        api_key = api_key or os.environ.get("ENGRAM_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        self.max_retries, self.backoff_base_s = max_retries, backoff_base_s
        self.agents = Agents(self._send)
        self.tasks = AsyncTasks(self)
        self.sessions = Sessions(self._send)
        self.memories = Memories(self._send)

    async def _send(self, call: Call):
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = await self.http.request(call.method, call.path, json=call.json, params=call.params,
                                                   headers=call.headers)
            except httpx.TransportError as exc:
                never_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                if last or not (never_sent or call.retry_safe):
                    raise ConnectionFailed(f"cannot reach {self.base_url}: {exc or type(exc).__name__}") from None
            else:
                if not (response.status_code >= 500 and call.retry_safe and not last):
                    raise_for(response)
                    return None if call.parse is None or response.status_code == 204 else call.parse(response.json())
            await asyncio.sleep(backoff_s(attempt, self.backoff_base_s))
        raise EngramError("unreachable")  # the loop always returns or raises

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
