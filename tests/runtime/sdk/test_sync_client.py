"""The synchronous client's event-loop thread: an interrupted call (Ctrl-C in the caller's thread) stops its
coroutine before the caller goes on, so the caller's cleanup (closing an event stream) works."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from runtime.sdk.client import _Loop


def test_ctrl_c_during_a_call_stops_it_so_the_stream_can_close():
    loop, cleaned = _Loop(), []

    async def events():
        try:
            yield 1
            await asyncio.sleep(3600)  # a stream waiting for the next event
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
