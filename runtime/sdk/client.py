"""Client: the synchronous SDK. It drives an `AsyncClient` on a private event-loop thread, so both clients
share one implementation of requests, retries, errors and reconnecting event streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from runtime.resources import Task, TaskEvent
from runtime.sdk.async_client import AsyncClient
from runtime.sdk.calls import Agents, Memories, Sessions, Tasks


class _Loop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engram-sdk", daemon=True)
        self.thread.start()

    def run(self, coroutine):
        """Run `coroutine` on the loop thread and wait for it. Interrupted here (Ctrl-C), it is cancelled and
        waited for (its cleanup runs on the loop thread), so what it used (a stream) is free again at once."""
        finished = threading.Event()

        async def tracked():
            asyncio.current_task().add_done_callback(lambda _: finished.set())
            return await coroutine

        future = asyncio.run_coroutine_threadsafe(tracked(), self.loop)
        try:
            return future.result()
        except BaseException:
            if future.cancel():
                finished.wait(timeout=5)
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class SyncTasks(Tasks):
    def __init__(self, client: Client):
        super().__init__(client._send)
        self._client = client

    def events(self, task_id: str, *, after: str | None = None) -> Iterator[TaskEvent]:
        """The task's events until its final/error event, reconnecting with Last-Event-ID."""
        stream = self._client._async.tasks.events(task_id, after=after)
        try:
            while True:
                try:
                    yield self._client._loop.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._client._loop.run(stream.aclose())

    def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        return self._client._loop.run(self._client._async.tasks.wait(task_id, timeout=timeout))


class Client:
    """`Client(base_url, api_key)`: the same namespaces as AsyncClient, with plain (blocking) methods."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **options):
        self._loop = _Loop()
        self._async = self._loop.run(_make(base_url, api_key, options))
        self.base_url = self._async.base_url
        self.agents = Agents(self._send)
        self.tasks = SyncTasks(self)
        self.sessions = Sessions(self._send)
        self.memories = Memories(self._send)

    def _send(self, call):
        return self._loop.run(self._async._send(call))

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _make(base_url, api_key, options) -> AsyncClient:
    return AsyncClient(base_url, api_key, **options)  # built on the loop that will use it
