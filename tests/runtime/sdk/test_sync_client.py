"""The synchronous client's event-loop thread: an interrupted call (Ctrl-C in the caller's thread) stops its
coroutine before the caller goes on, so the caller's cleanup (closing an event stream) works. And where a client
connects by default: where `engram serve` listens with the same environment, as the CLI does. And the in-process
event stream never loses a final event to a race."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from runtime.sdk import AsyncClient
from runtime.sdk.client import _Loop


def test_ctrl_c_during_a_call_stops_it_so_the_stream_can_close():
    # Ctrl-C raises KeyboardInterrupt here, whatever handler an earlier test (a server, Ray) left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    loop, cleaned = _Loop(), []

    async def events():
        try:
            yield 1
            await asyncio.sleep(30)  # a stream waiting for the next event (bounded: a missed Ctrl-C fails, not hangs)
            yield 2
        finally:
            await asyncio.sleep(0.05)  # its own async cleanup (closing the connection)
            cleaned.append(True)

    stream = events()
    try:
        assert loop.run(stream.__anext__()) == 1
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            loop.run(stream.__anext__())
        assert cleaned == [True]  # stopped, cleanup done, before the KeyboardInterrupt reached us
        loop.run(stream.aclose())  # was: RuntimeError: aclose(): asynchronous generator is already running
        assert loop.run(asyncio.sleep(0, result="still usable")) == "still usable"
    finally:
        loop.stop()
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("env", "url"), [
    ({}, "http://127.0.0.1:8080"),
    ({"ENGRAM_PORT": "9000"}, "http://127.0.0.1:9000"),
    ({"ENGRAM_HOST": "0.0.0.0", "ENGRAM_PORT": "9000"}, "http://127.0.0.1:9000"),  # every interface: loopback
    ({"ENGRAM_HOST": "10.1.2.3"}, "http://10.1.2.3:8080"),
    ({"ENGRAM_URL": "https://engram.example/", "ENGRAM_PORT": "9000"}, "https://engram.example"),  # the URL wins
])
def test_the_default_url_is_where_engram_serve_listens(monkeypatch, env, url):
    for name in ("ENGRAM_URL", "ENGRAM_HOST", "ENGRAM_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = AsyncClient(api_key="engram_x_y")
    assert client.base_url == url
    asyncio.run(client.http.aclose())


def test_the_in_process_stream_keeps_the_final_event_of_a_task_that_ends_between_two_reads():
    """The stream reads events, then asks whether the task is done: a task that ended in between has its final
    event unread; the stream reads once more instead of stopping without it (the HTTP stream always did)."""
    from types import SimpleNamespace

    from runtime.resources import TaskEvent
    from runtime.sdk.local import LocalTasks

    final = TaskEvent(id="2-0", type="final", data={"answer": "4"}, task_id="t")
    reads = iter([[TaskEvent(id="1-0", type="step_started", task_id="t")], [], [final]])

    async def events(tenant, task_id, *, after="0-0", block_ms=None):
        return next(reads)

    async def get(tenant, task_id):
        return SimpleNamespace(done=True)  # it ended right after the empty read

    service = SimpleNamespace(tasks=SimpleNamespace(events=events, get=get))
    tasks = LocalTasks(SimpleNamespace(service=service, tenant="default"))

    async def collect():
        return [event.type async for event in tasks.events("t")]

    assert asyncio.run(collect()) == ["step_started", "final"]
